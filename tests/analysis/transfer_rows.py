"""One edit's saved row of a transfer run (``analysis.transfer``'s columns), for tests that
build transfer tables by hand."""

from __future__ import annotations

import math
from typing import Any


def transfer_row(
    fact: int,
    a: str,
    b: str,
    kind: str,
    form: str,
    n: int,
    hits: float,
    *,
    by: str = "",
    before: float = math.nan,
    orig: float = math.nan,
    missing: str = "",
    known_before: bool = True,
) -> dict[str, Any]:
    """Fact ``fact`` edited in ``a``, tested in ``b``: ``hits`` of ``n`` questions gave the
    new answer (``before``: the unedited model's count; ``orig``: the original's)."""
    return {
        "fact_id": fact,
        "edit_lang": a,
        "test_lang": b,
        "kind": kind,
        "form": form,
        "n": n,
        "success_greedy": hits / n if n else math.nan,
        "chose_edit": float(hits),
        "chose_original": float(orig),
        "chose_edit_before": float(before),
        "chose_original_before": math.nan,
        "mcqa_by": by,
        "missing": missing,
        "known_before": known_before,
    }
