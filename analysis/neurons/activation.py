"""Activation statistics per language, streamed, and language-specific neurons by activation
probability entropy (LAPE; Tang et al. 2024, "Language-Specific Neurons: The Key to
Multilingual Capabilities in Large Language Models").

Text in each language is run through the model in batches; for every MLP neuron
(``mlp_post.{L}``) two running sums are kept: how many tokens it was active on (value > 0) and
its summed value.  Memory is one batch's activations plus ``2 x n_layers x d_mlp`` counters
per language, whatever the amount of text (RUCAIBox/Language-Specific-Neurons#4).

"Active" means the neuron's ``mlp_post`` value is positive.  For non-gated MLPs (GPT-2,
BLOOM, GPT-NeoX) this is Tang et al.'s definition; for gated ones (Llama, Qwen2) Tang et al.
test ``act(gate) > 0`` while mlake tests the neuron's value ``act(gate) * up``, the quantity
that ablation removes.

LAPE (:func:`lape`): with ``p[lang, unit]`` the activation probability, normalise over
languages, take the entropy; neurons with no language above the ``filter_rate`` quantile of all
probabilities are dismissed; of the rest, the ``top_rate`` fraction of all neurons with the
lowest entropy are language-specific, each assigned to the languages where its probability is
above the ``bar_rate`` quantile.  Tang et al.'s defaults: 1%, 95%, 95%.  LAPE is registered
as the attribution method ``lape`` of scope ``language`` (:func:`select_lape`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.neurons.attribution import register_attribution_method
from mlake_core.errors import ConfigError, DataError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.results.store import read_arrays, read_run


@dataclass
class ActivationStats:
    """Per-language counts of active tokens and summed values of every MLP neuron.

    Attributes:
        langs: language codes, in order.
        n_tokens: tokens seen per language.
        positive: ``[n_langs, n_layers, d_mlp]`` tokens on which the neuron was > 0.
        total: ``[n_langs, n_layers, d_mlp]`` summed activation (float64).
        n_texts: texts read per language.
    """

    langs: tuple[str, ...]
    n_tokens: np.ndarray
    positive: np.ndarray
    total: np.ndarray
    n_texts: np.ndarray

    @property
    def probability(self) -> np.ndarray:
        """Activation probability ``[n_langs, n_layers, d_mlp]``."""
        return self.positive / np.maximum(self.n_tokens, 1)[:, None, None]

    def mean(self) -> np.ndarray:
        """Mean activation over every language's tokens, ``[n_layers, d_mlp]`` (the mean
        baseline of integrated gradients and the value of mean ablation)."""
        return self.total.sum(0) / max(1, int(self.n_tokens.sum()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "langs": np.array(self.langs),
            "n_tokens": self.n_tokens,
            "positive": self.positive,
            "total": self.total,
            "n_texts": self.n_texts,
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationStats:
        """The activation statistics a neuron run saved (``arrays/activations.npz``).

        Args:
            path: the neuron run folder, or that file (a path ending in ``.npz``).

        Raises:
            DataError: not a neuron run, no such file, or not activation statistics (the
                message names the folder or file).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = read_run(path, "neurons").arrays_path("activations")
        keys = ("langs", "n_tokens", "positive", "total", "n_texts")
        return cls.from_arrays(read_arrays(path, keys=keys, what="activation statistics"))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ActivationStats:
        return cls(
            langs=tuple(str(x) for x in arrays["langs"]),
            n_tokens=np.asarray(arrays["n_tokens"]),
            positive=np.asarray(arrays["positive"]),
            total=np.asarray(arrays["total"]),
            n_texts=np.asarray(arrays["n_texts"]),
        )


def mlake_texts(dataset: Any, langs: Sequence[str]) -> dict[str, list[str]]:
    """MLaKE's own text per language: each fact's statement (with its original answer) and
    question."""
    out: dict[str, list[str]] = {lang: [] for lang in langs}
    for fact in dataset.facts:
        for lang in langs:
            view = fact.views.get(lang)
            if view is not None:
                out[lang] += [view.record.o_prompt, view.record.question]
    return out


def folder_texts(folder: str | os.PathLike[str], langs: Sequence[str]) -> dict[str, list[str]]:
    """Text per language from a folder: ``<lang>.txt`` or ``<lang>/*.txt`` (one document per
    non-empty line).

    Raises:
        ConfigError: the folder or a language's text is missing, or a file is not UTF-8.
    """
    from mlake_core.editing.covariance import read_corpus

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--text {str(root)!r} is not a folder")
    out = {}
    for lang in langs:
        for candidate in (root / f"{lang}.txt", root / lang):
            if candidate.exists():
                out[lang] = read_corpus(candidate)
                break
        else:
            raise ConfigError(
                f"--text {str(root)!r}: no text for {lang} (expected {lang}.txt or {lang}/)"
            )
    return out


