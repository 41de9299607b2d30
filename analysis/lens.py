"""The latent-language lens (Wendler et al. 2024, arXiv 2402.10588): in which language is a
fact's answer written, layer by layer, before the model writes it in the prompt's language?

For each fact view (a question in the *prompt language*), the residual stream leaving every
block is decoded through the model's final norm and unembedding (the logit lens:
:meth:`~mlake_core.models.adapter.BaseAdapter.logit_lens`) at two positions:

* ``subject_last``: the subject's last token (where ROME writes and tracing finds the fact);
* ``last``: the prompt's last token (where the answer is read out), after any bare space
  the prompt language's answer begins with (below).

MLaKE's answers are parallel across languages, so each view is scored on the *same answer
written in every language*: the first token with content of that language's answer, its
probability and its rank among the vocabulary at each layer.  Where the prompt language's
answer begins with a bare space token (Chinese and Japanese answers after the answer prefix,
on Gemma 3 and mlake-tiny), the space is joined to the prompt and the lens reads the position
after it; every language's answer is then the token that would follow there
(:func:`reading_tokens`).  Without this the "last position" predicts the space, and every
content token looks improbable there.
A tuned lens (Belrose et al. 2023) is not implemented yet; the logit lens is exact at the last
layer (the model's own output) and biased towards the output space before it.

Definitions (per fact view; :class:`LensSummary` averages them per prompt language):

* an answer is *decodable* at a layer when its first token ranks among the ``top_k`` most
  likely tokens there (rank ``< top_k``; rank 0 is the most likely token);
* the *emergence layer* is the first layer at which the prompt language's answer is
  decodable at the last position (``None``: at no layer);
* the *first language* is the answer language that is decodable earliest at the last
  position; a tie at that layer goes to the higher probability.  Answer languages whose first
  token is the prompt language's (``Paris`` in en, fr and de) cannot be told apart from it and
  are left out, as Wendler et al. leave out words whose English and target-language tokens
  coincide;
* the *latent English* curve of a prompt language is the mean probability of the English
  answer per layer over the facts whose English first token differs from the prompt
  language's (their number is reported).

Only facts the model answers correctly in the prompt language are looked at: the lens shows
how a known answer forms, and for an unknown one there is no answer to follow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mlake_core.editing.base import LocatedPrompt, content_start
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.results.store import read_arrays, read_run

#: The positions the lens reads, in the order of :attr:`FactLens.prob`'s first axis.
POSITIONS: tuple[str, ...] = ("subject_last", "last")

#: The arrays every saved :class:`FactLens` has.
LENS_KEYS: tuple[str, ...] = ("prob", "rank", "answer_ids", "answer_langs", "positions")


@dataclass(frozen=True)
class LensConfig:
    """Settings of the latent-language lens.

    Attributes:
        form: the prompt form read (``question``: it names the relation in every
            language).
        top_k: an answer is decodable at a layer when its first token ranks below this
            (Wendler et al. read the top token; 10 tolerates the near-synonyms and
            tokenization variants a single first token cannot cover).
    """

    form: str = "question"
    top_k: int = 10

    def __post_init__(self) -> None:
        if self.form not in ("question", "cloze"):
            raise ConfigError(f"--form {self.form!r}: choose question or cloze")
        if isinstance(self.top_k, bool) or int(self.top_k) < 1:
            raise ConfigError(f"--top-k {self.top_k}: must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FactLens:
    """The lens on one fact view.

    Attributes:
        prob: ``[position, layer, answer language]`` probability of each language's answer
            first token (positions: :data:`POSITIONS`).
        rank: the same shape: how many tokens are more likely (0: the top token).
        answer_ids: each answer language's first token.
        answer_langs: the answer languages, the prompt language among them.
        positions: the prompt positions read (``subject_last``, ``last``).
    """

    prob: np.ndarray
    rank: np.ndarray
    answer_ids: list[int]
    answer_langs: list[str]
    positions: list[int]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays for the results store (:meth:`from_arrays` inverts it)."""
        return {
            "prob": self.prob.astype(np.float32),
            "rank": self.rank.astype(np.int64),
            "answer_ids": np.asarray(self.answer_ids, dtype=np.int64),
            "answer_langs": np.asarray(self.answer_langs, dtype=str),
            "positions": np.asarray(self.positions, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> FactLens:
        return cls(
            prob=np.asarray(arrays["prob"], dtype=np.float64),
            rank=np.asarray(arrays["rank"], dtype=np.int64),
            answer_ids=[int(x) for x in arrays["answer_ids"]],
            answer_langs=[str(x) for x in arrays["answer_langs"]],
            positions=[int(x) for x in arrays["positions"]],
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactLens:
        """One fact view's lens as a lens run saved it (``arrays/lens_<lang>_<fact>.npz``).

        Raises:
            DataError: no such file, or not a fact lens (the message names the file).
        """
        return cls.from_arrays(read_arrays(path, keys=LENS_KEYS, what="a fact lens"))

    def distinct(self, prompt_lang: str) -> list[bool]:
        """Per answer language: whether its first token differs from the prompt language's
        (the prompt language itself counts as distinct)."""
        own = self.answer_ids[self.answer_langs.index(prompt_lang)]
        return [
            lang == prompt_lang or tid != own
            for lang, tid in zip(self.answer_langs, self.answer_ids, strict=True)
        ]

    def emergence_layer(self, prompt_lang: str, top_k: int) -> int | None:
        """The first layer at which the prompt language's answer is decodable at the last
        position (module docstring), ``None`` when it never is."""
        j = self.answer_langs.index(prompt_lang)
        hits = np.nonzero(self.rank[POSITIONS.index("last"), :, j] < top_k)[0]
        return int(hits[0]) if len(hits) else None

    def first_language(self, prompt_lang: str, top_k: int) -> str | None:
        """The answer language decodable earliest at the last position, among those told
        apart from the prompt language (module docstring); ``None`` when none is."""
        last = POSITIONS.index("last")
        best: tuple[int, float, str] | None = None
        for j, (lang, ok) in enumerate(
            zip(self.answer_langs, self.distinct(prompt_lang), strict=True)
        ):
            if not ok:
                continue
            hits = np.nonzero(self.rank[last, :, j] < top_k)[0]
            if not len(hits):
                continue
            layer = int(hits[0])
            key = (layer, -float(self.prob[last, layer, j]), lang)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]


def reading_tokens(
    adapter: ModelAdapter, located: LocatedPrompt, own: str, answers: Sequence[str]
) -> tuple[tuple[int, ...], list[int | None]]:
    """Where the lens reads a view, and which token of each language's answer.

    The prompt language's answer (``own``) sets the position: when it begins with
    whitespace-only tokens (a bare space before a Chinese answer), they are joined to the
    prompt, and the lens reads the position that predicts its first token with content
    (:meth:`~mlake_core.editing.base.LocatedPrompt.answer_start`).  Each answer is then
    represented by its first token with content *as it would follow there*: after the joined
    space without one (``"Cornell"``), else after the answer prefix (``" Cornell"``).

    One asymmetry remains: where the prompt language's answer has no leading space (en, fr,
    de prompts), a Chinese or Japanese answer is still represented by its first token with
    content, although after the answer prefix the model would write a bare space before it;
    so in those prompts the zh and ja curves are read one position early and understate.

    Returns:
        ``(the tokens joined to the prompt, each answer's token or None when it has none)``.
    """
    lead, own_token = located.answer_start(adapter, own)
    tokens: list[int | None] = []
    for text in answers:
        if text.strip() == own.strip():  # the prompt language's answer: the token tracing reads
            tokens.append(own_token)
            continue
        if lead:
            ids = adapter.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        else:
            ids = located.answer_ids(adapter, text)
        tokens.append(content_start(adapter, ids)[1])
    return lead, tokens


def lens_prompts(
    adapter: ModelAdapter,
    items: Sequence[tuple[Sequence[int], int, Sequence[int]]],
    batch_size: int = 16,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The lens of prompts: for each ``(prompt_ids, subject_last, answer_ids)``, the
    probability and rank (``[position, layer, answer]``, positions :data:`POSITIONS`) of
    each answer token, decoded from ``resid_post`` of every layer.

    One forward pass per batch of prompts, stopped after the last block (the model's own
    unembedding does not run); only the two positions read are decoded.
    """
    n_layers = adapter.n_layers
    sites = [f"resid_post.{layer}" for layer in range(n_layers)]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = adapter.batch([list(ids) for ids, _, _ in chunk])
        cache = adapter.activations(batch, sites)
        stacked = torch.stack([cache[s] for s in sites], dim=2)  # [row, pos, layer, d]
        for row, (ids, subject_last, answers) in enumerate(chunk):
            first = int(batch.first_index[row])
            where = torch.tensor([first + subject_last, first + len(ids) - 1])
            logits = adapter.logit_lens(stacked[row, where])  # [position, layer, vocab]
            logp = logits.log_softmax(-1)
            answer = torch.tensor(list(answers), device=logits.device)
            picked = logits[..., answer]  # [position, layer, answer]
            rank = (logits[..., None, :] > picked[..., :, None]).sum(-1)
            out.append((logp[..., answer].exp().double().cpu().numpy(), rank.long().cpu().numpy()))
    return out


@dataclass
class LensSummary:
    """The lens of one prompt language, averaged over its facts.

    Attributes:
        lang: the prompt language.
        n_facts: facts looked at.
        answer_langs: the answer languages (the columns of ``mean_prob``).
        mean_prob: per position (:data:`POSITIONS`), ``[layer][answer language]`` mean
            probability of each language's answer first token.
        decodable: the same shape: the fraction of facts where it is decodable (rank below
            ``top_k``).
        emergence: per fact with one, the emergence layer of the prompt language's answer
            (module docstring); ``never`` counts the facts without.
        first_language: how often each answer language is the first decodable one.
        latent_english: the latent English curve (mean English probability per layer at the
            last position, over ``n_english_distinct`` facts); empty for English prompts.
        n_english_distinct: facts whose English first token differs from the prompt
            language's.
    """

    lang: str
    n_facts: int
    answer_langs: list[str]
    mean_prob: dict[str, list[list[float]]]
    decodable: dict[str, list[list[float]]]
    emergence: list[int]
    never: int
    first_language: dict[str, int]
    latent_english: list[float] = field(default_factory=list)
    n_english_distinct: int = 0

    @property
    def median_emergence(self) -> float:
        """The median emergence layer over the facts with one (NaN when none has)."""
        return float(np.median(self.emergence)) if self.emergence else math.nan


def summarize_lens(
    lang: str, lenses: Sequence[FactLens], answer_langs: Sequence[str], top_k: int
) -> LensSummary:
    """Average the lenses of one prompt language's facts (module docstring)."""
    answer_langs = list(answer_langs)
    mean_prob: dict[str, list[list[float]]] = {}
    decodable: dict[str, list[list[float]]] = {}
    for i, pos in enumerate(POSITIONS):
        if lenses:
            probs = np.stack([f.prob[i] for f in lenses])
            ranks = np.stack([f.rank[i] for f in lenses])
            mean_prob[pos] = np.round(probs.mean(0), 6).tolist()
            decodable[pos] = np.round((ranks < top_k).mean(0), 6).tolist()
        else:
            mean_prob[pos], decodable[pos] = [], []
    emergence = [e for f in lenses if (e := f.emergence_layer(lang, top_k)) is not None]
    first: dict[str, int] = {}
    for f in lenses:
        which = f.first_language(lang, top_k)
        if which is not None:
            first[which] = first.get(which, 0) + 1
    latent: list[float] = []
    distinct = 0
    if lang != "en" and "en" in answer_langs:
        j = answer_langs.index("en")
        chosen = [f for f in lenses if f.distinct(lang)[j]]
        distinct = len(chosen)
        if chosen:
            last = POSITIONS.index("last")
            latent = np.round(np.stack([f.prob[last, :, j] for f in chosen]).mean(0), 6).tolist()
    return LensSummary(
        lang=lang,
        n_facts=len(lenses),
        answer_langs=answer_langs,
        mean_prob=mean_prob,
        decodable=decodable,
        emergence=emergence,
        never=len(lenses) - len(emergence),
        first_language=first,
        latent_english=latent,
        n_english_distinct=distinct,
    )


@dataclass
class LensResult:
    """What ``mlake lens`` reports (saved as the run's ``summary.json``).

    Attributes:
        langs: the prompt languages.
        n_layers: layers of the model.
        top_k: the decodability threshold used.
        summaries: one per prompt language.
        skipped: views not looked at, keyed ``lang:reason``.
        run_path: the run folder.
    """

    langs: tuple[str, ...]
    n_layers: int
    top_k: int
    summaries: list[LensSummary]
    skipped: dict[str, int]
    run_path: str

    def summary(self, lang: str) -> LensSummary:
        for s in self.summaries:
            if s.lang == lang:
                return s
        raise KeyError(lang)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["langs"] = list(self.langs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LensResult:
        return cls(
            langs=tuple(data["langs"]),
            n_layers=int(data["n_layers"]),
            top_k=int(data["top_k"]),
            summaries=[LensSummary(**s) for s in data["summaries"]],
            skipped=dict(data["skipped"]),
            run_path=str(data["run_path"]),
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> LensResult:
        """The result a lens run saved (its ``summary.json``), with :attr:`run_path` the
        folder it was read from; each fact view's lens is beside it (:meth:`FactLens.load`).

        Raises:
            DataError: not a lens run, or one that did not finish (the message names it).
        """
        run = read_run(run_dir, "lens")
        result = cls.from_dict(run.load_summary("lens summary"))
        result.run_path = str(run.path)
        return result
