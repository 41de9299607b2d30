"""Which facts a run uses: the one parsing of a fact count and the one selection of fact ids.

Every command, the pipeline and the sweep select facts here.  The **pool** is the default
selection (a mlake-tiny's training facts when the model records them, else every fact in
order).  No count (``None``) takes the whole pool, a count ``N`` the first ``N`` of it,
``trained`` the whole pool of a model that records its training facts (an error for others),
and ``all`` every fact of the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError

#: The words a fact count may be instead of a number.
FACT_WORDS: tuple[str, ...] = ("all", "trained")


def parse_facts(value: int | str | None, option: str = "--facts") -> int | str | None:
    """A fact count: a positive number, ``all``, ``trained`` (mlake-tiny's training facts),
    or ``None`` (the whole default selection).

    Raises:
        ConfigError: naming ``option``, for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in FACT_WORDS:
        return value.strip()
    if isinstance(value, bool):
        raise ConfigError(f"{option} {value!r}: expected a number, 'all' or 'trained'")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {value!r}: expected a number, 'all' or 'trained'") from None
    if n < 1:
        raise ConfigError(f"{option} {value}: must be at least 1")
    return n


@dataclass(frozen=True)
class FactSelection:
    """The facts of a run.

    Attributes:
        pool: the default selection (training facts when known, else all facts in order);
            where unrelated facts for locality are drawn from.
        fact_ids: the facts asked for (the first N of ``pool``, the pool for ``None`` and
            ``trained``, every fact for ``all``).
        asked: the count asked for when the pool held fewer (then every fact of the pool is
            taken, and :attr:`note` says so), else ``None``.
    """

    pool: tuple[int, ...]
    fact_ids: tuple[int, ...]
    asked: int | None = None

    @property
    def note(self) -> str | None:
        """A line to report when fewer facts were taken than asked for."""
        if self.asked is None:
            return None
        return (
            f"--facts {self.asked}: the pool holds only {len(self.pool)} facts; "
            f"using all {len(self.fact_ids)}"
        )


def select_facts(
    dataset: MlakeDataset, facts: int | str | None, trained: Sequence[int] | None = None
) -> FactSelection:
    """The pool and the facts asked for (module docstring).

    Args:
        dataset: MLaKE.
        facts: a value :func:`parse_facts` accepts.
        trained: the model's training facts (mlake-tiny records them), else ``None``.

    Raises:
        ConfigError: a malformed count, ``trained`` for a model that records no training
            facts, or training facts that are not in the dataset.
    """
    facts = parse_facts(facts)
    all_ids = [f.fact_id for f in dataset.facts]
    if facts == "trained" and trained is None:
        raise ConfigError(
            "--facts trained: this model records no training facts (only mlake-tiny does); "
            "use a number or 'all'"
        )
    pool = list(trained) if trained is not None else all_ids
    missing = sorted(set(pool) - set(all_ids))
    if missing:
        raise ConfigError(
            f"the model's training facts include ids not in MLaKE {dataset.version}: {missing[:5]}"
        )
    if facts == "all":
        chosen = all_ids
    elif facts is None or facts == "trained":
        chosen = pool
    else:
        chosen = pool[: int(facts)]
        if int(facts) > len(pool):
            return FactSelection(pool=tuple(pool), fact_ids=tuple(chosen), asked=int(facts))
    return FactSelection(pool=tuple(pool), fact_ids=tuple(chosen))
