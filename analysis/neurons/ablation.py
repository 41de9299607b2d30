"""Ablation: the interventions that validate attributions.

* :func:`ablation_check` -- ablate a fact's important units and ``n_random`` random sets of the
  same size in the same layers; an attribution is validated when its set lowers the answer's
  probability more than the random ones do.
* :func:`ablation_matrix` -- ablate the units specific to language ``L`` and measure knowledge
  (question form, greedy alias match, as the knowledge stage measures it) in every language
  ``M``, with a random set of the same per-layer sizes as the control.  If the units are
  language-specific, the drop is largest on the diagonal.

Neurons are ablated to zero or to their mean activation over text; heads to zero (the mean of
``attn_z`` is not measured).  Ablations are :class:`~mlake_core.models.adapter.UnitPatch`
objects held by :meth:`~mlake_core.models.adapter.BaseAdapter.intervening`, so generation
runs ablated too, and the model is untouched afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from analysis.neurons.attribution import UNIT_SITES, AttributionPrompt, answer_probabilities
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter, UnitPatch

MODES: tuple[str, ...] = ("zero", "mean")


def unit_patches(
    adapter: ModelAdapter,
    units: np.ndarray,
    unit: str,
    *,
    mode: str = "zero",
    mean: np.ndarray | None = None,
) -> list[UnitPatch]:
    """The patches that ablate ``units`` (flat indices ``layer * n_units + index``).

    Args:
        adapter: the model.
        units: the units.
        unit: ``neuron`` or ``head``.
        mode: ``zero``, or ``mean`` (neurons only: ``mean`` ``[n_layers, d_mlp]``).
    """
    if mode not in MODES:
        raise ConfigError(f"--ablation {mode!r}: choose zero or mean")
    if mode == "mean" and unit == "neuron" and mean is None:
        raise ConfigError("mean ablation needs the neurons' mean activations")
    n_units = adapter.d_mlp if unit == "neuron" else adapter.info.n_heads
    units = np.asarray(units, dtype=np.int64)
    patches = []
    for layer in np.unique(units // n_units):
        idx = units[units // n_units == layer] % n_units
        site = f"{UNIT_SITES[unit]}.{int(layer)}"
        if unit == "head":
            d = adapter.info.d_head
            cols = (idx[:, None] * d + np.arange(d)[None]).reshape(-1)
            patches.append(UnitPatch.zero(site, torch.as_tensor(cols)))
        elif mode == "zero":
            patches.append(UnitPatch.zero(site, torch.as_tensor(idx)))
        else:
            assert mean is not None
            values = torch.as_tensor(mean[int(layer), idx], dtype=torch.float32)
            patches.append(UnitPatch(site, torch.as_tensor(idx), values))
    return patches


def random_like(
    units: np.ndarray, n_units: int, generator: np.random.Generator, n_layers: int
) -> np.ndarray:
    """Random units with the same count per layer as ``units``, none of them in ``units``."""
    units = np.asarray(units, dtype=np.int64)
    out = []
    for layer in range(n_layers):
        mine = units[units // n_units == layer] % n_units
        if len(mine) == 0:
            continue
        pool = np.setdiff1d(np.arange(n_units), mine)
        k = min(len(mine), len(pool))
        out.append(layer * n_units + generator.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def ablated_probability(
    adapter: ModelAdapter, prompt: AttributionPrompt, patches: Sequence[UnitPatch]
) -> float:
    """The answer's probability with ``patches`` applied."""
    seq = [*prompt.prompt_ids, *prompt.answer_ids[:-1]]
    with adapter.intervening(patches):
        probs, _ = answer_probabilities(adapter, adapter.batch([seq]), prompt)
    return float(probs[0])


