"""IKE: in-context knowledge editing (Zheng et al. 2023).

No weight changes: the new fact, after demonstrations of other edits in the same language,
is put before every prompt (:attr:`~mlake_core.editing.base.EditResult.prefix`).  The
ceiling the weight edits are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mlake_core.configs import coerce_fields
from mlake_core.editing.base import (
    EditContext,
    EditRequest,
    EditResult,
    register_edit_method,
)
from mlake_core.errors import ConfigError


@dataclass(frozen=True)
class IkeConfig:
    """In-context editing.

    Attributes:
        n_demonstrations: example edits (other facts, same language) before the new fact.
    """

    n_demonstrations: int = 4

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.n_demonstrations < 0:
            raise ConfigError("ike: n_demonstrations must be >= 0")


@register_edit_method("ike", IkeConfig)
def edit_ike(
    adapter: Any, requests: Sequence[EditRequest], config: IkeConfig, context: EditContext
) -> EditResult:
    """IKE: a prompt prefix with demonstrations and the new fact; no weights change."""
    if len(requests) != 1:
        raise ConfigError("ike edits one fact at a time")
    (request,) = requests
    demos = [
        d for d in context.demonstrations.get(request.lang, []) if d[0] != request.statement_new
    ]
    if len(demos) < config.n_demonstrations:
        raise ConfigError(
            f"ike: {config.n_demonstrations} demonstrations wanted, {len(demos)} available in "
            f"{request.lang}"
        )
    picks = torch.randperm(len(demos), generator=context.generator)[: config.n_demonstrations]
    parts = [
        f"New fact: {demos[i][0]}\nQ: {demos[i][1]}\nA: {demos[i][2]}\n\n" for i in picks.tolist()
    ]
    prefix = "".join(parts) + f"New fact: {request.statement_new}\n"
    return EditResult(
        method="ike",
        requests=tuple(requests),
        prefix=prefix,
        info={"n_demonstrations": len(parts), "config": asdict(config)},
    )
