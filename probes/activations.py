"""Residual-stream activations to probe: every layer, two positions, every (fact, language).

A probe reads the residual stream of the question prompt of each fact in each language
(``Q: {question}\\nA:`` for the ``qa`` template, located by
:func:`mlake_core.editing.base.locate_prompt`) at two positions:

* ``subject``: the subject's last token, where ROME-style editing writes (Meng et al. 2022:
  the MLPs at the last subject token recall the fact's attributes);
* ``last``: the prompt's last token, where the next-token prediction (the answer) is read.

and at every depth: ``resid_pre.0`` (the embeddings, before block 0; *layer 0*) and
``resid_post.{L}`` (after block ``L``; *layer ``L + 1``*).  All are the raw residual stream,
before any layer norm.

Prompts are run in batches with left padding; the adapter derives position ids from the
attention mask, so each row's activations equal those of the prompt run alone (the tests check
this, ndif-team/nnsight#672).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from mlake_core.errors import DataError, MlakeError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.results.store import read_arrays, read_run

#: Where activations are read: the subject's last token and the prompt's last token.
POSITIONS: tuple[str, ...] = ("subject", "last")


def probe_sites(n_layers: int) -> tuple[str, ...]:
    """The sites probed, by layer: ``resid_pre.0`` (layer 0, the embeddings) and
    ``resid_post.{L}`` (layer ``L + 1``)."""
    return ("resid_pre.0", *(f"resid_post.{layer}" for layer in range(n_layers)))


def layer_name(layer: int) -> str:
    """How a layer index is printed: ``emb`` for 0 (the embeddings), else the number of
    blocks the residual stream has passed through."""
    return "emb" if layer == 0 else str(layer)


@dataclass(frozen=True)
class ProbePrompt:
    """One (fact, language) question prompt.

    Attributes:
        fact_id: the parallel record.
        lang: language code.
        prompt_ids: the encoded prompt (BOS included when the model uses one).
        subject_position: index in ``prompt_ids`` of the subject's last token.
    """

    fact_id: int
    lang: str
    prompt_ids: tuple[int, ...]
    subject_position: int


#: The arrays every saved :class:`Activations` has (``values_<position>`` and
#: ``tokens_<position>`` besides).
_ACTS_KEYS: tuple[str, ...] = ("sites", "fact_ids", "langs")


@dataclass(eq=False)
class Activations:
    """Activations of a set of prompts at every probed site and both positions.

    Attributes:
        sites: site names, by layer (``[S]``).
        fact_ids: ``[n]`` fact of each row.
        langs: ``[n]`` language of each row.
        values: per position, ``[S, n, d_model]`` float32.
        tokens: per position, ``[n]`` the token id read there.
    """

    sites: tuple[str, ...]
    fact_ids: Int[np.ndarray, " n"]
    langs: np.ndarray
    values: dict[str, Float[np.ndarray, "S n d"]]
    tokens: dict[str, Int[np.ndarray, " n"]]

    def __post_init__(self) -> None:
        n = len(self.fact_ids)
        if len(self.langs) != n:
            raise ValueError("Activations: one language per row")
        for position, v in self.values.items():
            if v.ndim != 3 or v.shape[0] != len(self.sites) or v.shape[1] != n:
                raise ValueError(
                    f"Activations[{position}]: expected [{len(self.sites)}, {n}, d], got "
                    f"{tuple(v.shape)}"
                )

    def __len__(self) -> int:
        return len(self.fact_ids)

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(self.values)

    def select(self, mask: np.ndarray) -> Activations:
        """The rows where ``mask`` is true (or the rows indexed by ``mask``)."""
        return Activations(
            sites=self.sites,
            fact_ids=self.fact_ids[mask],
            langs=self.langs[mask],
            values={p: v[:, mask] for p, v in self.values.items()},
            tokens={p: t[mask] for p, t in self.tokens.items()},
        )

    def by_lang(self, position: str, layer: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per language: ``(fact_ids [n_lang], X [n_lang, d])`` at one position and layer,
        rows sorted by fact id."""
        out = {}
        for lang in dict.fromkeys(self.langs.tolist()):
            rows = np.flatnonzero(self.langs == lang)
            rows = rows[np.argsort(self.fact_ids[rows], kind="stable")]
            out[str(lang)] = (self.fact_ids[rows], self.values[position][layer, rows])
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for :meth:`mlake_core.results.store.Run.save_arrays`."""
        out: dict[str, np.ndarray] = {
            "sites": np.array(self.sites),
            "fact_ids": self.fact_ids,
            "langs": np.asarray(self.langs, dtype=str),
        }
        for position in self.values:
            out[f"values_{position}"] = self.values[position]
            out[f"tokens_{position}"] = self.tokens[position]
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Activations:
        """Activations as the probe stage saved them.

        Args:
            path: one language's file (``arrays/acts_<lang>.npz``; a path ending in ``.npz``),
                or the whole
                ``probe_activations`` run folder: every language's file, concatenated in the
                run's language order (what :func:`mlake.stages.probes.activations_stage`
                returned).

        Raises:
            DataError: not a probe-activations run, a language's file missing (a run still
                going), or a file that is not activations; the message names it.
        """
        path = Path(path)
        if path.suffix == ".npz":
            return cls.from_arrays(read_arrays(path, keys=_ACTS_KEYS, what="probe activations"))
        run = read_run(path, "probe_activations")
        langs = run.meta.get("langs")
        if not langs:
            raise DataError(f"{run.json_path('meta')}: no langs recorded")
        return cls.concat(
            [
                cls.from_arrays(
                    read_arrays(
                        run.arrays_path(f"acts_{lang}"), keys=_ACTS_KEYS, what="probe activations"
                    )
                )
                for lang in langs
            ]
        )

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Activations:
        positions = [k.removeprefix("values_") for k in arrays if k.startswith("values_")]
        return cls(
            sites=tuple(str(s) for s in arrays["sites"]),
            fact_ids=np.asarray(arrays["fact_ids"], dtype=np.int64),
            langs=np.asarray(arrays["langs"], dtype=str),
            values={p: np.asarray(arrays[f"values_{p}"], dtype=np.float32) for p in positions},
            tokens={p: np.asarray(arrays[f"tokens_{p}"], dtype=np.int64) for p in positions},
        )

    @classmethod
    def concat(cls, parts: Sequence[Activations]) -> Activations:
        """Rows of several sets (same sites and positions) one after the other."""
        if not parts:
            raise ValueError("Activations.concat: nothing to concatenate")
        first = parts[0]
        if any(p.sites != first.sites or p.positions != first.positions for p in parts):
            raise ValueError("Activations.concat: sites or positions differ")
        return cls(
            sites=first.sites,
            fact_ids=np.concatenate([p.fact_ids for p in parts]),
            langs=np.concatenate([np.asarray(p.langs, dtype=str) for p in parts]),
            values={q: np.concatenate([p.values[q] for p in parts], axis=1) for q in first.values},
            tokens={q: np.concatenate([p.tokens[q] for p in parts]) for q in first.tokens},
        )


def question_prompts(
    adapter: ModelAdapter,
    views: Sequence[Any],
    template: Any,
) -> tuple[list[ProbePrompt], dict[str, int]]:
    """The question prompt of each fact view, its subject located.

    Views whose question form is not usable (no subject located, ...) are left out and counted
    by reason.

    Args:
        views: :class:`~mlake_core.data.dataset.FactView` objects.
        template: the prompt template.

    Returns:
        The prompts, in the order of ``views``, and ``{reason: count}`` of the views left out.
    """
    from mlake_core.editing.base import locate_prompt

    prompts: list[ProbePrompt] = []
    skipped: dict[str, int] = {}
    for view in views:
        try:
            loc = locate_prompt(adapter, view, template, "question")
        except MlakeError as err:
            reason = str(err).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        prompts.append(
            ProbePrompt(
                fact_id=view.fact_id,
                lang=view.lang,
                prompt_ids=tuple(loc.prompt_ids),
                subject_position=max(loc.subject_positions),
            )
        )
    return prompts, skipped


def collect_activations(
    adapter: ModelAdapter,
    prompts: Sequence[ProbePrompt],
    sites: Sequence[str] | None = None,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Activations:
    """Read the residual stream of ``prompts`` at ``sites`` (default :func:`probe_sites`), at the
    subject's last token and the prompt's last token.

    Prompts are sorted by length into left-padded batches (less padding), and the rows put
    back in the order given.

    Args:
        batch_size: prompts per forward pass.
        progress: called with the number of prompts done after each batch.

    Returns:
        :class:`Activations` in the order of ``prompts`` (float32).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    site_names = tuple(sites) if sites is not None else probe_sites(adapter.n_layers)
    n = len(prompts)
    d = adapter.d_model
    values = {p: np.zeros((len(site_names), n, d), dtype=np.float32) for p in POSITIONS}
    tokens = {p: np.zeros(n, dtype=np.int64) for p in POSITIONS}
    order = sorted(range(n), key=lambda i: (len(prompts[i].prompt_ids), i))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        batch = adapter.batch([prompts[i].prompt_ids for i in rows])
        cache = adapter.activations(batch, site_names)
        row_idx = torch.arange(len(rows))
        at = {
            "subject": torch.as_tensor(
                [batch.padded_index(r, prompts[i].subject_position) for r, i in enumerate(rows)]
            ),
            "last": batch.last_index.cpu(),
        }
        ids = batch.input_ids.cpu()
        for position, index in at.items():
            tokens[position][rows] = ids[row_idx, index].numpy()
            for s, site in enumerate(site_names):
                act = cache[site].detach().to("cpu", torch.float32)
                values[position][s, rows] = act[row_idx, index].numpy()
        if progress:
            progress(len(rows))
    return Activations(
        sites=site_names,
        fact_ids=np.array([p.fact_id for p in prompts], dtype=np.int64),
        langs=np.array([p.lang for p in prompts], dtype=str),
        values=values,
        tokens=tokens,
    )
