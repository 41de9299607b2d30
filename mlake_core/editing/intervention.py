"""Weight edits applied as forward interventions: a term added at the edited module's output
instead of a written weight.

ROME's rank-one update, MEMIT's low-rank updates (one per edited layer) and FT's change all
change the weight of a linear output projection (``mlp_post`` is its input).  For a linear
module ``y = W x + b``, ``(W + ΔW) x + (b + Δb) = y + ΔW x + Δb``, so the edited model's
every activation and logit is obtained by adding ``ΔW x + Δb`` to the module's output in each
pass, with no parameter written (:class:`~mlake_core.models.adapter.OutputDelta`, applied by
:meth:`~mlake_core.models.adapter.BaseAdapter.adding` through each backend's own hooks).
That is what a read-only backend needs: nnsight's remote execution on NDIF-hosted models,
where the weights cannot be written, runs the term as part of the trace.

How an edit is applied is one choice, :data:`EDIT_APPLY` (``ModelSettings.edit_apply``,
``--edit-apply``; default ``weights``), read by
:meth:`~mlake_core.editing.base.EditResult.applied` -- so every stage that evaluates an
edited model follows it.  Conversion (:func:`output_deltas`):

* GPT-2's ``Conv1D`` stores its weight ``[in, out]``; the delta is transposed to ``[out, in]``.
* A bias change (``<module>.bias``) is added as it is.
* Several edited modules (MEMIT's layers) give one delta each.
* ROME's rank-one and MEMIT's low-rank updates are added in factored form
  (:attr:`~mlake_core.editing.base.EditResult.factors`): ``(x Rᵀ) Lᵀ`` costs ``r (in + out)``
  per position instead of ``in * out``, and a remote request carries the factors (for a
  Llama 70B down-projection, 37k numbers per rank instead of 235M); FT's change is dense.
* A weight shared by several modules (tied) is refused: writing it changes every module that
  holds it, an added term at one module would not.  (Edits never write the embedding or the
  unembedding, tied in Qwen2 and Gemma 3: :func:`~mlake_core.editing.base.edited_parameter`.)

The result equals the weight edit up to rounding: the edited weight is ``W + ΔW`` rounded to
the model's dtype, the intervention computes ``W x`` and ``ΔW x`` separately (float32: logits
agree to about 1e-5; ``tests/mlake_core/editing/test_intervention.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import OutputDelta

#: How :meth:`~mlake_core.editing.base.EditResult.applied` applies an edit's deltas:
#: ``weights`` (added to the parameters, restored bitwise after; the default) or
#: ``intervention`` (added at the edited modules' outputs in every pass; nothing written).
EDIT_APPLY: tuple[str, ...] = ("weights", "intervention")

#: The default of :data:`EDIT_APPLY` (``ModelSettings.edit_apply``).
DEFAULT_EDIT_APPLY = "weights"


def check_edit_apply(value: str, option: str = "--edit-apply") -> str:
    """``value`` if it is one of :data:`EDIT_APPLY`.

    Raises:
        ConfigError: naming ``option`` and the choices.
    """
    if value not in EDIT_APPLY:
        raise ConfigError(f"{option} {value!r}: choose {', '.join(EDIT_APPLY)}")
    return value


def _holders(adapter: Any, param: torch.nn.Parameter) -> int:
    """How many modules of the model hold ``param`` as one of their own parameters."""
    return sum(
        any(p is param for p in module._parameters.values())
        for module in adapter.hf_module("").modules()
    )


def output_deltas(
    adapter: Any,
    deltas: dict[str, torch.Tensor],
    what: str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[OutputDelta]:
    """The :class:`~mlake_core.models.adapter.OutputDelta` of each edited module of an edit's
    ``deltas`` (parameter name -> change, as :class:`~mlake_core.editing.base.EditResult`
    holds them), in the order the modules first appear.  A weight with ``factors``
    (``(left [out, r], right [r, in])``, :attr:`EditResult.factors
    <mlake_core.editing.base.EditResult.factors>`) is added in factored form.

    Raises:
        ConfigError: starting with ``what``: a parameter an edit may not write (embedding,
            unembedding, unknown), one that is neither ``weight`` nor ``bias``, a module that is
            not a ``Linear`` or ``Conv1D`` output projection, a weight held by several modules
            (tied), or a delta whose shape is not its parameter's.
    """
    weights: dict[str, torch.Tensor] = {}
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for name, change in deltas.items():
        try:  # the guard every edit goes through (editing.base.edited_parameter)
            param = adapter.editable_parameter(name)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None
        except KeyError:
            raise ConfigError(
                f"{what}: {adapter.info.model_id} has no parameter {name!r} to edit"
            ) from None
        path, _, attr = name.rpartition(".")
        if attr not in ("weight", "bias"):
            raise ConfigError(
                f"{what}: {name} is neither a weight nor a bias; only those of a linear "
                "projection can be applied as an intervention"
            )
        if tuple(change.shape) != tuple(param.shape):
            raise ConfigError(
                f"{what}: the delta of {name} has shape {tuple(change.shape)}, the parameter "
                f"{tuple(param.shape)}"
            )
        module = adapter.hf_module(path)
        conv1d = type(module).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D: [in, out]
        if not (conv1d or isinstance(module, torch.nn.Linear)):
            raise ConfigError(
                f"{what}: {path} is a {type(module).__name__}, not a linear projection; its "
                "change cannot be applied as an added output term"
            )
        if _holders(adapter, param) > 1:
            raise ConfigError(
                f"{what}: {name} is one tensor shared by several modules (tied); writing it "
                "changes all of them and an added term at one module would not: use "
                "--edit-apply weights"
            )
        adapter.delta_input_site(path)  # an attention or MLP output projection
        if path not in order:
            order.append(path)
        if attr == "weight" and factors and name in factors:
            left, right = factors[name]
            out_in = (param.shape[1], param.shape[0]) if conv1d else tuple(param.shape)
            if (left.shape[0], right.shape[-1]) != out_in:
                raise ConfigError(
                    f"{what}: the factors of {name} are {tuple(left.shape)} and "
                    f"{tuple(right.shape)}; the map is {out_in[0]} x {out_in[1]}"
                )
            low_rank[path] = (left, right)
        elif attr == "weight":
            weights[path] = change.T if conv1d else change
        else:
            biases[path] = change
    return [
        OutputDelta(path, weights.get(path), biases.get(path), low_rank.get(path)) for path in order
    ]
