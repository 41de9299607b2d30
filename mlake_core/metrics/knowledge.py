"""What a model knows: every knowledge measure of mlake, computed the same way for every
language, prompt form and backend.

For one model and a list of fact views, :func:`measure_knowledge` measures, in the question
form and (where it is well-posed) the cloze form:

``target_logp`` / ``target_logp_mean`` / ``target_tokens``
    Sequence log-probability (natural log) of the original answer after the prompt, summed
    over its tokens and per token.  Prompt and answer are tokenized separately and joined by
    token ids (:mod:`mlake_core.models.prompting`); first-token probabilities are not used
    because a byte-level BPE can split a CJK answer's first character across tokens
    (QwenLM/Qwen#284).
``edit_logp`` / ``edit_logp_mean`` / ``edit_tokens``
    The same for the edit target (the counterfactual answer an edit installs).
``target_alias_logp`` / ``edit_alias_logp``
    Alias-aware: log of the **sum** of the sequence probabilities of every form of the answer
    (answer and aliases, duplicates by token ids removed).  An answer counts through any alias.
``prefers_original``
    ``target_alias_logp > edit_alias_logp``: the model prefers the original fact to the edit.
    ``None`` (not measurable) on a view whose dataset gives no original answer
    (:func:`no_original_answer`), never a number.
``greedy_text`` / ``greedy_match``
    Greedy generation after the prompt, cut at the template's stop strings and EOS, matched
    against both answers' forms after NFKC normalization and case and width folding: the
    generation must start with a form (at a word boundary in spaced languages).
    ``greedy_match`` is ``original``, ``edit`` or ``none`` (the longest matching form wins).
``mcqa_correct`` / ``mcqa_correct_norm``
    Multiple choice (v2024-04 only, question form): every option is scored as a target after
    the question prompt; the prediction is the option with the highest summed log-probability
    (``mcqa_correct``) or per-token mean (``mcqa_correct_norm``, length-normalized).
    :func:`score_mcqa` scores any multiple-choice question the same way, and also by the
    letter chosen with the options in the prompt (edit evaluation, ``--protocol mlake``).

A fact is **known** in a language when its question form is answered correctly by greedy alias
match (``greedy_match == "original"``); :meth:`KnowledgeResult.known` gives those facts.

All scoring is batched: every (prompt, answer form) sequence of all views goes into one list,
sorted by length and run in batches of ``batch_size`` (position ids come from the attention
mask, so a padded row scores exactly as it would alone).  Where the model's attention cache
can be continued (:meth:`~mlake_core.models.adapter.ModelAdapter.run_with_past`; every
full-attention model), each distinct prompt runs once and its answers continue its keys and
values, prompts sharing a token prefix (a few-shot template's or an in-context edit's
demonstrations) are batched together and the prefix runs once per batch
(:func:`prompt_batches`), greedy generation decodes one token per pass, and no logits are computed for
prompt positions but the last.  The results are those of full runs up to float rounding (in
float32 the same greedy answers, log-probabilities within about 1e-5; in bfloat16 or float16
rounding can flip a near-tied greedy choice, and ``kv_cache`` is not part of any result key).
Models whose cache cannot be cropped (sliding-window or recurrent layers; found on the first
pass and remembered for the adapter) and ``kv_cache=False`` run every sequence whole.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mlake_core.configs import coerce_fields
from mlake_core.data.dataset import FactView, PromptForm
from mlake_core.data.external import ExternalView
from mlake_core.data.records import MCQA_LETTERS
from mlake_core.data.text import is_cjk, normalize
from mlake_core.errors import ConfigError, DataError
from mlake_core.languages import LANGUAGES, is_unspaced
from mlake_core.models.adapter import ModelAdapter, PastKeyValues
from mlake_core.models.prompting import PromptTemplate
from mlake_core.results.store import read_run

#: Prompt forms measured, in order.
FORMS: tuple[str, ...] = ("question", "cloze")

#: Columns of the per-view table, in order (see the module docstring for their meaning).
COLUMNS: tuple[str, ...] = (
    "fact_id",
    "lang",
    "form",
    "prompt",
    "target",
    "edit_target",
    "prompt_tokens",
    "target_tokens",
    "target_logp",
    "target_logp_mean",
    "edit_tokens",
    "edit_logp",
    "edit_logp_mean",
    "target_alias_logp",
    "edit_alias_logp",
    "n_target_forms",
    "n_edit_forms",
    "prefers_original",
    "greedy_text",
    "greedy_match",
    "mcqa_correct",
    "mcqa_correct_norm",
)

#: The columns that identify a knowledge table's rows: a saved table without them is not a
#: knowledge table (loading refuses it, naming the file).
KEY_COLUMNS: tuple[str, ...] = ("fact_id", "lang", "form")


@dataclass(frozen=True)
class KnowledgeConfig:
    """Method settings of the knowledge measurement.

    Attributes:
        forms: which prompt forms to measure (the cloze form only where well-posed).
        max_new_tokens: greedy generation length.  Generation stops early once every row has
            produced EOS or a stop string.
        mcqa: score multiple-choice options when the views have them (v2024-04).
        stop_when_decided: also stop a row once no continuation can change which answer its
            text gives (:func:`answer_decided`): the same ``greedy_match`` in every row, but
            ``greedy_text`` ends where that was decided.  Off by default (the whole text is
            kept); edit evaluation can turn it on (``TransferConfig.stop_when_decided``).
    """

    forms: tuple[str, ...] = FORMS
    max_new_tokens: int = 24
    mcqa: bool = True
    stop_when_decided: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)
        if isinstance(self.forms, str):
            object.__setattr__(self, "forms", tuple(f.strip() for f in self.forms.split(",")))
        object.__setattr__(self, "forms", tuple(self.forms))
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ConfigError(f"--forms {','.join(self.forms)}: choose from {', '.join(FORMS)}")
        if int(self.max_new_tokens) < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["forms"] = list(self.forms)
        if not self.stop_when_decided:  # added later: earlier runs' keys stay valid
            del out["stop_when_decided"]
        return out


@dataclass(frozen=True)
class SequenceScore:
    """Log-probability of one target sequence after one prompt.

    Attributes:
        logp: summed natural-log probability of the target tokens.
        n_tokens: number of target tokens.
    """

    logp: float
    n_tokens: int

    @property
    def mean(self) -> float:
        """Per-token log-probability."""
        return self.logp / self.n_tokens if self.n_tokens else float("nan")


#: The shortest token prefix shared by every prompt of a batch that is run once for the batch
#: (and its keys and values copied to every row); shorter ones are run in every row.
MIN_SHARED_PREFIX = 8


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens every sequence shares."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs[1:]):
            return k
    return n


def prompt_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of at most ``batch_size`` for cached prompt passes,
    so that prompts sharing a long token prefix run together and the prefix once per batch.

    Prompts are grouped by a shared prefix of at least :data:`MIN_SHARED_PREFIX` tokens (a
    few-shot template's demonstrations: one group per language and prompt form).  Every group
    of two or more gets batches of its own, however small (an edit's evaluation asks a few
    prompts per language, and running their demonstrations once is what saves); prompts that
    share no such prefix with another are pooled.  Within a group and the pool, shorter
    prompts come first (less padding).
    """
    lex = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[list[int]] = []
    for i in lex:
        # Sorted order: the prefix shared with the group's first prompt is the smallest of
        # the prefixes adjacent prompts share.
        if groups and _common_prefix_length([prompts[groups[-1][-1]], prompts[i]]) >= (
            MIN_SHARED_PREFIX
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    big = [g for g in groups if len(g) >= 2]
    pool = [i for g in groups if len(g) < 2 for i in g]
    out: list[list[int]] = []
    for group in [*big, pool]:
        group = sorted(group, key=lambda i: len(prompts[i]))
        out += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return out


def _prompt_pass(adapter: ModelAdapter, prompts: Sequence[Sequence[int]]) -> tuple[Any, Any]:
    """Run prompts once, left-padded: the logits of each prompt's last token ``[n, vocab]``
    and the keys and values of every prompt position (:class:`PastKeyValues`).

    A token prefix shared by every prompt (at least :data:`MIN_SHARED_PREFIX` tokens, and at
    least one token short of the shortest prompt) runs once and its keys and values are copied
    to every row; on a model with sliding-window layers only when the longest prompt fits in
    the window (the rests' left padding would otherwise make the continuation inexact).

    Raises:
        NotImplementedError: the model's cache cannot be continued (callers run full passes).
    """
    shared = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    past: PastKeyValues | None = None
    # Left-padded rests after a shared prefix put padding between a row's tokens; a sliding
    # window then stays exact only while the longest prompt fits in it (else: no sharing).
    window = adapter.info.sliding_window
    fits = window is None or max(len(p) for p in prompts) <= window
    if len(prompts) > 1 and shared >= MIN_SHARED_PREFIX and fits:
        _, one = adapter.run_with_past(adapter.batch([prompts[0][:shared]]), last_only=True)
        past = one.select(torch.zeros(len(prompts), dtype=torch.long))
        prompts = [p[shared:] for p in prompts]
    logits, past = adapter.run_with_past(
        adapter.batch(prompts, padding_side="left"), last_only=True, past=past
    )
    return logits[:, -1], past


class PromptPasses:
    """The prompt pass (:func:`_prompt_pass`) of the last batch, for :func:`score_sequences`
    and :func:`greedy_generate` run one after the other on the same prompts
    (:func:`measure_knowledge`): the second reuses the first's logits, keys and values
    instead of running the prompts again.  Holds one batch (its keys and values are what
    costs memory); a batch of other prompts replaces it."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, ...], ...] | None = None
        self._value: tuple[Any, Any] | None = None

    def get(self, adapter: ModelAdapter, prompts: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        """``_prompt_pass(adapter, prompts)``, from the last call when its prompts were these."""
        key = tuple(tuple(p) for p in prompts)
        if key != self._key or self._value is None:
            self._key, self._value = None, None  # free the last batch first
            self._value = _prompt_pass(adapter, prompts)
            self._key = key
        return self._value


def score_sequences(
    adapter: ModelAdapter,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    kv_cache: bool = True,
    passes: PromptPasses | None = None,
) -> list[SequenceScore]:
    """Sequence log-probabilities of targets after prompts, batched.

    With ``kv_cache`` (and a model whose cache can be continued), each distinct prompt runs
    once, ``batch_size`` prompts per pass (a prefix shared by all of them once), and its
    targets continue its keys and values, ``batch_size`` targets per pass; no logits are
    computed for prompt positions but the last.  Otherwise every (prompt + target) sequence runs
    whole, ``batch_size`` per pass, right-padded.  Both give the same scores up to float
    rounding.

    Args:
        adapter: the model.
        pairs: ``(prompt ids, target ids)``; prompt ids include BOS when the model uses one;
            target ids are non-empty.
        batch_size: sequences per forward pass.
        progress: called with the number of sequences finished after each batch.
        kv_cache: continue prompts' keys and values (see above).
        passes: where a prompt pass is kept for a :func:`greedy_generate` of the same
            prompts to reuse (:class:`PromptPasses`).

    Returns:
        One :class:`SequenceScore` per pair, in order.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    for i, (prompt, target) in enumerate(pairs):
        if not prompt or not target:
            raise ValueError(f"pair {i}: empty prompt or target")
    if kv_cache and pairs and _cache_continues(adapter):
        try:
            return _score_cached(adapter, pairs, batch_size, progress, passes)
        except NotImplementedError:
            _no_cache(adapter)  # fails on the first pass: nothing was reported yet
    return _score_full(adapter, pairs, batch_size, progress)


def _cache_continues(adapter: ModelAdapter) -> bool:
    """Whether the model's cache can be continued, as far as known (not yet tried: yes)."""
    return not getattr(adapter, "_no_kv_cache", False)


def _no_cache(adapter: ModelAdapter) -> None:
    """Remember that the model's cache cannot be continued (``PastKeyValues.from_hf`` fails
    on the first pass): later calls go straight to full runs."""
    try:
        adapter._no_kv_cache = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


def _score_cached(
    adapter: ModelAdapter,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    progress: Callable[[int], None] | None,
    passes: PromptPasses | None = None,
) -> list[SequenceScore]:
    """:func:`score_sequences` by prompt: one prompt pass, then the targets continue it."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    distinct = list(by_prompt)
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    for indices in prompt_batches(distinct, batch_size):
        chunk = [distinct[i] for i in indices]
        last, past = (
            passes.get(adapter, chunk) if passes is not None else _prompt_pass(adapter, chunk)
        )
        first_logp = last.float().log_softmax(-1)
        rest: list[tuple[int, int]] = []  # (pair, prompt row) of targets longer than a token
        members_first: list[tuple[int, int, int]] = []  # (pair, prompt row, first token)
        for row, prompt in enumerate(chunk):
            for i in by_prompt[prompt]:
                target = pairs[i][1]
                members_first.append((i, row, target[0]))
                if len(target) > 1:
                    rest.append((i, row))
        # One gather (one device transfer) for every pair's first token.
        picked_first = first_logp[
            torch.tensor([row for _, row, _ in members_first], device=first_logp.device),
            torch.tensor([tok for _, _, tok in members_first], device=first_logp.device),
        ]
        sums[torch.tensor([i for i, _, _ in members_first])] = picked_first.double().cpu()
        rest.sort(key=lambda item: len(pairs[item[0]][1]))
        for sub in range(0, len(rest), batch_size):
            members = rest[sub : sub + batch_size]
            rows_past = past.select(torch.tensor([row for _, row in members]))
            # Target tokens but the last, right-padded: position k predicts token k + 1.
            batch = adapter.batch([pairs[i][1][:-1] for i, _ in members], padding_side="right")
            final, _, _ = adapter.final_states(batch, past=rows_past)
            rows, cols, ids, owner = [], [], [], []
            for r, (i, _) in enumerate(members):
                for k, token in enumerate(pairs[i][1][1:]):
                    rows.append(r)
                    cols.append(k)
                    ids.append(token)
                    owner.append(i)
            sums.index_add_(0, torch.tensor(owner), _token_logp(adapter, final, rows, cols, ids))
        if progress:
            progress(sum(len(by_prompt[p]) for p in chunk))
    return [SequenceScore(float(sums[i]), len(target)) for i, (_, target) in enumerate(pairs)]


def _token_logp(
    adapter: ModelAdapter, final: Any, rows: list[int], cols: list[int], ids: list[int]
) -> Any:
    """Log-probability of token ``ids[j]`` after the last block's output
    ``final[rows[j], cols[j]]`` for every ``j`` (float64, on the CPU): only those positions
    are read, a chunk of the vocabulary at a time (``adapter.readout_logprobs``), so no
    ``[rows, pos, vocab]`` logits are computed."""
    states = final[torch.tensor(rows, device=final.device), torch.tensor(cols, device=final.device)]
    return adapter.readout_logprobs(states, torch.tensor(ids)).double().cpu()


def _score_full(
    adapter: ModelAdapter,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> list[SequenceScore]:
    """:func:`score_sequences` with every sequence run whole (right padding)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[SequenceScore | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seqs = []
        for i in chunk:
            prompt, target = pairs[i]
            seqs.append([*prompt, *target])
        batch = adapter.batch(seqs, padding_side="right")
        final, _, _ = adapter.final_states(batch)
        rows, cols, ids, owner = [], [], [], []
        for row, i in enumerate(chunk):
            prompt, target = pairs[i]
            for k, token in enumerate(target):
                rows.append(row)
                cols.append(len(prompt) - 1 + k)  # position predicting target token k
                ids.append(token)
                owner.append(row)
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, torch.tensor(owner), _token_logp(adapter, final, rows, cols, ids)
        )
        for row, i in enumerate(chunk):
            out[i] = SequenceScore(float(sums[row]), len(pairs[i][1]))
        if progress:
            progress(len(chunk))
    return [s for s in out if s is not None]


def greedy_generate(
    adapter: ModelAdapter,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    kv_cache: bool = True,
    passes: PromptPasses | None = None,
    decided: Sequence[Callable[[str], bool] | None] | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, batched with left padding.

    With ``kv_cache`` (and a model whose cache can be continued), the prompts run once (a
    prefix shared by the whole batch once) and each step runs only the new token of every row
    still generating, continuing the keys and values.  Otherwise each step runs the whole
    (padded) sequence through :meth:`ModelAdapter.forward`, which works on every backend and
    architecture.  A row stops at EOS or once its decoded text contains a stop string; the
    batch stops when every row has.  ``passes`` (:class:`PromptPasses`) gives a batch's
    prompt pass when a :func:`score_sequences` of the same prompts has just run it.
    ``decided[i]``, when given, also stops prompt ``i``'s row once it returns true for the
    decoded text (:func:`answer_decided`).

    Returns:
        The generated token ids of each prompt (EOS excluded).
    """
    eos = adapter.tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]

    def finished(i: int, token: int) -> bool:
        """Append ``token`` to prompt ``i``'s output unless it is EOS; whether it is done."""
        if eos is not None and token == eos:
            return True
        out[i].append(token)
        text = adapter.tokenizer.decode(out[i], skip_special_tokens=True)
        check = decided[i] if decided is not None else None
        return any(s in text for s in stop) or (check is not None and check(text))

    cached = kv_cache and max_new_tokens > 0 and _cache_continues(adapter)
    if cached:  # prompts sharing a prefix together (it runs once per batch)
        chunks = prompt_batches(prompts, batch_size)
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        chunks = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    for chunk in chunks:
        if kv_cache and max_new_tokens > 0 and _cache_continues(adapter):
            try:
                chunk_prompts = [prompts[i] for i in chunk]
                if passes is not None:
                    last, past = passes.get(adapter, chunk_prompts)
                else:
                    last, past = _prompt_pass(adapter, chunk_prompts)
            except NotImplementedError:
                _no_cache(adapter)  # a cache that cannot be continued: full runs from here on
                kv_cache = False
            else:
                active = list(range(len(chunk)))
                for step in range(max_new_tokens):
                    nxt = last.argmax(-1).tolist()
                    keep = [k for k, row in enumerate(active) if not finished(chunk[row], nxt[k])]
                    if not keep or step == max_new_tokens - 1:
                        break
                    if len(keep) < len(active):
                        past = past.select(torch.tensor(keep))
                        active = [active[k] for k in keep]
                    batch = adapter.batch([out[chunk[row]][-1:] for row in active])
                    logits, past = adapter.run_with_past(batch, last_only=True, past=past)
                    last = logits[:, -1]
                if progress:
                    progress(len(chunk))
                continue
        seqs = [list(prompts[i]) for i in chunk]
        active = list(range(len(chunk)))  # rows still generating; only they are run
        for _ in range(max_new_tokens):
            batch = adapter.batch([seqs[row] for row in active], padding_side="left")
            nxt = adapter.forward(batch)[:, -1].argmax(-1).tolist()
            still = []
            for row, token in zip(active, nxt, strict=True):
                if not finished(chunk[row], token):
                    seqs[row].append(token)
                    still.append(row)
            active = still
            if not active:
                break
        if progress:
            progress(len(chunk))
    return out


#: What :func:`match_answer` strips from the start of a generated text.
_LEADING = " \t\"'“”‘’「」『』(（:：-—"


def _boundary_ok(rest: str, lang: str, form: str) -> bool:
    """Whether a match ending before ``rest`` ends at a word boundary."""
    if not rest or is_unspaced(lang) or is_cjk(form[-1:] or " "):
        return True
    return not rest[0].isalnum()


def match_answer(
    generated: str, target_forms: Sequence[str], edit_forms: Sequence[str], lang: str
) -> str:
    """Which answer a generated text gives: ``original``, ``edit`` or ``none``.

    Both sides are normalized (NFKC, case and width folding, whitespace collapsed); the
    generation, stripped of leading spaces and punctuation, must start with a form of the
    answer, at a word boundary in spaced languages.  The longest matching form decides.
    """
    text = normalize(generated).lstrip(_LEADING)
    best, best_len = "none", 0
    for label, forms in (("original", target_forms), ("edit", edit_forms)):
        for form in forms:
            norm = normalize(form)
            if norm and text.startswith(norm) and _boundary_ok(text[len(norm) :], lang, norm):
                if len(norm) > best_len:
                    best, best_len = label, len(norm)
    return best


#: Characters a following character can still change under NFKC (combining marks, the
#: half-width and combining kana voicing marks), besides U+FFFD (a token ending inside a
#: character).
_OPEN_ENDS = frozenset("\ufffd\uff9e\uff9f\u3099\u309a\u309b\u309c")


def _settled(generated: str) -> str:
    """The part of a growing generated text that later tokens cannot change once normalized:
    without trailing combining or voicing marks and U+FFFD, and without the character before
    them (which a mark still to come may compose with)."""
    end = len(generated)
    while end and (generated[end - 1] in _OPEN_ENDS or unicodedata.combining(generated[end - 1])):
        end -= 1
    return generated[: max(0, end - 1)]


def answer_decided(generated: str, forms: Sequence[str]) -> bool:
    """Whether no continuation of ``generated`` can change :func:`match_answer`'s verdict
    against ``forms`` (every answer form it is matched with, original and new).

    Undecided while the settled text (:func:`_settled`, normalized and stripped like
    :func:`match_answer` strips it) is empty or a prefix of some form, the form itself
    included (the next character decides its word boundary).  Otherwise every form either
    already starts the text with its boundary character present, or can no longer start it.
    """
    text = normalize(_settled(generated)).lstrip(_LEADING)
    if not text:
        return False
    return not any(norm.startswith(text) for norm in map(normalize, forms) if norm)


@dataclass
class _Row:
    view: FactView
    form: PromptForm
    prompt_text: str
    prompt_ids: list[int]
    target_ids: list[list[int]]  # per distinct form of the original answer
    edit_ids: list[list[int]]
    option_ids: list[list[int]]  # MCQA options (question form only)


def _target_ids(adapter: ModelAdapter, prefix: str, forms: Sequence[str]) -> list[list[int]]:
    seen: dict[tuple[int, ...], None] = {}
    for form in forms:
        if not form.strip():
            continue
        ids = tuple(adapter.tokenizer(prefix + form.strip(), add_special_tokens=False)["input_ids"])
        if ids:
            seen.setdefault(ids, None)
    return [list(ids) for ids in seen]


def askable(view: FactView, form: PromptForm) -> bool:
    """Whether the knowledge measures ask ``view`` in ``form``.

    "Usable" means "subject placed" for a question form, which the subject stages need and
    the knowledge measures do not.  On MLaKE the knowledge stage keeps that rule (its tables
    and run keys are unchanged); on other datasets (:class:`~mlake_core.data.external.
    ExternalView`) a question form is asked whether or not its subject was placed, and the
    subject stages still refuse it (:func:`~mlake_core.editing.base.locate_prompt`).
    """
    if form.usable:
        return True
    return isinstance(view, ExternalView) and form.kind == "question" and form.text is not None


def no_original_answer(view: FactView) -> bool:
    """Whether ``view``'s dataset gives no original answer (MzsRE, BMIKE-53 zsRE): its rows
    are then scored for the new answer alone (the unedited model's rate of giving it is the
    prior of an edit; ``target_*`` columns are NaN and ``greedy_match`` is never
    ``original``, so nothing is *known* there)."""
    return isinstance(view, ExternalView) and not view.has_original_answer


def build_rows(
    adapter: ModelAdapter,
    views: Sequence[FactView],
    template: PromptTemplate,
    config: KnowledgeConfig,
) -> tuple[list[_Row], dict[str, int]]:
    """Tokenize every measured (view, form); count what is skipped and why.

    Raises:
        DataError: a prompt, with its longest answer or generation, that the model cannot
            run (:meth:`~mlake_core.models.adapter.BaseAdapter.check_fits`), naming the fact,
            language and form.
    """
    rows: list[_Row] = []
    skipped: dict[str, int] = {}
    for view in views:
        for kind in config.forms:
            form = view.form(kind)  # type: ignore[arg-type]
            if not askable(view, form) or form.text is None:
                key = f"{kind}:{form.reason or 'unusable'}"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            prompt_text, prefix = template.prompt(kind, form.text, view.lang)
            targets = _target_ids(adapter, prefix, form.target.forms)
            edits = _target_ids(adapter, prefix, form.edit_target.forms)
            if not targets and not (edits and no_original_answer(view)):
                skipped[f"{kind}:empty_target"] = skipped.get(f"{kind}:empty_target", 0) + 1
                continue
            options: list[list[int]] = []
            if kind == "question" and config.mcqa and view.mcqa is not None and view.mcqa.usable:
                options = option_ids(adapter, prefix, view.mcqa.options)
                if any(not o for o in options):
                    options = []
            ids = adapter.encode(prompt_text)
            longest = max(len(t) for t in (*targets, *edits, *options))
            adapter.check_fits(  # the last answer or generated token is never fed back
                len(ids) + max(longest, config.max_new_tokens) - 1,
                f"fact {view.fact_id} [{view.lang}] {kind} form",
            )
            rows.append(_Row(view, form, prompt_text, ids, targets, edits, options))
    return rows, skipped


def option_ids(adapter: ModelAdapter, prefix: str, options: Sequence[str]) -> list[list[int]]:
    """Token ids of each multiple-choice option as an answer after a prompt whose answers
    start with ``prefix`` (one list per option, in order; empty where an option tokenizes to
    nothing), joined to the prompt by ids as every answer is."""
    return [
        list(adapter.tokenizer(prefix + o.strip(), add_special_tokens=False)["input_ids"])
        for o in options
    ]


def best_option(scores: Sequence[SequenceScore], *, per_token: bool = False) -> int:
    """Index of the best-scored option: the highest summed log-probability, or with
    ``per_token`` the highest per-token mean (length-normalized); the first on a tie."""
    return max(range(len(scores)), key=lambda k: scores[k].mean if per_token else scores[k].logp)


def lettered_question(question: str, options: Sequence[str]) -> str:
    """The question followed by its options, one per line, each after its letter
    (``A. …``): the question of the letter protocol (:func:`score_mcqa`), whose answer is the
    option's letter."""
    lines = [f"{MCQA_LETTERS[k]}. {o.strip()}" for k, o in enumerate(options)]
    return "\n".join([question.strip(), *lines])


@dataclass(frozen=True)
class McqaItem:
    """One multiple-choice question to score (:func:`score_mcqa`).

    Attributes:
        label: names the record in errors (e.g. ``fact 12 [zh] multiple choice``).
        lang: the question's language (few-shot templates need it).
        question: the question text.
        options: the options, in letter order.
    """

    label: str
    lang: str
    question: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class McqaScore:
    """A multiple-choice question scored both ways (:func:`score_mcqa`).

    Attributes:
        options: each option's text as the answer after the question prompt (the
            log-likelihood protocol, what :func:`measure_knowledge`'s ``mcqa_correct`` reads).
        letters: each option's letter as the answer after the prompt that lists the lettered
            options (:func:`lettered_question`; the letter protocol).
    """

    options: tuple[SequenceScore, ...]
    letters: tuple[SequenceScore, ...]

    @property
    def choice(self) -> int:
        """The option with the highest summed log-probability."""
        return best_option(self.options)

    @property
    def choice_norm(self) -> int:
        """The option with the highest per-token log-probability."""
        return best_option(self.options, per_token=True)

    @property
    def letter_choice(self) -> int:
        """The option whose letter is the most probable answer with the options in the
        prompt."""
        return best_option(self.letters)


def score_mcqa(
    adapter: ModelAdapter,
    items: Sequence[McqaItem],
    template: PromptTemplate,
    *,
    batch_size: int = 32,
    kv_cache: bool = True,
) -> list[McqaScore]:
    """Score multiple-choice questions both ways, in one batched :func:`score_sequences`.

    - **Option log-likelihood**: each option as the answer after the question's own prompt
      (``template.question_prompt``), tokenized as :func:`measure_knowledge` tokenizes options
      (:func:`option_ids`).
    - **Letter**: each option's letter (``A``, ``B``, …, after the template's answer prefix)
      as the answer after the prompt of :func:`lettered_question`, which lists the options.

    Raises:
        DataError: an option that tokenizes to nothing, or a prompt the model cannot run
            (:meth:`~mlake_core.models.adapter.BaseAdapter.check_fits`), naming the item.
    """
    pairs: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        prompt, prefix = template.question_prompt(item.question, item.lang)
        ids = adapter.encode(prompt)
        options = option_ids(adapter, prefix, item.options)
        empty = [MCQA_LETTERS[k] for k, o in enumerate(options) if not o]
        if empty:
            raise DataError(f"{item.label}: option {', '.join(empty)} tokenizes to nothing")
        lprompt, lprefix = template.question_prompt(
            lettered_question(item.question, item.options), item.lang
        )
        lids = adapter.encode(lprompt)
        letters = option_ids(adapter, lprefix, MCQA_LETTERS[: len(item.options)])
        adapter.check_fits(len(ids) + max(map(len, options)) - 1, item.label)
        adapter.check_fits(len(lids) + max(map(len, letters)) - 1, f"{item.label} (lettered)")
        start = len(pairs)
        pairs += [(ids, o) for o in options] + [(lids, t) for t in letters]
        spans.append((start, len(options)))
    if not pairs:
        return []
    scores = score_sequences(adapter, pairs, batch_size=batch_size, kv_cache=kv_cache)
    return [McqaScore(tuple(scores[s : s + n]), tuple(scores[s + n : s + 2 * n])) for s, n in spans]


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return float("nan")
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class KnowledgeResult:
    """Per-view knowledge measurements of one model.

    Attributes:
        table: one row per measured (fact, language, form), columns :data:`COLUMNS`.
        skipped: counts of views not measured, keyed ``form:reason``.
        langs: languages measured.
        fact_ids: facts measured.
    """

    table: Any  # pandas.DataFrame
    skipped: dict[str, int]
    langs: tuple[str, ...]
    fact_ids: tuple[int, ...]

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> KnowledgeResult:
        """The result a knowledge run saved, as :func:`mlake.stages.knowledge.knowledge_stage`
        returned it.

        Reads the run's ``meta.json`` (``langs``, ``fact_ids``), each language's table
        ``tables/knowledge_<lang>.parquet`` (concatenated in the run's language order) and its
        ``skipped_<lang>.json`` where there is one (keys become ``"lang:reason"``).

        Args:
            run_dir: the knowledge run folder.

        Raises:
            DataError: not a knowledge run, or a language's table missing (a run still going);
                the message names the folder or file.
        """
        import pandas as pd

        run = read_run(run_dir, "knowledge")
        meta = run.meta
        if "langs" not in meta or "fact_ids" not in meta:
            raise DataError(f"{run.json_path('meta')}: no langs or fact_ids recorded")
        langs = tuple(str(lang) for lang in meta["langs"])
        tables, skipped = [], {}
        for lang in langs:
            tables.append(
                run.load_table(f"knowledge_{lang}", columns=KEY_COLUMNS, what="a knowledge table")
            )
            if run.has_json(f"skipped_{lang}"):
                for k, v in run.load_json(f"skipped_{lang}").items():
                    skipped[f"{lang}:{k}"] = v
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        return cls(
            table=table,
            skipped=skipped,
            langs=langs,
            fact_ids=tuple(int(f) for f in meta["fact_ids"]),
        )

    def known(self, lang: str) -> set[int]:
        """Facts whose question form the model answers correctly (greedy alias match) in
        ``lang``."""
        t = self.table
        sel = (t["lang"] == lang) & (t["form"] == "question") & (t["greedy_match"] == "original")
        return set(int(x) for x in t.loc[sel, "fact_id"])

    def summary(self) -> Any:
        """Per-language accuracies (a pandas DataFrame, one row per language).

        Columns: ``facts`` (facts measured in the question form), ``known`` (count),
        ``greedy`` (known / facts), ``prefers_original`` (share with p(original) > p(edit),
        alias-aware), ``target_logp`` and ``target_logp_mean`` (medians), ``cloze_facts``,
        ``cloze_greedy``, ``cloze_prefers_original``, ``mcqa_facts``, ``mcqa``,
        ``mcqa_norm``, ``measurable`` (whether the rows give original answers).

        Rows without an original answer (:func:`no_original_answer`: MzsRE, BMIKE-53 zsRE)
        are left out of every original-answer column: where a language has no other rows,
        ``known``, ``greedy``, ``prefers_original``, ``target_logp`` and
        ``target_logp_mean`` (and their cloze columns) are NaN, "not measurable", never a
        number, and ``measurable`` is false.
        """
        import pandas as pd

        records = []
        t = self.table
        for lang in self.langs:
            q = t[(t["lang"] == lang) & (t["form"] == "question")]
            c = t[(t["lang"] == lang) & (t["form"] == "cloze")]
            m = q[q["mcqa_correct"].notna()]
            # Rows that give an original answer (those without have prefers_original None).
            qo, co = _with_original(q), _with_original(c)
            known = int((qo["greedy_match"] == "original").sum())
            records.append(
                {
                    "lang": lang,
                    "facts": len(q),
                    "known": known if len(qo) or not len(q) else math.nan,
                    "greedy": _mean(qo["greedy_match"] == "original"),
                    "prefers_original": _mean(qo["prefers_original"].astype(bool)),
                    "target_logp": float(qo["target_logp"].median()) if len(qo) else math.nan,
                    "target_logp_mean": float(qo["target_logp_mean"].median())
                    if len(qo)
                    else math.nan,
                    "cloze_facts": len(c),
                    "cloze_greedy": _mean(co["greedy_match"] == "original"),
                    "cloze_prefers_original": _mean(co["prefers_original"].astype(bool)),
                    "mcqa_facts": len(m),
                    "mcqa": _mean(m["mcqa_correct"].astype(bool)),
                    "mcqa_norm": _mean(m["mcqa_correct_norm"].astype(bool)),
                    "measurable": bool(len(qo)) or not len(q),
                }
            )
        return pd.DataFrame.from_records(records).set_index("lang")


def _mean(series: Any) -> float:
    return float(series.mean()) if len(series) else math.nan


def _with_original(rows: Any) -> Any:
    """The rows that give an original answer: ``prefers_original`` set and a non-empty
    ``target`` (tables saved before ``prefers_original`` was left unset there have
    ``False`` and an empty target)."""
    target = rows["target"].fillna("").astype(str).str.strip()
    return rows[rows["prefers_original"].notna() & (target != "")]


def measure_knowledge(
    adapter: ModelAdapter,
    views: Sequence[FactView],
    template: PromptTemplate,
    config: KnowledgeConfig | None = None,
    *,
    batch_size: int = 32,
    progress: Callable[[str, int, int], None] | None = None,
    scored: bool = True,
    kv_cache: bool = True,
) -> KnowledgeResult:
    """Measure what ``adapter`` knows about ``views`` (see the module docstring).

    Args:
        adapter: the model.
        views: fact views, any languages.
        template: the model's prompt template.
        config: method settings.
        batch_size: sequences per forward pass (a run setting: results do not depend on it
            beyond float noise).
        progress: called with (stage, done, total) as work finishes.
        scored: score the answers' probabilities; without, only greedy generation runs and
            every probability column is NaN (``prefers_original`` is then meaningless):
            what edit evaluation's locality check needs, at about half the cost.
        kv_cache: continue prompts' keys and values instead of rerunning them (see
            :func:`score_sequences` and :func:`greedy_generate`; same results up to float
            rounding).

    Returns:
        A :class:`KnowledgeResult`.
    """
    import pandas as pd

    config = config or KnowledgeConfig()
    rows, skipped = build_rows(adapter, views, template, config)

    # One flat list of every sequence to score, remembered by (row, kind, index).
    pairs: list[tuple[list[int], list[int]]] = []
    where: list[tuple[int, str, int]] = []
    for r, row in enumerate(rows if scored else ()):
        for kind, seqs in (("t", row.target_ids), ("e", row.edit_ids), ("o", row.option_ids)):
            for k, seq in enumerate(seqs):
                pairs.append((row.prompt_ids, seq))
                where.append((r, kind, k))
    done = {"score": 0, "generate": 0}

    def tick(stage: str, total: int) -> Callable[[int], None]:
        def inner(n: int) -> None:
            done[stage] += n
            if progress:
                progress(stage, done[stage], total)

        return inner

    # Scoring and generation run batch by batch of distinct prompts, so a batch's prompt pass
    # (the demonstrations and the question) runs once for both (PromptPasses).
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        by_prompt.setdefault(tuple(row.prompt_ids), []).append(r)
    prompts = list(by_prompt)
    pairs_of: dict[tuple[int, ...], list[int]] = {}
    for j, (prompt, _) in enumerate(pairs):
        pairs_of.setdefault(tuple(prompt), []).append(j)

    def decides(forms: tuple[str, ...]) -> Callable[[str], bool]:
        return lambda text: answer_decided(template.cut(text), forms)

    decision: dict[tuple[int, ...], Callable[[str], bool]] = {}
    for p, members in by_prompt.items():
        form = rows[members[0]].form  # one prompt: one view and form
        decision[p] = decides((*form.target.forms, *form.edit_target.forms))
    cached = kv_cache and _cache_continues(adapter)
    passes = PromptPasses() if cached else None
    outer = prompt_batches(prompts, batch_size) if cached else [list(range(len(prompts)))]
    scores: list[SequenceScore | None] = [None] * len(pairs)
    generated: list[list[int]] = [[] for _ in rows]
    score_tick, generate_tick = tick("score", len(pairs)), tick("generate", len(rows))
    for indices in outer:
        chunk = [prompts[i] for i in indices]
        selected = [j for p in chunk for j in pairs_of.get(p, [])]
        got = score_sequences(
            adapter,
            [pairs[j] for j in selected],
            batch_size=batch_size,
            progress=score_tick,
            kv_cache=kv_cache,
            passes=passes,
        )
        for j, score in zip(selected, got, strict=True):
            scores[j] = score
        texts = greedy_generate(
            adapter,
            [list(p) for p in chunk],
            max_new_tokens=config.max_new_tokens,
            stop=template.stop,
            batch_size=batch_size,
            kv_cache=kv_cache,
            passes=passes,
            decided=[decision[p] for p in chunk] if config.stop_when_decided else None,
        )
        for p, ids in zip(chunk, texts, strict=True):
            for r in by_prompt[p]:
                generated[r] = ids
            generate_tick(len(by_prompt[p]))
    by_row: dict[tuple[int, str], list[SequenceScore]] = {}
    for (r, kind, _), scored_pair in zip(where, scores, strict=True):
        if scored_pair is None:  # every pair's prompt is some row's, so in some batch
            raise RuntimeError(f"row {r}: a sequence was not scored")
        by_row.setdefault((r, kind), []).append(scored_pair)

    records = []
    for r, row in enumerate(rows):
        t_scores = by_row.get((r, "t"), [])
        e_scores = by_row.get((r, "e"), [])
        o_scores = by_row.get((r, "o"), [])
        unscored = SequenceScore(
            logp=math.nan, n_tokens=len(row.target_ids[0]) if row.target_ids else 0
        )
        main, edit = (t_scores[0] if t_scores else unscored), (e_scores[0] if e_scores else None)
        t_alias = _logsumexp([s.logp for s in t_scores])
        e_alias = _logsumexp([s.logp for s in e_scores])
        text = template.cut(adapter.tokenizer.decode(generated[r], skip_special_tokens=True))
        mcqa_correct: bool | None = None
        mcqa_norm: bool | None = None
        if o_scores and row.view.mcqa is not None:
            answer = row.view.mcqa.answer_index
            mcqa_correct = best_option(o_scores) == answer
            mcqa_norm = best_option(o_scores, per_token=True) == answer
        records.append(
            {
                "fact_id": row.view.fact_id,
                "lang": row.view.lang,
                "form": row.form.kind,
                "prompt": row.prompt_text,
                "target": row.form.target.text,
                "edit_target": row.form.edit_target.text,
                "prompt_tokens": len(row.prompt_ids),
                "target_tokens": main.n_tokens,
                "target_logp": main.logp,
                "target_logp_mean": main.mean,
                "edit_tokens": edit.n_tokens if edit else 0,
                "edit_logp": edit.logp if edit else math.nan,
                "edit_logp_mean": edit.mean if edit else math.nan,
                "target_alias_logp": t_alias,
                "edit_alias_logp": e_alias,
                "n_target_forms": len(t_scores),
                "n_edit_forms": len(e_scores),
                "prefers_original": None  # no original answer: not measurable
                if no_original_answer(row.view)
                else bool(not e_scores or t_alias > e_alias),
                "greedy_text": text,
                "greedy_match": match_answer(
                    text, row.form.target.forms, row.form.edit_target.forms, row.view.lang
                ),
                "mcqa_correct": mcqa_correct,
                "mcqa_correct_norm": mcqa_norm,
            }
        )
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    seen = tuple(dict.fromkeys(v.lang for v in views))
    # MLaKE's five in matrix order, then any other language in the order its views came.
    langs = (
        *(lang for lang in LANGUAGES if lang in seen),
        *(x for x in seen if x not in LANGUAGES),
    )
    fact_ids = tuple(sorted({v.fact_id for v in views}))
    return KnowledgeResult(table=table, skipped=skipped, langs=langs, fact_ids=fact_ids)
