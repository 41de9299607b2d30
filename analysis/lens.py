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
The logit lens is exact at the last layer (the model's own output) and biased towards the
output space before it; ``LensConfig.lens = "tuned"`` decodes through a tuned lens instead
(Belrose et al. 2023: an affine translator per layer before the final norm,
:mod:`analysis.tuned_lens`).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
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

#: The lenses: ``logit`` (the final norm and unembedding) and ``tuned`` (an affine translator
#: per layer before them, :mod:`analysis.tuned_lens`).
LENSES: tuple[str, ...] = ("logit", "tuned")

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
        lens: ``logit`` (the final norm and unembedding) or ``tuned`` (a fitted affine
            translator per layer before them, :mod:`analysis.tuned_lens`).
        method: the editing method of the lens before and after an edit (a registered
            method that changes weights), or ``none``: the fact lens alone.
        edits: edits per edit language (the first facts known there; 0: none).
        seed: the seed of the edits' random draws.
    """

    form: str = "question"
    top_k: int = 10
    lens: str = "logit"
    method: str = "none"
    edits: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.form not in ("question", "cloze"):
            raise ConfigError(f"--form {self.form!r}: choose question or cloze")
        if isinstance(self.top_k, bool) or int(self.top_k) < 1:
            raise ConfigError(f"--top-k {self.top_k}: must be at least 1")
        if self.lens not in LENSES:
            raise ConfigError(f"--lens {self.lens!r}: choose {' or '.join(LENSES)}")
        if isinstance(self.edits, bool) or int(self.edits) < 0:
            raise ConfigError(f"--edits {self.edits}: must be 0 or more")

    @property
    def measures_edits(self) -> bool:
        """Whether the lens before and after an edit is measured (``method`` not ``none``
        and ``edits`` above 0)."""
        return self.method != "none" and self.edits > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fact_key(self) -> dict[str, Any]:
        """The settings that key the per-fact lens run: ``form`` and ``top_k``, and ``lens``
        when it is not the logit lens (so logit-lens runs keep the key they had before the
        option existed); the edit settings key the edit lens's own run."""
        key: dict[str, Any] = {"form": self.form, "top_k": self.top_k}
        if self.lens != "logit":
            key["lens"] = self.lens
        return key


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
        return emergence(self.rank[POSITIONS.index("last"), :, j], top_k)

    def first_language(self, prompt_lang: str, top_k: int) -> str | None:
        """The answer language decodable earliest at the last position, among those told
        apart from the prompt language (module docstring); ``None`` when none is."""
        last = POSITIONS.index("last")
        return first_decodable(
            self.rank[last], self.prob[last], self.answer_langs, self.distinct(prompt_lang), top_k
        )


def emergence(ranks: np.ndarray, top_k: int) -> int | None:
    """The emergence rule (module docstring), the one every lens uses: the first layer whose
    rank (``ranks``: one per layer) is below ``top_k``, ``None`` when none is."""
    hits = np.nonzero(np.asarray(ranks) < top_k)[0]
    return int(hits[0]) if len(hits) else None


def first_decodable(
    ranks: np.ndarray, probs: np.ndarray, langs: Sequence[str], keep: Sequence[bool], top_k: int
) -> str | None:
    """The first-language rule (module docstring): among the answer languages kept
    (``keep``), the one decodable at the earliest layer (``ranks``, ``probs``:
    ``[layer, language]``), a tie going to the higher probability; ``None`` when none is."""
    best: tuple[int, float, str] | None = None
    for j, (lang, ok) in enumerate(zip(langs, keep, strict=True)):
        if not ok:
            continue
        layer = emergence(ranks[:, j], top_k)
        if layer is None:
            continue
        key = (layer, -float(probs[layer, j]), lang)
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
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The lens of prompts: for each ``(prompt_ids, subject_last, answer_ids)``, the
    probability and rank (``[position, layer, answer]``, positions :data:`POSITIONS`) of
    each answer token, decoded from ``resid_post`` of every layer.

    One forward pass per batch of prompts, stopped after the last block (the model's own
    unembedding does not run); only the two positions read are decoded, by ``decode``
    (states ``[position, layer, d]`` to logits; default the logit lens,
    :meth:`~mlake_core.models.adapter.BaseAdapter.logit_lens`; a tuned lens:
    :meth:`analysis.tuned_lens.TunedLens.decoder`).
    """
    decode = decode or adapter.logit_lens
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
            logits = decode(stacked[row, where])  # [position, layer, vocab]
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
        lens: ``logit`` or ``tuned`` (runs saved before the option: ``logit``).
        tuned: for the tuned lens, its fit and validation
            (:meth:`analysis.tuned_lens.TunedLens.report`: the split, the settings, the
            held-out KL to the last layer per layer, tuned and logit lens); else empty.
    """

    langs: tuple[str, ...]
    n_layers: int
    top_k: int
    summaries: list[LensSummary]
    skipped: dict[str, int]
    run_path: str
    lens: str = "logit"
    tuned: dict[str, Any] = field(default_factory=dict)

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
            lens=str(data.get("lens", "logit")),
            tuned=dict(data.get("tuned") or {}),
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


# -- the lens before and after an edit ----------------------------------------------------------
#
# An edit of fact ``f`` in the *edit language* A (a weight edit: ROME, MEMIT, FT) is looked at
# through the lens in every *test language* B, before and after it: per layer and position,
# the probability and rank of the edit's *new* answer and of the fact's *old* answer, each
# written in every language (MLaKE's new answers are parallel too).  The definitions are the
# fact lens's, applied to the new answer after the edit: its *emergence layer* in B is the
# first layer at which the new answer written in B is decodable at B's last position
# (:func:`emergence`); its *first language* is the language whose form of the new answer is
# decodable there earliest (:func:`first_decodable`; forms whose first token is B's form's are
# left out).  The edit *succeeds* in B when, after it, the new answer's B form is B's top token
# at the last layer and position (the criterion of :mod:`analysis.patching`).  A test language
# whose new and old answers begin with the same token is not read (their curves would be one).

#: The answer kinds of an edit lens, in the order of :attr:`EditLens.prob`'s kind axis.
EDIT_KINDS: tuple[str, ...] = ("new", "old")
#: The phases of an edit lens, in the order of its phase axis.
PHASES: tuple[str, ...] = ("before", "after")
#: The arrays every saved :class:`EditLens` has.
EDIT_LENS_KEYS: tuple[str, ...] = (
    "prob",
    "rank",
    "answer_ids",
    "answer_langs",
    "test_langs",
    "positions",
    "known_before",
    "edit_lang",
    "fact_id",
)


@dataclass
class EditLens:
    """The lens of one edit (fact ``fact_id`` edited in ``edit_lang``) in every test language,
    before and after the edit: the per-edit, per-test-language arrays the failure
    classification (issue 21 part 3) reads.

    Attributes:
        prob: ``[test language, phase, position, layer, kind, answer language]``: the
            probability of each kind's (:data:`EDIT_KINDS`: new, old) answer written in each
            answer language, read on the test language's prompt, before and after the edit
            (:data:`PHASES`), at each position (:data:`POSITIONS`) and layer.
        rank: the same shape: how many tokens are more likely (0: the top token).
        answer_ids: ``[test language, kind, answer language]``: the token read (it depends on
            the test language's reading position, :func:`reading_tokens`).
        answer_langs: the answer languages (the last axis).
        test_langs: the test languages read (the first axis).
        positions: ``[test language, 2]``: the positions read in its prompt.
        known_before: per test language, whether the unedited model answered the fact there.
        edit_lang: the edit language.
        fact_id: the fact edited.
    """

    prob: np.ndarray
    rank: np.ndarray
    answer_ids: np.ndarray
    answer_langs: list[str]
    test_langs: list[str]
    positions: np.ndarray
    known_before: list[bool]
    edit_lang: str
    fact_id: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays for the results store (:meth:`from_arrays` inverts it)."""
        return {
            "prob": self.prob.astype(np.float32),
            "rank": self.rank.astype(np.int64),
            "answer_ids": np.asarray(self.answer_ids, dtype=np.int64),
            "answer_langs": np.asarray(self.answer_langs, dtype=str),
            "test_langs": np.asarray(self.test_langs, dtype=str),
            "positions": np.asarray(self.positions, dtype=np.int64),
            "known_before": np.asarray(self.known_before, dtype=bool),
            "edit_lang": np.asarray(self.edit_lang, dtype=str),
            "fact_id": np.asarray(self.fact_id, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> EditLens:
        return cls(
            prob=np.asarray(arrays["prob"], dtype=np.float64),
            rank=np.asarray(arrays["rank"], dtype=np.int64),
            answer_ids=np.asarray(arrays["answer_ids"], dtype=np.int64),
            answer_langs=[str(x) for x in arrays["answer_langs"]],
            test_langs=[str(x) for x in arrays["test_langs"]],
            positions=np.asarray(arrays["positions"], dtype=np.int64),
            known_before=[bool(x) for x in arrays["known_before"]],
            edit_lang=str(np.asarray(arrays["edit_lang"])),
            fact_id=int(np.asarray(arrays["fact_id"])),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditLens:
        """One edit's lens as a lens-edit run saved it (``arrays/edit_<lang>_<fact>.npz``).

        Raises:
            DataError: no such file, or not an edit lens (the message names the file).
        """
        return cls.from_arrays(read_arrays(path, keys=EDIT_LENS_KEYS, what="an edit lens"))

    def _index(self, test: str, kind: str, phase: str, position: str) -> tuple[int, ...]:
        return (
            self.test_langs.index(test),
            PHASES.index(phase),
            POSITIONS.index(position),
            EDIT_KINDS.index(kind),
        )

    def curve(
        self,
        test: str,
        kind: str = "new",
        phase: str = "after",
        position: str = "last",
        form: str | None = None,
        what: str = "prob",
    ) -> np.ndarray:
        """One curve by layer: the probability (``what="prob"``) or rank of the ``kind``
        answer written in ``form`` (default: the test language's own form) on ``test``'s
        prompt, in ``phase`` at ``position``."""
        t, ph, pos, k = self._index(test, kind, phase, position)
        j = self.answer_langs.index(form or test)
        return (self.prob if what == "prob" else self.rank)[t, ph, pos, :, k, j]

    def distinct(self, test: str, kind: str = "new") -> list[bool]:
        """Per answer language: whether the ``kind`` answer's form there begins with a token
        other than the test language's form (the test language itself counts as distinct)."""
        t, k = self.test_langs.index(test), EDIT_KINDS.index(kind)
        ids = self.answer_ids[t, k]
        own = ids[self.answer_langs.index(test)]
        return [
            lang == test or int(tid) != int(own)
            for lang, tid in zip(self.answer_langs, ids, strict=True)
        ]

    def emergence_layer(
        self, test: str, top_k: int, kind: str = "new", phase: str = "after"
    ) -> int | None:
        """The emergence layer (:func:`emergence`) of the ``kind`` answer's ``test`` form at
        ``test``'s last position, in ``phase``."""
        return emergence(self.curve(test, kind, phase, what="rank"), top_k)

    def first_language(
        self, test: str, top_k: int, kind: str = "new", phase: str = "after"
    ) -> str | None:
        """The language whose form of the ``kind`` answer is decodable earliest at ``test``'s
        last position in ``phase`` (:func:`first_decodable`)."""
        t, ph, pos, k = self._index(test, kind, phase, "last")
        return first_decodable(
            self.rank[t, ph, pos, :, k],
            self.prob[t, ph, pos, :, k],
            self.answer_langs,
            self.distinct(test, kind),
            top_k,
        )

    def success(self, test: str) -> bool:
        """Whether the edit succeeds in ``test``: after it, the new answer's ``test`` form is
        the top token at the last layer and position."""
        return bool(self.curve(test, "new", "after", what="rank")[-1] == 0)


def lens_edit(
    adapter: ModelAdapter,
    applied: Callable[[], AbstractContextManager[Any]],
    items: Sequence[tuple[Sequence[int], int, Sequence[int]]],
    batch_size: int = 16,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    before: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """The lens of prompts (:func:`lens_prompts`) before an edit and inside ``applied()`` (the
    edit applied for a ``with`` block, ``functools.partial(edit.applied, adapter)``, which
    leaves the model as it was).  ``before``: the unedited lens of the same items when already
    measured (it does not depend on the edit).

    Returns:
        ``(before, after)``, each one ``(prob, rank)`` per item.
    """
    if before is None:
        before = lens_prompts(adapter, items, batch_size, decode)
    with applied():
        after = lens_prompts(adapter, items, batch_size, decode)
    return list(before), after


def edit_lens_arrays(
    before: Sequence[tuple[np.ndarray, np.ndarray]],
    after: Sequence[tuple[np.ndarray, np.ndarray]],
    n_langs: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack :func:`lens_edit`'s per-test-language ``(prob, rank)`` (answers ordered new
    answer in every language, then old answer in every language) into :class:`EditLens`'s
    ``[test, phase, position, layer, kind, answer language]`` arrays."""

    def stack(i: int) -> np.ndarray:
        per_test = []
        for b, a in zip(before, after, strict=True):
            both = np.stack([b[i], a[i]])  # [phase, position, layer, answer]
            per_test.append(both.reshape(*both.shape[:3], len(EDIT_KINDS), n_langs))
        return np.stack(per_test)

    return stack(0), stack(1)


@dataclass
class EditLensSummary:
    """The lens of the edits of one edit language, read in one test language.

    Attributes:
        edit_lang: A.
        test_lang: B.
        n_edits: edits read in B.
        n_success: of them, edits that succeed in B (:meth:`EditLens.success`).
        n_known_before: of them, facts the unedited model answered in B.
        mean_prob: per position, per curve (``new_before``, ``new_after``, ``old_before``,
            ``old_after``: the answer's B form), the mean probability by layer.
        decodable: the same: the fraction of edits where it is decodable.
        emergence: the new answer's emergence layers in B after the edit (edits with one);
            ``never`` counts the edits without.
        first_language: after the edit, how often each language's form of the new answer is
            the first decodable one.
        other_form_first: edits whose first decodable form of the new answer is not B's.
        new_forms_after: the new answer's mean probability by layer at B's last position
            after the edit, per answer language (``[layer][answer language]``).
        emerged_before: edits whose new answer (B form) was already decodable at some layer
            before the edit (its emergence is then not the edit's doing).
    """

    edit_lang: str
    test_lang: str
    n_edits: int
    n_success: int
    n_known_before: int
    mean_prob: dict[str, dict[str, list[float]]]
    decodable: dict[str, dict[str, list[float]]]
    emergence: list[int]
    never: int
    first_language: dict[str, int]
    other_form_first: int
    new_forms_after: list[list[float]] = field(default_factory=list)
    emerged_before: int = 0

    @property
    def median_emergence(self) -> float:
        return float(np.median(self.emergence)) if self.emergence else math.nan


#: The curves of :attr:`EditLensSummary.mean_prob` (kind, phase).
EDIT_CURVES: tuple[tuple[str, str], ...] = (
    ("new", "before"),
    ("new", "after"),
    ("old", "before"),
    ("old", "after"),
)


def summarize_edit_lens(
    edit_lang: str, test_lang: str, lenses: Sequence[EditLens], top_k: int
) -> EditLensSummary:
    """Average the lenses of one edit language's edits read in one test language (the
    definitions above :data:`EDIT_KINDS`)."""
    rows = [e for e in lenses if test_lang in e.test_langs]
    mean_prob: dict[str, dict[str, list[float]]] = {}
    decodable: dict[str, dict[str, list[float]]] = {}
    for pos in POSITIONS:
        mean_prob[pos], decodable[pos] = {}, {}
        for kind, phase in EDIT_CURVES:
            name = f"{kind}_{phase}"
            if not rows:
                mean_prob[pos][name], decodable[pos][name] = [], []
                continue
            p = np.stack([e.curve(test_lang, kind, phase, pos) for e in rows])
            r = np.stack([e.curve(test_lang, kind, phase, pos, what="rank") for e in rows])
            mean_prob[pos][name] = np.round(p.mean(0), 6).tolist()
            decodable[pos][name] = np.round((r < top_k).mean(0), 6).tolist()
    emerged = [x for e in rows if (x := e.emergence_layer(test_lang, top_k)) is not None]
    first: dict[str, int] = {}
    for e in rows:
        which = e.first_language(test_lang, top_k)
        if which is not None:
            first[which] = first.get(which, 0) + 1
    forms: list[list[float]] = []
    if rows:
        t = [e.test_langs.index(test_lang) for e in rows]
        last, after, new = POSITIONS.index("last"), PHASES.index("after"), EDIT_KINDS.index("new")
        stacked = np.stack(
            [e.prob[i, after, last, :, new, :] for e, i in zip(rows, t, strict=True)]
        )
        forms = np.round(stacked.mean(0), 6).tolist()
    return EditLensSummary(
        edit_lang=edit_lang,
        test_lang=test_lang,
        n_edits=len(rows),
        n_success=sum(e.success(test_lang) for e in rows),
        n_known_before=sum(e.known_before[e.test_langs.index(test_lang)] for e in rows),
        mean_prob=mean_prob,
        decodable=decodable,
        emergence=emerged,
        never=len(rows) - len(emerged),
        first_language=first,
        other_form_first=sum(n for lang, n in first.items() if lang != test_lang),
        new_forms_after=forms,
        emerged_before=sum(
            e.emergence_layer(test_lang, top_k, phase="before") is not None for e in rows
        ),
    )


@dataclass
class EditLensResult:
    """The lens before and after edits (saved as a lens-edit run's ``summary.json``; each
    edit's :class:`EditLens` is beside it, ``arrays/edit_<A>_<fact>.npz``).

    Attributes:
        langs: the languages (edit and test languages range over them).
        method: the editing method.
        n_layers: layers of the model.
        top_k: the decodability threshold.
        lens: ``logit`` or ``tuned``.
        pairs: ``pairs[A][B]``: the :class:`EditLensSummary` of A's edits read in B.
        edits: per edit language, the facts edited (in order).
        skipped: edits or test languages not read, keyed ``what:lang:reason``.
        run_path: the run folder.
    """

    langs: tuple[str, ...]
    method: str
    n_layers: int
    top_k: int
    lens: str
    pairs: dict[str, dict[str, EditLensSummary]]
    edits: dict[str, list[int]]
    skipped: dict[str, int]
    run_path: str

    def pair(self, edit_lang: str, test_lang: str) -> EditLensSummary:
        return self.pairs[edit_lang][test_lang]

    def lenses(self, edit_lang: str) -> Iterator[EditLens]:
        """The saved per-edit lenses of one edit language (read from :attr:`run_path`)."""
        from pathlib import Path

        for fact_id in self.edits.get(edit_lang, []):
            yield EditLens.load(Path(self.run_path) / "arrays" / f"edit_{edit_lang}_{fact_id}.npz")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["langs"] = list(self.langs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditLensResult:
        return cls(
            langs=tuple(data["langs"]),
            method=str(data["method"]),
            n_layers=int(data["n_layers"]),
            top_k=int(data["top_k"]),
            lens=str(data["lens"]),
            pairs={
                a: {b: EditLensSummary(**s) for b, s in row.items()}
                for a, row in data["pairs"].items()
            },
            edits={a: [int(f) for f in fs] for a, fs in data["edits"].items()},
            skipped=dict(data["skipped"]),
            run_path=str(data["run_path"]),
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> EditLensResult:
        """The result a lens-edit run saved (its ``summary.json``), with :attr:`run_path` the
        folder it was read from.

        Raises:
            DataError: not a lens-edit run, or one that did not finish (naming it).
        """
        run = read_run(run_dir, "lens_edits")
        result = cls.from_dict(run.load_summary("lens-edit summary"))
        result.run_path = str(run.path)
        return result