def ablation_check(
    adapter: ModelAdapter,
    prompt: AttributionPrompt,
    units: np.ndarray,
    unit: str,
    *,
    n_random: int,
    generator: np.random.Generator,
    mode: str = "zero",
    mean: np.ndarray | None = None,
) -> dict[str, float]:
    """Answer probability clean, with ``units`` ablated, and with random sets ablated.

    Returns:
        ``p_clean``, ``p_ablated``, ``p_random`` (mean over ``n_random`` sets; NaN without
        units), ``n_units``.
    """
    p_clean = ablated_probability(adapter, prompt, [])
    if len(units) == 0:
        return {"p_clean": p_clean, "p_ablated": p_clean, "p_random": float("nan"), "n_units": 0}
    n_units = adapter.d_mlp if unit == "neuron" else adapter.info.n_heads
    p_ablated = ablated_probability(
        adapter, prompt, unit_patches(adapter, units, unit, mode=mode, mean=mean)
    )
    randoms = []
    for _ in range(n_random):
        other = random_like(units, n_units, generator, adapter.n_layers)
        randoms.append(
            ablated_probability(
                adapter, prompt, unit_patches(adapter, other, unit, mode=mode, mean=mean)
            )
        )
    return {
        "p_clean": p_clean,
        "p_ablated": p_ablated,
        "p_random": float(np.mean(randoms)) if randoms else float("nan"),
        "n_units": len(units),
    }


def ablation_matrix(
    adapter: ModelAdapter,
    views: Mapping[str, Sequence[Any]],
    template: Any,
    specific: Mapping[str, np.ndarray],
    unit: str,
    *,
    generator: np.random.Generator,
    mode: str = "zero",
    mean: np.ndarray | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Knowledge in every language with each language's specific units ablated.

    Args:
        adapter: the model.
        views: per measured language, the fact views known before ablation.
        template: the prompt template.
        specific: per ablated language, its specific units (flat indices).
        unit: ``neuron`` or ``head``.
        generator: draws the random control sets.
        mode: ``zero`` or ``mean``.
        mean: mean activations, for ``mean``.

    Returns:
        One row per (ablated, measured) language: the facts measured, the units ablated, the
        fraction still answered correctly with the specific set and with the random set,
        and the drops (1 - that fraction; every measured fact was known before).
    """
    from mlake_core.metrics.knowledge import KnowledgeConfig, measure_knowledge

    # Greedy answers are short; 16 new tokens cover MLaKE's answers with their stop string.
    config = KnowledgeConfig(forms=("question",), mcqa=False, max_new_tokens=16)
    all_views = [v for lang in views for v in views[lang]]
    n_units = adapter.d_mlp if unit == "neuron" else adapter.info.n_heads

    def accuracy(patches: Sequence[UnitPatch]) -> dict[str, float]:
        if not all_views:
            return {}
        with adapter.intervening(patches):
            result = measure_knowledge(adapter, all_views, template, config, batch_size=batch_size)
        table = result.table
        return {
            str(lang): float((group["greedy_match"] == "original").mean())
            for lang, group in table.groupby("lang")
        }

    rows = []
    for ablated, units in specific.items():
        units = np.asarray(units, dtype=np.int64)
        control = random_like(units, n_units, generator, adapter.n_layers)
        if len(units):
            after = accuracy(unit_patches(adapter, units, unit, mode=mode, mean=mean))
            after_random = accuracy(unit_patches(adapter, control, unit, mode=mode, mean=mean))
        else:
            after = after_random = {}
        for measured, measured_views in views.items():
            acc = after.get(measured, 1.0 if len(units) == 0 else float("nan"))
            acc_random = after_random.get(measured, 1.0 if len(units) == 0 else float("nan"))
            rows.append(
                {
                    "ablated_lang": ablated,
                    "measured_lang": measured,
                    "n_units": len(units),
                    "n_facts": len(measured_views),
                    "accuracy_after": acc,
                    "accuracy_after_random": acc_random,
                    "drop": 1.0 - acc,
                    "drop_random": 1.0 - acc_random,
                }
            )
    return rows
