"""The other datasets' own scorers: what their papers' code computes for an answer, measured
beside mlake's greedy alias match (:func:`~mlake_core.metrics.knowledge.match_answer`).

Both papers read the answer by **teacher forcing**, not by generation: the prompt is
followed by the reference answer, and the model's prediction for each answer token is the
argmax at the position before it.  From those predicted tokens three numbers are computed
here, each in [0, 1] per question (:func:`teacher_forced_scores`):

``acc``
    EasyEdit's token accuracy, the share of the answer's tokens that are the argmax under
    teacher forcing (zjunlp/EasyEdit ``easyeditor/evaluate/evaluate_utils.py``
    ``test_prediction_acc``: ``np.mean(np.equal(ans, label))`` over the answer's positions
    of ``prompt + ' ' + target``).  ReMaKE is built on EasyEdit, but its released scripts
    report the two below instead.
``f1``
    the papers' ``obtain_f1_and_em`` F1 between the decoded prediction and the answer, over
    the *tokenizer's* ids (``tokenizer.encode(text, add_special_tokens=False)``, no
    lower-casing, no punctuation or article removal): with ``c`` the size of the multiset
    intersection of the two id lists (each shared id removed from both as it is counted),
    ``c * c / (len(a) * len(b))``, i.e. precision x recall (not their harmonic mean); 1 when
    both are empty, 0 when one is.  For "the big cat" against "big cat" split by words:
    ``2 * 2 / (3 * 2) = 0.667`` (:func:`f1_em`).
``em``
    exact match of the decoded prediction and the answer as strings (``a == b``, no
    normalisation).

Where this follows, and where it departs:

- **ReMaKE** (MzsRE; Vicky-Wil/ReMaKE@f2f9d5a): ``easyeditor/evaluate/evaluate.py``
  ``icl_lm_eval`` (the branch of LLaMA models) runs ``prompt + ' ' + target``, takes
  ``argmax(logits)[:, -len(target_ids):-1]`` with ``target_ids`` the target tokenized alone
  with its BOS (so one prediction per answer token) and decodes it with
  ``skip_special_tokens``; ``evaluate.py`` ``obtain_f1_and_em`` scores it against the
  decoded target with LLaMA-2's tokenizer.  Reliability, generalization (the record's
  ``rephrase``) and portability are scored against the new answer or the portability
  answer; **locality** is scored against the *unedited* model's teacher-forced answer to the
  ``loc`` question (``item["pre"]...["ans"]``), not against ``loc_ans``.
- **BMIKE-53** (shaobo9856/IKE@a9b7cac): ``search/icl.py`` uses the same
  ``obtain_f1_and_em`` with Llama-3-8B's tokenizer, against the record's answer itself
  (``alt``, the portability answer, and ``loc_ans`` for locality).  Its
  ``icl_lm_eval_f1em`` at that commit (1d6c887, "del target") no longer appends the target
  to the prompt, so the "prediction" it decodes is the argmax at the prompt's last
  ``len(target_ids) - 1`` positions (all but the last of them predict the prompt's own
  tokens); the commit before it (79da36f) teacher-forced the target as ReMaKE does, which
  is what is computed here.  Its CounterFact and WikiFactDiff tasks score reliability and
  generalization (CounterFact also locality) by a perplexity comparison of the new answer
  with ``loc_ans`` (``icl_lm_eval_ppls``: ``exp`` of the mean loss over the answer's
  tokens after ``prompt + ' ' + answer``; a success where the first answer's perplexity is
  lower), computed here as metric ``ppl`` (:attr:`PaperScorer.ppl`; the per-token mean
  log-probability of each answer after the prompt, the same comparison; their answer length
  ``len(tokenizer.encode(' ' + target))`` counts Llama-3's BOS, so their loss also takes the
  prompt's last token, which mlake does not), and F1/EM is given for every measure of every
  task besides.

Locality follows each paper (:attr:`PaperScorer.locality`): BMIKE-53's against ``loc_ans``;
ReMaKE's against the unedited model's teacher-forced prediction on the same ``loc`` question
with ``loc_ans`` fed (F1/EM of the two decoded texts, as ReMaKE's ``evaluate.py``; token
accuracy is then the share of positions whose argmax did not change, EasyEdit's locality),
so the unedited model's own locality is 100% there.

Common departures: the model's own tokenizer replaces LLaMA-2's and Llama-3's (F1 depends on
the tokenizer); the prompt is mlake's template (``--template``), not their ``Question: ...
Answer:`` or IKE's in-context demonstrations (mlake's ``ike`` method supplies its own); the
answer is joined to the prompt by the template's answer prefix, token ids to token ids as
every answer mlake scores (the papers join ``prompt + ' ' + target`` as text, which changes
token ids and is wrong for zh/ja: PITFALLS, "Joining prompt and answer"); both strings are
stripped of surrounding whitespace before EM (a decoded answer starting with a space token
would otherwise never match).  Teacher forcing reads only the answer's own positions: a
model that would go on after the answer ("2006年1" for "2006") passes EM here while mlake's
greedy alias match, which needs a word boundary after the answer in spaced languages and
accepts aliases and case and width variants, fails it; so neither measure bounds the other.
**Unspaced languages** (zh, ja, th): both papers tokenize with the model's tokenizer, not by
spaces, so F1 counts shared tokens in every language; so does mlake, with the model's
tokenizer (no character or word splitting is added).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: The numbers teacher forcing gives per question (:func:`teacher_forced_scores`).
TF_METRICS: tuple[str, ...] = ("f1", "em", "acc")

#: Every number a scorer may give per question, in print order: :data:`TF_METRICS`, then
#: ``ppl``, BMIKE-53's perplexity comparison where its scorer has one
#: (:attr:`PaperScorer.ppl`).
PAPER_METRICS: tuple[str, ...] = (*TF_METRICS, "ppl")


@dataclass(frozen=True)
class PaperScorer:
    """A dataset's own scorer (module docstring).

    Attributes:
        name: short name (``remake``, ``bmike53``), recorded in run keys.
        title: what tables call it.
        source: repository, commit and files followed.
        locality: what locality is scored against: ``loc_ans`` (the record's answer) or
            ``unedited`` (the unedited model's teacher-forced prediction; module
            docstring).
        ppl: the measures also scored by BMIKE-53's perplexity comparison
            (``icl_lm_eval_ppls``, ``wrap_ppls_count``): 1 where the answer has a lower
            perplexity after the prompt than the other one (reliability and
            generalization: the new answer against ``loc_ans``; locality: ``loc_ans``
            against the new answer), else 0; metric ``ppl``.
    """

    name: str
    title: str
    source: str
    locality: str = "loc_ans"
    ppl: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.locality not in ("loc_ans", "unedited"):
            raise ValueError(f"locality {self.locality!r}: choose loc_ans or unedited")

    @property
    def locality_note(self) -> str:
        """How locality is scored, for table headers."""
        if self.locality == "unedited":
            return "locality against the unedited model's own teacher-forced answer"
        return "locality against loc_ans"

    @property
    def key(self) -> str:
        """What enters a run key: the scorer, its locality reference and its perplexity
        measures."""
        ppl = f";ppl={','.join(self.ppl)}" if self.ppl else ""
        return f"{self.name};locality={self.locality}{ppl}"

    def metric_title(self, metric: str) -> str:
        """A table title for ``metric`` of :data:`PAPER_METRICS`."""
        what = {
            "f1": "token F1 (precision x recall of tokenizer ids), teacher-forced argmax",
            "em": "exact match, teacher-forced argmax",
            "acc": "token accuracy (EasyEdit), teacher-forced argmax",
            "ppl": "perplexity comparison (the answer's per-token perplexity below the "
            "other's: new answer vs loc_ans; for locality loc_ans vs new answer)",
        }[metric]
        return f"{self.title} {what}"


REMAKE = PaperScorer(
    "remake",
    "ReMaKE's",
    "Vicky-Wil/ReMaKE@f2f9d5a evaluate.py (obtain_f1_and_em), easyeditor/evaluate/evaluate.py "
    "(icl_lm_eval); zjunlp/EasyEdit easyeditor/evaluate/evaluate_utils.py (test_prediction_acc)",
    "unedited",
)
BMIKE53 = PaperScorer(
    "bmike53",
    "BMIKE-53's",
    "shaobo9856/IKE@a9b7cac search/icl.py (obtain_f1_and_em, icl_lm_eval_f1em as of 79da36f, "
    "icl_lm_eval_ppls)",
)
#: BMIKE-53's CounterFact and WikiFactDiff tasks add the perplexity comparison.
BMIKE53_COUNTERFACT = replace(BMIKE53, ppl=("reliability", "generalization", "locality"))
BMIKE53_WFD = replace(BMIKE53, ppl=("reliability", "generalization"))

#: The scorer of each dataset of the registry (:mod:`mlake_core.data.sources`), by name.
SCORERS: dict[str, PaperScorer] = {
    "mzsre": REMAKE,
    "bmike53-zsre": BMIKE53,
    "bmike53-counterfact": BMIKE53_COUNTERFACT,
    "bmike53-wfd": BMIKE53_WFD,
}


def paper_scorer(dataset: Any) -> PaperScorer | None:
    """The scorer of ``dataset``'s paper (by its registry name, ``dataset.version``), or
    ``None`` (MLaKE: greedy alias match is its paper's measure)."""
    return SCORERS.get(str(getattr(dataset, "version", "")))


def f1_em(
    answer: str, target: str, tokenize: Callable[[str], Sequence[Any]]
) -> tuple[float, float]:
    """The papers' ``obtain_f1_and_em(answer, target)`` (module docstring): F1 as precision x
    recall of the tokens ``tokenize`` gives, and exact string match."""
    a, b = list(tokenize(answer)), list(tokenize(target))
    if not a and not b:
        return 1.0, 1.0
    if not a or not b:
        return 0.0, 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return common * common / float(len(a) * len(b)), float(answer == target)


@dataclass(frozen=True)
class TeacherForced:
    """One question scored by teacher forcing.

    Attributes:
        text: the decoded argmax tokens (stripped).
        acc: token accuracy; f1, em: against the answer, or the reference prediction where
            one was given (module docstring).
        tokens: the argmax tokens.
    """

    text: str
    acc: float
    f1: float
    em: float
    tokens: tuple[int, ...] = ()

    def metrics(self) -> dict[str, float]:
        """``{metric: value}`` of :data:`TF_METRICS`."""
        return {m: float(getattr(self, m)) for m in TF_METRICS}


def teacher_forced_argmax(
    adapter: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32
) -> list[list[int]]:
    """For each ``(prompt ids, answer ids)``: the argmax token at each position that predicts
    an answer token, with the answer fed (right padding, one pass per ``batch_size``
    sequences; only those positions are read out).

    Raises:
        ValueError: an empty prompt or answer, naming the pair.
    """
    import torch

    for i, (prompt, answer) in enumerate(pairs):
        if not prompt or not answer:
            raise ValueError(f"pair {i}: empty prompt or answer")
    out: list[list[int]] = [[] for _ in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = adapter.batch(
            [[*pairs[i][0], *pairs[i][1][:-1]] for i in chunk], padding_side="right"
        )
        with torch.no_grad():
            final, _, _ = adapter.final_states(batch)
        rows, cols = [], []
        for row, i in enumerate(chunk):
            prompt, answer = pairs[i]
            for k in range(len(answer)):
                rows.append(row)
                cols.append(len(prompt) - 1 + k)  # the position predicting answer token k
        states = final[
            torch.tensor(rows, device=final.device), torch.tensor(cols, device=final.device)
        ]
        picked = adapter.logit_lens(states).argmax(-1).tolist()
        at = 0
        for i in chunk:
            n = len(pairs[i][1])
            out[i] = [int(t) for t in picked[at : at + n]]
            at += n
    return out


def teacher_forced_scores(
    adapter: Any,
    items: Sequence[tuple[Sequence[int], Sequence[int], str]],
    batch_size: int = 32,
    references: Sequence[Sequence[int] | None] | None = None,
) -> list[TeacherForced]:
    """Score each ``(prompt ids, answer ids, answer text)`` by teacher forcing
    (module docstring): token accuracy of the argmax tokens, and F1/EM of their decoded text
    against the answer text, tokenized by the model's tokenizer.  Where ``references`` gives
    an item a reference prediction (ReMaKE's locality: the unedited model's argmax tokens on
    the same sequence), they are scored against it instead: the share of positions whose
    argmax is the reference's, and F1/EM against its decoded text.

    Raises:
        ValueError: a reference whose length is not its answer's.
    """
    tok = adapter.tokenizer

    def tokenize(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    refs = list(references) if references is not None else [None] * len(items)
    predicted = teacher_forced_argmax(adapter, [(p, a) for p, a, _ in items], batch_size=batch_size)
    out = []
    for i, ((_, answer_ids, answer), pred, ref) in enumerate(
        zip(items, predicted, refs, strict=True)
    ):
        gold = list(answer_ids) if ref is None else [int(t) for t in ref]
        if len(gold) != len(pred):
            raise ValueError(f"item {i}: a reference of {len(gold)} tokens for {len(pred)}")
        acc = sum(int(p == t) for p, t in zip(pred, gold, strict=True)) / len(gold)
        text = tok.decode(pred, skip_special_tokens=True).strip()
        if ref is None:
            target = answer.strip()
        else:
            target = tok.decode(gold, skip_special_tokens=True).strip()
        f1, em = f1_em(text, target, tokenize)
        out.append(TeacherForced(text, acc, f1, em, tuple(pred)))
    return out