def activation_stats(
    adapter: ModelAdapter,
    texts: Mapping[str, Sequence[str]],
    *,
    max_tokens: int = 200_000,
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> ActivationStats:
    """Stream each language's texts through the model and count neuron activity.

    Args:
        adapter: the model.
        texts: documents per language (order kept: the first ``max_tokens`` tokens count).
        max_tokens: tokens read per language at most.
        batch_size: texts per forward pass.
        progress: called with (language, tokens so far) after each batch.
    """
    langs = tuple(texts)
    n_layers, d_mlp = adapter.n_layers, adapter.d_mlp
    sites = [f"mlp_post.{layer}" for layer in range(n_layers)]
    positive = np.zeros((len(langs), n_layers, d_mlp), dtype=np.int64)
    total = np.zeros((len(langs), n_layers, d_mlp), dtype=np.float64)
    n_tokens = np.zeros(len(langs), dtype=np.int64)
    n_texts = np.zeros(len(langs), dtype=np.int64)
    for i, lang in enumerate(langs):
        # The first max_tokens tokens of the documents, in order; then batched by length so
        # little padding is run.  Only the last position's logits are computed.
        kept: list[list[int]] = []
        room = max_tokens
        for doc in texts[lang]:
            if room <= 0:
                break
            if doc.strip():
                ids = adapter.encode(doc)[:room]
                kept.append(ids)
                room -= len(ids)
        kept.sort(key=len)
        for start in range(0, len(kept), batch_size):
            batch = adapter.batch(kept[start : start + batch_size], padding_side="left")
            cache = adapter.activations(batch, sites)
            real = batch.attention_mask.bool()
            for layer, site in enumerate(sites):
                acts = cache[site][real].float()
                positive[i, layer] += (acts > 0).sum(0).cpu().numpy()
                total[i, layer] += acts.double().sum(0).cpu().numpy()
            n_tokens[i] += int(real.sum())
            n_texts[i] += batch.shape[0]
            if progress:
                progress(lang, int(n_tokens[i]))
        if n_tokens[i] == 0:
            raise ConfigError(f"no text in {lang} to measure neuron activations on")
    return ActivationStats(langs, n_tokens, positive, total, n_texts)


@dataclass
class LapeResult:
    """Language-specific neurons by activation probability entropy.

    Attributes:
        langs: languages, in order.
        selected: flat unit indices (``layer * d_mlp + neuron``) of the low-entropy neurons.
        assignment: ``[len(selected), n_langs]`` bool, the languages each is specific to.
        entropy: ``[n_layers * d_mlp]`` entropy of each neuron (``inf`` when dismissed).
        bar: the activation-probability bar a language must pass.
    """

    langs: tuple[str, ...]
    selected: np.ndarray
    assignment: np.ndarray
    entropy: np.ndarray
    bar: float

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> LapeResult:
        """The LAPE selection a neuron run saved: ``arrays/lape.npz`` (selected neurons, their
        languages, every neuron's entropy), with the languages and the bar from the run's
        ``summary.json``.

        Raises:
            DataError: not a neuron run, or one without LAPE or not finished (no
                ``lape.npz``, or no ``summary.json`` recording the bar); the message names the
                folder or file.
        """
        run = read_run(run_dir, "neurons")
        keys = ("selected", "assignment", "entropy")
        arrays = read_arrays(run.arrays_path("lape"), keys=keys, what="a LAPE selection")
        summary = run.load_summary("neuron summary")
        info = summary.get("lape") or {}
        if "bar" not in info:
            raise DataError(f"{run.json_path('summary')}: no LAPE selection recorded")
        return cls(
            langs=tuple(str(lang) for lang in summary["langs"]),
            selected=np.asarray(arrays["selected"], dtype=np.int64),
            assignment=np.asarray(arrays["assignment"], dtype=bool),
            entropy=np.asarray(arrays["entropy"]),
            bar=math.nan if info["bar"] is None else float(info["bar"]),
        )

    def sets(self) -> dict[str, np.ndarray]:
        """Per language, the selected neurons assigned to it (flat indices)."""
        return {
            lang: self.selected[self.assignment[:, i]].astype(np.int64)
            for i, lang in enumerate(self.langs)
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the results store."""
        return {"selected": self.selected, "assignment": self.assignment, "entropy": self.entropy}

    def info(self) -> dict[str, Any]:
        """How many neurons were selected and the activation-probability bar."""
        return {"selected": len(self.selected), "bar": self.bar}


def lape(
    stats: ActivationStats,
    *,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    bar_rate: float = 0.95,
) -> LapeResult:
    """Language-specific neurons (module docstring).

    Raises:
        ConfigError: rates out of range, or fewer than two languages.
    """
    for name, value in (
        ("top_rate", top_rate),
        ("filter_rate", filter_rate),
        ("bar_rate", bar_rate),
    ):
        if not 0 < value < 1:
            raise ConfigError(f"--lape-{name.replace('_rate', '')}-rate {value}: must be in (0, 1)")
    if len(stats.langs) < 2:
        raise ConfigError("LAPE compares languages: give at least two")
    probs = stats.probability.reshape(len(stats.langs), -1)
    sums = probs.sum(0, keepdims=True)
    normed = np.divide(probs, sums, out=np.zeros_like(probs), where=sums > 0)
    logs = np.log(normed, out=np.zeros_like(normed), where=normed > 0)
    entropy = -(normed * logs).sum(0)
    flat = probs.reshape(-1)
    dismiss_below = float(np.quantile(flat, filter_rate))
    bar = float(np.quantile(flat, bar_rate))
    entropy = np.where((probs.max(0) >= dismiss_below) & (sums[0] > 0), entropy, np.inf)
    k = round(top_rate * probs.shape[1])
    order = np.argsort(entropy, kind="stable")[:k]
    selected = np.sort(order[np.isfinite(entropy[order])]).astype(np.int64)
    assignment = (probs[:, selected] >= bar).T
    return LapeResult(stats.langs, selected, assignment, entropy, bar)


@register_attribution_method(
    "lape",
    units=("neuron",),
    summary="language-specific neurons by activation probability entropy (Tang et al. 2024)",
    scope="language",
    needs=("activation_stats",),
)
def select_lape(stats: ActivationStats, config: Any) -> LapeResult:
    """LAPE as a registered method: :func:`lape` with the rates of the neuron stage's config
    (``lape_top_rate``, ``lape_filter_rate``, ``lape_bar_rate`` of a
    :class:`~analysis.neurons.config.NeuronConfig`)."""
    return lape(
        stats,
        top_rate=config.lape_top_rate,
        filter_rate=config.lape_filter_rate,
        bar_rate=config.lape_bar_rate,
    )
