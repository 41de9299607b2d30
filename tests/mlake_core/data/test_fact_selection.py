"""``--facts N`` beyond the pool takes the whole pool and says so, never silently."""

from __future__ import annotations

from mlake_core.data.selection import select_facts


def test_a_count_beyond_the_pool_is_reported(mlake_v2411) -> None:
    n = len(mlake_v2411.facts)
    capped = select_facts(mlake_v2411, n + 5)
    assert len(capped.fact_ids) == n and capped.asked == n + 5
    assert capped.note == f"--facts {n + 5}: the pool holds only {n} facts; using all {n}"
    trained = select_facts(mlake_v2411, 10, trained=[0, 1, 2])
    assert trained.fact_ids == (0, 1, 2)
    assert trained.note == "--facts 10: the pool holds only 3 facts; using all 3"
    for fine in (select_facts(mlake_v2411, 3), select_facts(mlake_v2411, "all")):
        assert fine.asked is None and fine.note is None
