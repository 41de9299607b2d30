"""Evaluation of one edit made in language A, measured in every language B.

For an edit of fact ``f`` requested in language A (question form by default), with the edit
applied to the unedited model (:meth:`~mlake_core.editing.base.EditResult.applied`):

``efficacy``
    B = A, the prompt form that was edited.
``generalization``
    B = A, A's other prompt form where it is well-posed.
``transfer``
    B != A, both prompt forms of ``f`` in B (the cloze form where well-posed).
``locality``
    a fixed sample of other facts in B (question form): of those the unedited model answered
    correctly, the fraction still answered correctly after the edit (the pre-edit answers come
    from the knowledge stage, measured once).
``portability``
    the multi-hop "new" questions linked to ``f`` in B: greedy alias match of their answer.

On a dataset whose records carry their own prompts (MzsRE, BMIKE-53:
:func:`~mlake_core.data.external.has_own_measures`), generalization and locality follow
their papers (ReMaKE, BMIKE-53: each measured in the test language B, for every B):
generalization asks the record's ``rephrase`` in B (form ``rephrase``: the new answer),
locality the record's unrelated ``loc`` question in B (form ``locality``: it must still
give ``loc_ans``) instead of sampled other facts; :func:`own_measures` measures both and
:func:`own_baseline` the unedited model's answers, every edit's prior
(``chose_edit_before``).  Where a dataset gives no original answer (MzsRE, BMIKE-53 zsRE)
nothing is ``known_before`` and ``success_prob`` is NaN; the greedy measures and the
unedited model's rate of giving the new answer remain.  All rows are scored by greedy
alias match; the papers' own scorers (teacher-forced token F1, exact match and EasyEdit's
token accuracy: :mod:`mlake_core.metrics.paper_scores`) are computed beside it on every
reliability, generalization, locality and portability row (:func:`paper_measures`, columns
``paper_*``), and :func:`own_cells` gives both.

Each row has the probability measures (``success_prob``: alias-aware p(new) > p(old);
``p_new``: the summed probability of the new answer's forms) and the greedy measure
(``success_greedy``: greedy alias match gives the new answer), with ``known_before``: whether
the model answered ``f`` in B correctly before the edit (transfer is only meaningful there).

With ``protocol="mlake"`` (the benchmark's own protocols, MLaKE, arXiv 2404.04990), each
edit is also measured by **multiple choice** (the v2024-04 ``mcqa`` records), in every test
language, single-hop (``form`` ``question``) and multi-hop (``form`` ``multi_hop``, the
"new" questions linked to ``f``), both ways (``mcqa_by``): ``loglik``, the option whose text
is the most probable answer after the question, and ``letter``, the letter the model gives
with the options listed in the prompt (:func:`~mlake_core.metrics.knowledge.score_mcqa`).
Those rows are kind ``mcqa``.  Every measured row carries ``n`` (questions), ``chose_edit``
(how many were answered with the edit: the edit's option, or the new answer) and, where the
record gives one, ``chose_original``, and the same counts of the unedited model
(``chose_edit_before``, ``chose_original_before``: the prior an edit effect is read
against; measured once per run, :func:`protocol_baseline`).  A test language without a
usable record gives a row with ``n`` 0 and the reason in ``missing`` (portability too), so
nothing is dropped unseen.  :func:`protocol_cells` aggregates the rows into the paper's
tables (edit language x test language, per hop and format).

A transfer run's rows are read back as a :class:`TransferRun` (:meth:`TransferRun.load`).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mlake_core.configs import coerce_fields
from mlake_core.data.dataset import MlakeDataset
from mlake_core.data.external import ExternalView, has_own_measures
from mlake_core.editing.base import EditResult
from mlake_core.errors import ConfigError, DataError
from mlake_core.metrics.knowledge import (
    KnowledgeConfig,
    McqaItem,
    answer_decided,
    askable,
    greedy_generate,
    match_answer,
    measure_knowledge,
    score_mcqa,
)
from mlake_core.metrics.paper_scores import (
    PAPER_METRICS,
    TF_METRICS,
    paper_scorer,
    teacher_forced_scores,
)
from mlake_core.models.prompting import PromptTemplate
from mlake_core.results.store import read_run

#: Row kinds, in report order.
KINDS: tuple[str, ...] = ("efficacy", "generalization", "transfer", "locality", "portability")

#: Evaluation protocols: ``free-form`` (every kind above) and ``mlake`` (those, plus multiple
#: choice both ways, single-hop and multi-hop, with the unedited model's counts).
PROTOCOLS: tuple[str, ...] = ("free-form", "mlake")

#: The two ways multiple choice is read: the most probable option text, the letter chosen.
MCQA_WAYS: tuple[str, ...] = ("loglik", "letter")


@dataclass(frozen=True)
class TransferConfig:
    """Settings of the transfer evaluation.

    Attributes:
        edit_form: the prompt form the edit is requested in (``question`` or ``cloze``).
        n_locality: unrelated facts per test language for locality (a fixed sample).
        locality_seed: seed of that sample.
        max_new_tokens: greedy generation length; the pre-edit knowledge measurement must use
            the same (a long answer cut short is not matched), which ``mlake edit transfer``
            ensures.
        stop_when_decided: stop each greedy continuation once no further token can change
            which answer it gives (:func:`~mlake_core.metrics.knowledge.answer_decided`):
            every success, locality and portability verdict is the same, the stored
            ``greedy_text`` ends where it was decided, and evaluation is faster (greedy
            decoding through a large vocabulary is most of it).  Off by default.
        protocol: ``free-form`` (default) or ``mlake``: also multiple choice after every
            edit in every test language, both ways, single-hop and multi-hop, with the
            unedited model's counts (see the module docstring; needs the v2024-04 data).
    """

    edit_form: str = "question"
    n_locality: int = 10
    locality_seed: int = 0
    max_new_tokens: int = KnowledgeConfig().max_new_tokens
    stop_when_decided: bool = False
    protocol: str = "free-form"

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.edit_form not in ("question", "cloze"):
            raise ConfigError(f"--edit-form {self.edit_form!r}: choose question or cloze")
        if self.n_locality < 0:
            raise ConfigError("--n-locality must be >= 0")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"--protocol {self.protocol!r}: choose {' or '.join(PROTOCOLS)} (mlake adds "
                "multiple choice, single-hop and multi-hop, to the free-form measures)"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.stop_when_decided:  # added later: earlier runs' keys stay valid
            del out["stop_when_decided"]
        if self.protocol == "free-form":  # likewise; an mlake run has its own key
            del out["protocol"]
        return out


def locality_facts(
    dataset: MlakeDataset, exclude: Sequence[int], config: TransferConfig, pool: Sequence[int]
) -> list[int]:
    """The fixed locality sample: ``n_locality`` facts of ``pool`` not in ``exclude``."""
    candidates = sorted(set(pool) - set(exclude))
    if len(candidates) < config.n_locality:
        raise ConfigError(
            f"--n-locality {config.n_locality}: only {len(candidates)} facts outside the edited "
            "ones are available"
        )
    return sorted(random.Random(config.locality_seed).sample(candidates, config.n_locality))


def evaluate_edit(
    adapter: Any,
    result: EditResult,
    dataset: MlakeDataset,
    langs: Sequence[str],
    template: PromptTemplate,
    config: TransferConfig,
    *,
    locality_ids: Sequence[int],
    known_before: Mapping[tuple[int, str], bool],
    batch_size: int = 32,
    new_before: Mapping[tuple[int, str, str], bool] | None = None,
    before: Mapping[tuple[Any, ...], tuple[float, float]] | None = None,
    paper_before: Mapping[tuple[int, str, str], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows (one per fact, test language, form and kind) for one edit (see the module
    docstring).  ``known_before`` says whether the unedited model answered each
    (fact, language) correctly in the question form (greedy alias match); ``new_before``
    whether it already gave the new answer, per (fact, language, form); ``before`` the
    unedited model's ``(chose_edit, chose_original)`` counts of the multiple-choice and
    portability rows, per ``(fact_id, test_lang, form, kind, mcqa_by)``
    (:func:`protocol_baseline`).  On a dataset with its own scorer
    (:func:`~mlake_core.metrics.paper_scores.paper_scorer`) every reliability,
    generalization, locality and portability row also carries the scorer's values
    (:func:`paper_measures`: ``paper_f1``, ``paper_em``, ``paper_acc``, NaN where not
    scored) and the unedited model's (``paper_before``, :func:`paper_map` of
    :func:`own_baseline`; columns ``paper_f1_before``, ...; ReMaKE's locality is scored
    against the unedited model's tokens there)."""
    (request,) = result.requests[:1]
    fact = dataset.fact(request.fact_id)
    tpl = template.with_context(result.prefix) if result.prefix else template
    kcfg = KnowledgeConfig(
        max_new_tokens=config.max_new_tokens,
        mcqa=False,
        stop_when_decided=config.stop_when_decided,
    )
    new_before = new_before or {}
    before = before or {}
    rows: list[dict[str, Any]] = []
    base = {
        "method": result.method,
        "fact_id": request.fact_id,
        "edit_lang": request.lang,
        "edit_form": request.form,
        "edit_loss": result.loss,
    }
    mlake = config.protocol == "mlake"
    own = has_own_measures(dataset)  # the record's rephrase and locality question
    with result.applied(adapter):
        measured = measure_knowledge(
            adapter, [fact.views[b] for b in langs], tpl, kcfg, batch_size=batch_size
        ).table
        loc_views = [] if own else [dataset.fact(i).views[b] for b in langs for i in locality_ids]
        loc = measure_knowledge(
            adapter,
            loc_views,
            tpl,
            replace(kcfg, forms=("question",)),
            batch_size=batch_size,
            scored=False,  # locality reads only the greedy answer
        ).table
        port = _portability(adapter, fact.multi_hop, langs, tpl, config, batch_size)
        mcqa = mcqa_measures(adapter, [fact], langs, tpl, batch_size) if mlake else []
        mine = own_measures(adapter, [fact], langs, tpl, config, batch_size) if own else []
        scorer = paper_scorer(dataset) if own else None
        paper = (
            paper_measures(
                adapter,
                [fact],
                langs,
                tpl,
                batch_size,
                _locality_reference(scorer, paper_before),
                ppl=scorer.ppl,
            )
            if scorer
            else None
        )
    for rec in measured.to_dict(orient="records"):
        b, form = rec["lang"], rec["form"]
        if b == request.lang:
            kind = "efficacy" if form == request.form else "generalization"
        else:
            kind = "transfer"
        noop = fact.views[b].edit_is_noop  # new answer == old one there: nothing to measure
        hit = float(rec["greedy_match"] == "edit")
        prior = new_before.get((request.fact_id, b, form))
        rows.append(
            {
                **base,
                "test_lang": b,
                "form": form,
                "kind": kind,
                "n": 0 if noop else 1,
                "success_prob": math.nan
                if noop or math.isnan(rec["target_alias_logp"])  # no original answer
                else float(rec["edit_alias_logp"] > rec["target_alias_logp"]),
                "p_new": math.nan if noop else math.exp(rec["edit_alias_logp"]),
                "success_greedy": math.nan if noop else hit,
                "known_before": bool(known_before.get((request.fact_id, b), False)),
                "greedy_text": rec["greedy_text"],
                **_counts(
                    0 if noop else 1,
                    0.0 if noop else hit,
                    math.nan,
                    math.nan if noop or prior is None else float(prior),
                    math.nan,
                    "edit is a no-op (new answer = original)" if noop else "",
                ),
            }
        )
    for m in mine:
        key = (request.fact_id, m["test_lang"], m["form"], m["kind"], "")
        own_prior = before.get(key, (math.nan, math.nan))[0]
        rows.append(
            {
                **base,
                "test_lang": m["test_lang"],
                "form": m["form"],
                "kind": m["kind"],
                "n": m["n"],
                "success_prob": m["success_prob"],
                "p_new": m["p_new"],
                "success_greedy": m["chose_edit"] / m["n"] if m["n"] else math.nan,
                "known_before": bool(known_before.get((request.fact_id, m["test_lang"]), False)),
                "greedy_text": m["greedy_text"],
                **_counts(m["n"], m["chose_edit"], math.nan, own_prior, math.nan, m["missing"]),
            }
        )
    for b in [] if own else langs:
        sub = loc[loc["lang"] == b]
        kept = [
            float(m == "original")
            for f, m in zip(sub["fact_id"], sub["greedy_match"], strict=True)
            if known_before.get((int(f), b), False)
        ]
        rows.append(
            {
                **base,
                "test_lang": b,
                "form": "question",
                "kind": "locality",
                "n": len(kept),
                "success_prob": math.nan,
                "p_new": math.nan,
                "success_greedy": sum(kept) / len(kept) if kept else math.nan,
                "known_before": True,
                "greedy_text": "",
                **_counts(len(kept), sum(kept), math.nan, math.nan, math.nan, ""),
            }
        )
    for b in langs:
        if b not in port and not mlake:
            continue  # the free-form protocol's rows as before (its run keys are unchanged)
        hits, n = port.get(b, (0, 0))
        prior_hits = before.get((request.fact_id, b, "multi_hop", "portability", ""), (None,))[0]
        rows.append(
            {
                **base,
                "test_lang": b,
                "form": "multi_hop",
                "kind": "portability",
                "n": n,
                "success_prob": math.nan,
                "p_new": math.nan,
                "success_greedy": hits / n if n else math.nan,
                "known_before": bool(known_before.get((request.fact_id, b), False)),
                "greedy_text": "",
                **_counts(
                    n,
                    hits,
                    math.nan,
                    math.nan if prior_hits is None else prior_hits,
                    math.nan,
                    "" if n else NO_MULTI_HOP,
                ),
            }
        )
    for m in mcqa:
        key = (request.fact_id, m["test_lang"], m["form"], "mcqa", m["mcqa_by"])
        prior_edit, prior_original = before.get(key, (math.nan, math.nan))
        rows.append(
            {
                **base,
                "test_lang": m["test_lang"],
                "form": m["form"],
                "kind": "mcqa",
                "n": m["n"],
                "success_prob": math.nan,
                "p_new": math.nan,
                "success_greedy": m["chose_edit"] / m["n"] if m["n"] else math.nan,
                "known_before": bool(known_before.get((request.fact_id, m["test_lang"]), False)),
                "greedy_text": "",
                **_counts(
                    m["n"],
                    m["chose_edit"],
                    m["chose_original"],
                    prior_edit,
                    prior_original,
                    m["missing"],
                ),
                "mcqa_by": m["mcqa_by"],
            }
        )
    if paper is not None:
        for row in rows:
            _add_paper(row, paper, paper_before or {})
    return rows


#: The measure of the other datasets' papers each row of an edit is, by ``(kind, form)``
#: (:data:`OWN_TABLES`).
PAPER_MEASURE_OF: dict[tuple[str, str], str] = {
    ("efficacy", "question"): "reliability",
    ("transfer", "question"): "reliability",
    ("generalization", "rephrase"): "generalization",
    ("locality", "locality"): "locality",
    ("portability", "multi_hop"): "portability",
}


def paper_columns() -> tuple[str, ...]:
    """The columns of the papers' scorer on an edit's rows: each metric of
    :data:`~mlake_core.metrics.paper_scores.PAPER_METRICS` after the edit and before it."""
    return tuple(f"paper_{m}{s}" for m in PAPER_METRICS for s in ("", "_before"))


def _locality_reference(
    scorer: Any, before: Mapping[tuple[int, str, str], Mapping[str, Any]] | None
) -> dict[tuple[int, str, str], Sequence[int]] | None:
    """The unedited model's locality tokens where ``scorer`` scores locality against them
    (ReMaKE), else ``None`` (against ``loc_ans``)."""
    if scorer is None or scorer.locality != "unedited":
        return None
    return {
        k: v["tokens"] for k, v in (before or {}).items() if k[2] == "locality" and "tokens" in v
    }


def _add_paper(
    row: dict[str, Any],
    paper: Mapping[tuple[int, str, str], Mapping[str, Any]],
    before: Mapping[tuple[int, str, str], Mapping[str, Any]],
) -> None:
    """Put the scorer's values (after the edit, and the unedited model's) on ``row``."""
    measure = PAPER_MEASURE_OF.get((str(row["kind"]), str(row["form"])))
    key = (int(row["fact_id"]), str(row["test_lang"]), measure or "")
    after, prior = paper.get(key, {}), before.get(key, {})
    scored = measure is not None and row["n"] > 0
    for m in PAPER_METRICS:
        row[f"paper_{m}"] = float(after.get(m, math.nan)) if scored else math.nan
        row[f"paper_{m}_before"] = float(prior.get(m, math.nan)) if scored else math.nan


def paper_measures(
    adapter: Any,
    facts: Sequence[Any],
    langs: Sequence[str],
    template: PromptTemplate,
    batch_size: int = 32,
    reference: Mapping[tuple[int, str, str], Sequence[int]] | None = None,
    ppl: Sequence[str] = (),
) -> dict[tuple[int, str, str], dict[str, Any]]:
    """The dataset's own scorer (:mod:`mlake_core.metrics.paper_scores`: teacher-forced
    token F1, exact match and token accuracy) on every measure of its papers, with the model
    as it is: per ``(fact_id, test_lang, measure)`` (``reliability``: the question and the
    new answer; ``generalization``: the record's rephrase and the new answer; ``locality``:
    the ``loc`` question and ``loc_ans``; ``portability``: the portability question and its
    answer), ``{metric: value}``.  Each prompt is the template's question prompt and the
    answer is joined to it by the template's answer prefix, as every scored answer; a
    question that is not asked (a no-op edit, no such question, an empty answer) has no
    entry.  Each entry also holds the argmax ``tokens``.  With ``reference`` (ReMaKE's
    locality, :attr:`~mlake_core.metrics.paper_scores.PaperScorer.locality` ``unedited``:
    the unedited model's locality ``tokens``, by the same key) the locality questions are
    scored against those instead of ``loc_ans``; one without a reference is not scored.
    The measures in ``ppl`` (BMIKE-53's CounterFact and WikiFactDiff:
    :attr:`~mlake_core.metrics.paper_scores.PaperScorer.ppl`) also get ``ppl``: 1 where the
    answer's per-token mean log-probability after the prompt is above the other answer's
    (reliability, generalization: the new answer against ``loc_ans``; locality: ``loc_ans``
    against the new answer), else 0; none where the record lacks either answer.

    Raises:
        DataError: a prompt with its answer that the model cannot run, naming it.
    """
    from mlake_core.metrics.knowledge import score_sequences

    tokenizer = adapter.tokenizer
    keys: list[tuple[int, str, str]] = []
    items: list[tuple[list[int], list[int], str]] = []
    refs: list[Sequence[int] | None] = []
    pairs: list[tuple[list[int], list[int]]] = []  # the perplexity comparisons' sequences
    compared: dict[tuple[int, str, str], tuple[int, int]] = {}  # key -> (answer, other)
    for fact in facts:
        for b in langs:
            view = fact.views[b]
            if not isinstance(view, ExternalView):
                continue
            asked: list[tuple[str, str | None, str]] = []
            q = view.question
            if askable(view, q) and not view.edit_is_noop:
                asked.append(("reliability", q.text, q.edit_target.text))
            if view.rephrase is not None and not view.edit_is_noop:
                asked.append(("generalization", view.rephrase.text, view.rephrase.edit_target.text))
            if view.locality is not None:
                asked.append(("locality", *view.locality))
            if view.portability is not None:
                asked.append(("portability", *view.portability))
            for measure, text, answer in asked:
                if not text or not answer or not answer.strip():
                    continue
                prompt, prefix = template.question_prompt(text, b)
                ids = adapter.encode(prompt)
                answer_ids = list(
                    tokenizer(prefix + answer.strip(), add_special_tokens=False)["input_ids"]
                )
                if not answer_ids:
                    continue
                adapter.check_fits(
                    len(ids) + len(answer_ids) - 1, f"fact {fact.fact_id} [{b}] {measure} question"
                )
                key = (fact.fact_id, b, measure)
                if measure == "locality" and reference is not None:
                    if key not in reference:
                        continue  # no prediction of the unedited model to compare with
                    refs.append(reference[key])
                else:
                    refs.append(None)
                keys.append(key)
                items.append((ids, answer_ids, answer))
                if measure in ppl and view.locality is not None:
                    other = q.edit_target.text if measure == "locality" else view.locality[1]
                    other_ids = list(
                        tokenizer(prefix + other.strip(), add_special_tokens=False)["input_ids"]
                    )
                    if other.strip() and other_ids:
                        adapter.check_fits(
                            len(ids) + len(other_ids) - 1,
                            f"fact {fact.fact_id} [{b}] {measure} question (perplexity)",
                        )
                        compared[key] = (len(pairs), len(pairs) + 1)
                        pairs += [(ids, answer_ids), (ids, other_ids)]
    scores = (
        teacher_forced_scores(adapter, items, batch_size=batch_size, references=refs)
        if items
        else []
    )
    out = {k: {**s.metrics(), "tokens": list(s.tokens)} for k, s in zip(keys, scores, strict=True)}
    if pairs:
        logp = score_sequences(adapter, pairs, batch_size=batch_size)
        for key, (first, second) in compared.items():
            out[key]["ppl"] = float(logp[first].mean > logp[second].mean)
    return out


def paper_map(table: Any) -> dict[tuple[int, str, str], dict[str, Any]]:
    """:func:`own_baseline`'s table's scorer values as :func:`evaluate_edit`'s
    ``paper_before``: per ``(fact_id, test_lang, measure)`` (its rows' ``kind``), each
    metric and, where saved, the argmax ``tokens`` (column ``paper_tokens``)."""
    if "paper_f1" not in table:
        return {}
    out: dict[tuple[int, str, str], dict[str, Any]] = {}
    for r in table.to_dict(orient="records"):
        values: dict[str, Any] = {m: float(r.get(f"paper_{m}", math.nan)) for m in PAPER_METRICS}
        values = {m: v for m, v in values.items() if not math.isnan(v)}  # not scored
        if not values:
            continue
        tokens = r.get("paper_tokens")
        if tokens is not None:
            values["tokens"] = [int(t) for t in tokens]
        out[int(r["fact_id"]), str(r["test_lang"]), str(r["kind"])] = values
    return out


#: ``missing`` of a portability row whose fact has no linked "new" multi-hop question there.
NO_MULTI_HOP = "no linked multi-hop question"

#: ``missing`` of a generalization row (form ``rephrase``) whose record has no rephrase there.
NO_REPHRASE = "no rephrase"

#: ``missing`` of a locality row (form ``locality``) whose record has no locality question.
NO_LOCALITY = "no locality question"


def own_measures(
    adapter: Any,
    facts: Sequence[Any],
    langs: Sequence[str],
    template: PromptTemplate,
    config: TransferConfig,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Generalization and locality as the other datasets measure them (MzsRE, BMIKE-53:
    :class:`~mlake_core.data.external.ExternalView`), with the model as it is: per fact and
    test language, kind ``generalization`` (form ``rephrase``: the record's rephrase, whose
    greedy answer must give the new answer; ``success_prob`` p(new) > p(old) where the record
    gives an old answer, ``p_new``) and kind ``locality`` (form ``locality``: the record's
    unrelated ``loc`` question, whose greedy answer must still give ``loc_ans``).  Each dict
    has ``n`` (1, or 0 with the reason in ``missing``: :data:`NO_REPHRASE`,
    :data:`NO_LOCALITY`, or the knowledge measure's skip reason) and ``chose_edit`` (the hits).
    Scored by mlake's greedy alias match, the measure of every other row (the papers' own
    scorers are :func:`paper_measures`', on the same questions)."""
    kcfg = KnowledgeConfig(
        forms=("question",),
        max_new_tokens=config.max_new_tokens,
        mcqa=False,
        stop_when_decided=config.stop_when_decided,
    )
    wanted: list[tuple[int, str, str, str]] = []  # fact, lang, kind, form
    rephrased, local = [], []
    for fact in facts:
        for b in langs:
            view = fact.views[b]
            wanted.append((fact.fact_id, b, "generalization", "rephrase"))
            wanted.append((fact.fact_id, b, "locality", "locality"))
            if not isinstance(view, ExternalView):
                continue
            r = view.rephrased()
            if r is not None:
                rephrased.append(r)
            lv = view.locality_view()
            if lv is not None:
                local.append(lv)
    gen = measure_knowledge(adapter, rephrased, template, kcfg, batch_size=batch_size).table
    loc = measure_knowledge(
        adapter, local, template, kcfg, batch_size=batch_size, scored=False
    ).table
    got: dict[tuple[int, str, str], dict[str, Any]] = {}
    for kind, table, hit in (("generalization", gen, "edit"), ("locality", loc, "original")):
        for rec in table.to_dict(orient="records"):
            t_logp = rec["target_alias_logp"]
            got[int(rec["fact_id"]), str(rec["lang"]), kind] = {
                "chose_edit": float(rec["greedy_match"] == hit),
                "greedy_text": rec["greedy_text"],
                "success_prob": math.nan
                if kind == "locality" or math.isnan(t_logp)
                else float(rec["edit_alias_logp"] > t_logp),
                "p_new": math.exp(rec["edit_alias_logp"]) if kind != "locality" else math.nan,
            }
    by_id = {f.fact_id: f for f in facts}
    out = []
    for fid, b, kind, form in wanted:
        m = got.get((fid, b, kind))
        view = by_id[fid].views[b]
        field = "rephrase" if kind == "generalization" else "locality"
        absent = getattr(view, field, None) is None
        missing = (
            (NO_REPHRASE if kind == "generalization" else NO_LOCALITY)
            if absent
            else ("" if m else "not measurable (too long, or no answer tokens)")
        )
        out.append(
            {
                "fact_id": fid,
                "test_lang": b,
                "kind": kind,
                "form": form,
                "n": 1 if m else 0,
                "chose_edit": m["chose_edit"] if m else 0.0,
                "greedy_text": m["greedy_text"] if m else "",
                "success_prob": m["success_prob"] if m else math.nan,
                "p_new": m["p_new"] if m else math.nan,
                "missing": missing,
            }
        )
    return out


def own_baseline(
    adapter: Any,
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: TransferConfig,
    batch_size: int = 32,
) -> Any:
    """The unedited model's :func:`own_measures` (a pandas DataFrame, columns
    :data:`BASELINE_COLUMNS`): how often the rephrase already gives the new answer, and the
    locality question ``loc_ans``, before any edit (the prior of every edit's rows); also
    how often the portability question already gives its answer (kind ``portability``).
    Where the dataset has its own scorer, the scorer's values (``paper_f1``, ``paper_em``,
    ``paper_acc``, :func:`paper_measures`) are on those rows and on rows of kind
    ``reliability`` (the question, whose greedy prior the knowledge stage measures:
    ``chose_edit`` NaN there), with the argmax tokens (``paper_tokens``: the reference of
    ReMaKE's locality, against which the unedited model scores 1)."""
    import pandas as pd

    facts = [dataset.fact(i) for i in fact_ids]
    records = [
        {
            "fact_id": m["fact_id"],
            "test_lang": m["test_lang"],
            "form": m["form"],
            "kind": m["kind"],
            "mcqa_by": "",
            "n": m["n"],
            "chose_edit": m["chose_edit"],
            "chose_original": math.nan,
            "missing": m["missing"],
        }
        for m in own_measures(adapter, facts, langs, template, config, batch_size)
    ]
    for fact in facts:
        port = _portability(adapter, fact.multi_hop, langs, template, config, batch_size)
        for b, (hits, n) in port.items():
            records.append(
                {
                    "fact_id": fact.fact_id,
                    "test_lang": b,
                    "form": "multi_hop",
                    "kind": "portability",
                    "mcqa_by": "",
                    "n": n,
                    "chose_edit": float(hits),
                    "chose_original": math.nan,
                    "missing": "",
                }
            )
    columns = list(BASELINE_COLUMNS)
    scorer = paper_scorer(dataset)
    if scorer is not None:
        paper = paper_measures(adapter, facts, langs, template, batch_size, ppl=scorer.ppl)
        if scorer.locality == "unedited":  # scored against itself (teacher-forced tokens)
            for (_, _, measure), got in paper.items():
                if measure == "locality":
                    got.update(dict.fromkeys(TF_METRICS, 1.0))
        for rec in records:
            got = paper.get((rec["fact_id"], rec["test_lang"], rec["kind"]), {})
            rec.update({f"paper_{m}": got.get(m, math.nan) for m in PAPER_METRICS})
            rec["paper_tokens"] = got.get("tokens")
        for (fid, b, measure), got in paper.items():
            if measure == "reliability":
                records.append(
                    {
                        "fact_id": fid,
                        "test_lang": b,
                        "form": "question",
                        "kind": "reliability",
                        "mcqa_by": "",
                        "n": 1,
                        "chose_edit": math.nan,
                        "chose_original": math.nan,
                        "missing": "",
                        **{f"paper_{m}": got.get(m, math.nan) for m in PAPER_METRICS},
                        "paper_tokens": got["tokens"],
                    }
                )
        columns += [*(f"paper_{m}" for m in PAPER_METRICS), "paper_tokens"]
    return pd.DataFrame.from_records(records, columns=columns)


def _counts(
    n: int,
    chose_edit: float,
    chose_original: float,
    chose_edit_before: float,
    chose_original_before: float,
    missing: str,
) -> dict[str, Any]:
    """The count columns every row of an edit carries (see the module docstring)."""
    return {
        "chose_edit": float(chose_edit),
        "chose_original": float(chose_original),
        "chose_edit_before": float(chose_edit_before),
        "chose_original_before": float(chose_original_before),
        "missing": missing,
        "mcqa_by": "",
    }


def mcqa_measures(
    adapter: Any,
    facts: Sequence[Any],
    langs: Sequence[str],
    template: PromptTemplate,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Multiple choice of ``facts`` in every language of ``langs``, with the model as it is:
    one dict per (fact, test language, form, way) with ``n`` (questions scored),
    ``chose_edit`` (answered with the edit's option: single-hop, the record's edit letter;
    multi-hop, the "new" record's letter, the answer of the edited chain), ``chose_original``
    (single-hop: the original fact's option; NaN for multi-hop, whose "new" records give no
    original option) and ``missing`` (why ``n`` is 0, else empty).  Both ways come from one
    :func:`~mlake_core.metrics.knowledge.score_mcqa` call (``loglik``: the most probable
    option text; ``letter``: the most probable letter with the options in the prompt)."""
    items: list[McqaItem] = []
    targets: list[tuple[int, str, str, int, int | None]] = []  # fact, lang, form, edit, orig
    cells: dict[tuple[int, str, str], dict[str, Any]] = {}
    for fact in facts:
        for b in langs:
            view = fact.views[b]
            cell = cells.setdefault((fact.fact_id, b, "question"), {"n": 0, "missing": ""})
            rec = view.mcqa
            if rec is None:
                cell["missing"] = "no multiple-choice record"
            elif not rec.usable:
                cell["missing"] = f"multiple-choice record unusable: {rec.problem}"
            elif rec.edit_index is None or rec.edit_index == rec.answer_index:
                cell["missing"] = "multiple-choice record gives no distinct edit option"
            elif view.edit_is_noop:
                cell["missing"] = "edit is a no-op (new answer = original)"
            else:
                items.append(
                    McqaItem(
                        f"fact {fact.fact_id} [{b}] multiple choice", b, rec.question, rec.options
                    )
                )
                targets.append((fact.fact_id, b, "question", rec.edit_index, rec.answer_index))
                cell["n"] = 1
            cell = cells.setdefault((fact.fact_id, b, "multi_hop"), {"n": 0, "missing": ""})
            linked = [q for q in fact.multi_hop if q.kind == "new" and q.lang == b]
            usable = [
                q
                for q in linked
                if q.options and q.answer_index is not None and q.mcqa_problem is None
            ]
            if not linked:
                cell["missing"] = NO_MULTI_HOP
            elif not usable:
                cell["missing"] = "no usable multi-hop multiple-choice record"
            for q in usable:
                items.append(
                    McqaItem(
                        f"multi-hop new question {q.index} [{b}] (fact {fact.fact_id}) "
                        "multiple choice",
                        b,
                        q.question,
                        q.options,
                    )
                )
                targets.append((fact.fact_id, b, "multi_hop", int(q.answer_index), None))
                cell["n"] += 1
    scores = score_mcqa(adapter, items, template, batch_size=batch_size)
    counts: dict[tuple[int, str, str, str], list[float]] = {}
    for (fid, b, form, edit, orig), score in zip(targets, scores, strict=True):
        for way, choice in (("loglik", score.choice), ("letter", score.letter_choice)):
            c = counts.setdefault((fid, b, form, way), [0.0, 0.0])
            c[0] += float(choice == edit)
            c[1] += float(orig is not None and choice == orig)
    out = []
    for (fid, b, form), cell in cells.items():
        for way in MCQA_WAYS:
            edit_n, orig_n = counts.get((fid, b, form, way), [0.0, 0.0])
            out.append(
                {
                    "fact_id": fid,
                    "test_lang": b,
                    "form": form,
                    "mcqa_by": way,
                    "n": cell["n"],
                    "chose_edit": edit_n,
                    "chose_original": orig_n if form == "question" else math.nan,
                    "missing": cell["missing"] if not cell["n"] else "",
                }
            )
    return out


def protocol_baseline(
    adapter: Any,
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: TransferConfig,
    batch_size: int = 32,
) -> Any:
    """The unedited model's counts behind the ``mlake`` protocol's rows (a pandas DataFrame,
    one row per fact, test language, form, kind and way): multiple choice
    (:func:`mcqa_measures`) and multi-hop portability (the new answer of the edited chain,
    given before any edit).

    Raises:
        ConfigError: the data has no multiple-choice record at all (v2024-11), naming the
            release that has them.
    """
    import pandas as pd

    facts = [dataset.fact(i) for i in fact_ids]
    require_mcqa(dataset, langs)
    records = [
        {**m, "kind": "mcqa"} for m in mcqa_measures(adapter, facts, langs, template, batch_size)
    ]
    for fact in facts:
        port = _portability(adapter, fact.multi_hop, langs, template, config, batch_size)
        for b in langs:
            hits, n = port.get(b, (0, 0))
            records.append(
                {
                    "fact_id": fact.fact_id,
                    "test_lang": b,
                    "form": "multi_hop",
                    "mcqa_by": "",
                    "n": n,
                    "chose_edit": float(hits),
                    "chose_original": math.nan,
                    "missing": "" if n else NO_MULTI_HOP,
                    "kind": "portability",
                }
            )
    return pd.DataFrame.from_records(records, columns=list(BASELINE_COLUMNS))


#: Columns of :func:`protocol_baseline`'s table.
BASELINE_COLUMNS: tuple[str, ...] = (
    "fact_id",
    "test_lang",
    "form",
    "kind",
    "mcqa_by",
    "n",
    "chose_edit",
    "chose_original",
    "missing",
)


def baseline_map(table: Any) -> dict[tuple[Any, ...], tuple[float, float]]:
    """:func:`protocol_baseline`'s table as :func:`evaluate_edit`'s ``before``."""
    return {
        (
            int(r["fact_id"]),
            str(r["test_lang"]),
            str(r["form"]),
            str(r["kind"]),
            str(r["mcqa_by"]),
        ): (
            float(r["chose_edit"]),
            float(r["chose_original"]),
        )
        for r in table.to_dict(orient="records")
    }


def require_mcqa(dataset: MlakeDataset, langs: Sequence[str]) -> None:
    """Refuse the ``mlake`` protocol on data without multiple-choice records.

    Raises:
        ConfigError: no fact has a multiple-choice record in any of ``langs``.
    """
    if not any(f.views[b].mcqa is not None for f in dataset.facts for b in langs):
        raise ConfigError(
            f"--protocol mlake: MLaKE {dataset.version} has no multiple-choice records; use "
            "--version v2024-04 (the same single-hop and multi-hop questions, with their "
            "multiple-choice versions)"
        )


def _portability(
    adapter: Any,
    questions: Sequence[Any],
    langs: Sequence[str],
    template: PromptTemplate,
    config: TransferConfig,
    batch_size: int,
) -> dict[str, tuple[int, int]]:
    """Per language: (multi-hop new-answer questions answered with the new answer, count)."""
    items = [q for q in questions if q.kind == "new" and q.lang in langs]
    if not items:
        return {}
    prompts = [adapter.encode(template.question_prompt(q.question, q.lang)[0]) for q in items]
    for q, ids in zip(items, prompts, strict=True):
        adapter.check_fits(
            len(ids) + config.max_new_tokens - 1,  # the last generated token is not fed back
            f"multi-hop {q.kind} question {q.index} [{q.lang}]",
        )
    decided = None
    if config.stop_when_decided:
        decided = [
            lambda text, forms=(q.answer, *q.aliases): answer_decided(template.cut(text), forms)
            for q in items
        ]
    generated = greedy_generate(
        adapter,
        prompts,
        max_new_tokens=config.max_new_tokens,
        stop=template.stop,
        batch_size=batch_size,
        decided=decided,
    )
    out: dict[str, tuple[int, int]] = {}
    for q, ids in zip(items, generated, strict=True):
        text = template.cut(adapter.tokenizer.decode(ids, skip_special_tokens=True))
        ok = match_answer(text, (q.answer, *q.aliases), (), q.lang) == "original"
        hits, n = out.get(q.lang, (0, 0))
        out[q.lang] = (hits + int(ok), n + 1)
    return out


def transfer_matrix(
    rows: Any, metric: str = "success_greedy", form: str = "question", known_only: bool = True
) -> Any:
    """The edit-language x test-language matrix of ``metric`` (a pandas DataFrame).

    Diagonal cells are efficacy (or generalization, for the form not edited), off-diagonal
    cells transfer; with ``known_only``, only facts the model knew in the test language before
    the edit count.
    """
    sel = rows[
        (rows["form"] == form) & rows["kind"].isin(["efficacy", "generalization", "transfer"])
    ]
    if known_only:
        sel = sel[sel["known_before"]]
    return sel.pivot_table(index="edit_lang", columns="test_lang", values=metric, aggfunc="mean")


#: The paper's tables, in order: (hop, format, how each cell is read).
PROTOCOL_TABLES: tuple[tuple[str, str, str], ...] = (
    ("single-hop", "free-form", "greedy alias match gives the new answer"),
    ("single-hop", "mcqa-loglik", "the edit's option is the most probable option text"),
    ("single-hop", "mcqa-letter", "the edit's letter is chosen, options in the prompt"),
    ("multi-hop", "free-form", "greedy alias match gives the edited chain's answer"),
    ("multi-hop", "mcqa-loglik", "the edited chain's option is the most probable text"),
    ("multi-hop", "mcqa-letter", "the edited chain's letter is chosen, options in the prompt"),
)

#: Columns of :func:`protocol_cells` (and of the CSV ``mlake edit transfer --protocol mlake``
#: writes, with ``method`` first).
CELL_COLUMNS: tuple[str, ...] = (
    "hop",
    "format",
    "edit_lang",
    "test_lang",
    "pct",
    "before_pct",
    "original_pct",
    "n",
    "chose_edit",
    "facts",
    "missing",
    "edits",
)


def _table_rows(rows: Any, hop: str, fmt: str) -> Any:
    """The rows of one of :data:`PROTOCOL_TABLES`' tables."""
    kind, form = rows["kind"], rows["form"]
    if fmt == "free-form":
        if hop == "single-hop":
            return rows[
                (form == "question") & kind.isin(["efficacy", "generalization", "transfer"])
            ]
        return rows[kind == "portability"]
    way = fmt.removeprefix("mcqa-")
    return rows[
        (kind == "mcqa")
        & (form == ("question" if hop == "single-hop" else "multi_hop"))
        & (rows["mcqa_by"] == way)
    ]


def protocol_cells(rows: Any, langs: Sequence[str]) -> Any:
    """The ``mlake`` protocol's tables as one long table (a pandas DataFrame, columns
    :data:`CELL_COLUMNS`), one row per table of :data:`PROTOCOL_TABLES` and (edit language,
    test language).

    In each cell: ``n`` questions (single-hop: one per fact; multi-hop: every linked "new"
    question), ``chose_edit`` of them answered with the edit, ``pct`` = 100 ``chose_edit`` /
    ``n``; ``before_pct`` the same of the unedited model on the same questions (the prior);
    ``original_pct`` the share choosing the original fact's option (single-hop multiple
    choice); ``facts`` the edited facts measured there, ``missing`` the edited facts with no
    question there (no record, an unusable one, a no-op edit, or not measured: runs of the
    free-form protocol have no multiple-choice rows), ``edits`` = ``facts`` + ``missing``
    (the facts edited in the edit language).  Free-form cells count every edited fact (the
    paper's protocol), not only those known before as :func:`transfer_matrix` does.  Values
    are rounded to 0.1 (as printed).
    """
    import pandas as pd

    rows = _with_counts(rows)
    edits = rows[rows["kind"] == "efficacy"].groupby("edit_lang")["fact_id"].nunique()
    records = []
    for hop, fmt, _ in PROTOCOL_TABLES:
        sel = _table_rows(rows, hop, fmt)
        for a in langs:
            for b in langs:
                cell = sel[(sel["edit_lang"] == a) & (sel["test_lang"] == b)]
                measured = cell[cell["n"] > 0]
                n = int(measured["n"].sum())
                hits = float(measured["chose_edit"].sum())
                prior = measured["chose_edit_before"]
                orig = measured["chose_original"]
                facts = int(measured["fact_id"].nunique())
                total = int(edits.get(a, 0))
                records.append(
                    {
                        "hop": hop,
                        "format": fmt,
                        "edit_lang": a,
                        "test_lang": b,
                        "pct": _pct(hits, n),
                        "before_pct": _pct(float(prior.sum()), n)
                        if n and prior.notna().all()
                        else math.nan,
                        "original_pct": _pct(float(orig.sum()), n)
                        if n and orig.notna().all()
                        else math.nan,
                        "n": n,
                        "chose_edit": round(hits),
                        "facts": facts,
                        "missing": total - facts,
                        "edits": total,
                    }
                )
    return pd.DataFrame.from_records(records, columns=list(CELL_COLUMNS))


#: The other datasets' tables (ReMaKE, BMIKE-53), in order: (measure, kind, form, how each
#: cell is read); every one edit language x test language.
OWN_TABLES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("reliability", ("efficacy", "transfer"), "question", "the question gives the new answer"),
    ("generalization", ("generalization",), "rephrase", "the rephrase gives the new answer"),
    ("locality", ("locality",), "locality", "the loc question still gives loc_ans"),
    ("portability", ("portability",), "multi_hop", "the portability question's answer"),
)

#: Columns of :func:`own_cells`.
OWN_CELL_COLUMNS: tuple[str, ...] = (
    "measure",
    "edit_lang",
    "test_lang",
    "pct",
    "before_pct",
    "n",
    "hits",
    "missing",
    "edits",
    *(f"paper_{m}{s}" for m in PAPER_METRICS for s in ("_pct", "_before_pct")),
    "paper_n",
    "paper_ppl_n",
)


def own_cells(rows: Any, langs: Sequence[str]) -> Any:
    """The other datasets' measures (:data:`OWN_TABLES`) as one long table (a pandas
    DataFrame, columns :data:`OWN_CELL_COLUMNS`), one row per measure and (edit language,
    test language), counted over every edited fact as the papers do: ``n`` questions
    measured, ``hits`` of them passed, ``pct`` = 100 ``hits`` / ``n``, ``before_pct`` the
    unedited model's rate on the same questions where it was measured (NaN where not: the
    portability prior is measured by ``--protocol mlake`` only), ``missing`` the edited
    facts with no question there (no rephrase, no locality question, a no-op edit),
    ``edits`` the facts edited in the edit language.  Where the rows carry the dataset's own
    scorer (:func:`paper_measures`), ``paper_<metric>_pct`` is its mean over the ``paper_n``
    questions it scored in the cell, in % (F1, EM, token accuracy), and
    ``paper_<metric>_before_pct`` the unedited model's on the same questions; NaN (and
    ``paper_n`` 0) otherwise; the perplexity comparison (``paper_ppl_*``, BMIKE-53's
    CounterFact and WikiFactDiff) over its own ``paper_ppl_n`` questions.  Values rounded
    to 0.1."""
    import pandas as pd

    rows = _with_counts(rows)
    edits = rows[rows["kind"] == "efficacy"].groupby("edit_lang")["fact_id"].nunique()
    records = []
    for measure, kinds, form, _ in OWN_TABLES:
        sel = rows[rows["kind"].isin(kinds) & (rows["form"] == form)]
        for a in langs:
            for b in langs:
                cell = sel[(sel["edit_lang"] == a) & (sel["test_lang"] == b)]
                measured = cell[cell["n"] > 0]
                n = int(measured["n"].sum())
                hits = float(measured["chose_edit"].sum())
                prior = measured["chose_edit_before"]
                records.append(
                    {
                        "measure": measure,
                        "edit_lang": a,
                        "test_lang": b,
                        "pct": _pct(hits, n),
                        "before_pct": _pct(float(prior.sum()), n)
                        if n and prior.notna().all()
                        else math.nan,
                        "n": n,
                        "hits": round(hits),
                        "missing": int(edits.get(a, 0)) - int(measured["fact_id"].nunique()),
                        "edits": int(edits.get(a, 0)),
                        **_paper_cell(measured),
                    }
                )
    return pd.DataFrame.from_records(records, columns=list(OWN_CELL_COLUMNS))


def _paper_cell(measured: Any) -> dict[str, Any]:
    """:func:`own_cells`' scorer columns of one cell's measured rows: each metric's mean
    over the rows it scored (``paper_n`` those of the teacher-forced metrics,
    ``paper_ppl_n`` those of the perplexity comparison)."""
    out: dict[str, Any] = {}
    for m in PAPER_METRICS:
        col = f"paper_{m}"
        scored = measured[measured[col].notna()] if col in measured else measured[:0]
        n = len(scored)
        out["paper_ppl_n" if m == "ppl" else "paper_n"] = n
        prior = scored[f"{col}_before"] if n and f"{col}_before" in scored else None
        out[f"{col}_pct"] = _pct(float(scored[col].sum()), n) if n else math.nan
        out[f"{col}_before_pct"] = (
            _pct(float(prior.sum()), n) if prior is not None and prior.notna().all() else math.nan
        )
    return out


def _pct(hits: float, n: int) -> float:
    return round(100.0 * hits / n, 1) if n else math.nan


def _with_counts(rows: Any) -> Any:
    """``rows`` with the count columns (rows saved before they existed get them from
    ``n`` and ``success_greedy``; their priors are unknown, NaN)."""
    rows = rows.copy()
    for col in ("chose_edit", "chose_original", "chose_edit_before", "chose_original_before"):
        if col not in rows:
            rows[col] = math.nan
    if "mcqa_by" not in rows:
        rows["mcqa_by"] = ""
    if "missing" not in rows:
        rows["missing"] = ""
    derived = rows["success_greedy"].fillna(0.0) * rows["n"]
    rows["chose_edit"] = rows["chose_edit"].fillna(derived)
    return rows


def missing_reasons(rows: Any) -> Any:
    """Why facts have no multiple-choice or multi-hop question in a test language (a pandas
    DataFrame: ``hop``, ``test_lang``, ``missing`` (the reason), ``facts``), counted once
    per fact (the reason does not depend on the edit language)."""
    import pandas as pd

    rows = _with_counts(rows)
    sel = rows[(rows["n"] == 0) & rows["kind"].isin(["mcqa", "portability"])]
    if sel.empty:
        return pd.DataFrame(columns=["hop", "test_lang", "missing", "facts"])
    hop = sel["form"].map({"question": "single-hop", "multi_hop": "multi-hop"})
    sel = sel.assign(hop=hop)[["hop", "test_lang", "missing", "fact_id"]].drop_duplicates()
    return (
        sel.groupby(["hop", "test_lang", "missing"], sort=True)["fact_id"]
        .nunique()
        .rename("facts")
        .reset_index()
    )


@dataclass
class TransferRun:
    """A transfer run as read back (:meth:`load`): its rows, meta and key.

    Attributes:
        path: the run folder.
        rows: every edit's rows (:func:`evaluate_edit`'s, with the edit's timing), a pandas
            DataFrame.
        meta: the run's ``meta.json`` (method, method config, languages, facts, ...).
        key: the run's ``key.json`` (what its folder name hashes).
    """

    path: Path
    rows: Any  # pandas.DataFrame
    meta: dict[str, Any]
    key: dict[str, Any]
    #: Edits saved per edit language (:meth:`load` with ``partial``; a complete language
    #: counts its table's edits), in the run's language order.
    saved: dict[str, int] = field(default_factory=dict)
    #: The edit languages whose table is saved (complete); the others are partial.
    complete: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        """The editing method."""
        return str(self.meta.get("method") or self.key.get("method"))

    @property
    def label(self) -> str:
        """The method with its unit restriction, e.g. ``ft[shared]`` (``ft`` when all)."""
        units = (self.meta.get("method_config") or {}).get("units", "all")
        return self.method if units in ("all", None) else f"{self.method}[{units}]"

    @property
    def n_facts(self) -> int:
        """Facts per edit language the run was asked for (its key's ``n_facts``)."""
        return int(self.key.get("n_facts") or 0)

    @property
    def langs(self) -> list[str]:
        """The run's languages, in its order (its key's ``langs``)."""
        return [str(x) for x in self.key.get("langs") or []]

    @property
    def is_complete(self) -> bool:
        """Whether every edit language's table is saved (a language the run skipped whole,
        restricted editing with an empty neuron set, counts as done)."""
        return bool(self.langs) and set(self.langs) <= set(self.complete)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str], *, partial: bool = False) -> TransferRun:
        """A transfer run's per-edit-language tables (``tables/edits_<lang>.parquet``),
        concatenated in file-name order (by language code; the stage returned the same rows
        in the run's language order), with its meta and key.

        With ``partial``, a run that is still going (or was stopped) is read as far as it
        got: an edit language without its table contributes the edits saved one by one so
        far (``tables/edit_<lang>_<fact>.parquet``, the pieces a resumed run starts from),
        in fact order; ``saved`` counts each language's edits and ``complete`` names the
        languages whose table is saved.  A skipped edit (counted in the run's meta) saves
        no rows.

        Raises:
            DataError: not a transfer run, or no table (``partial``: no edit) saved yet
                (the message names the folder).
        """
        import pandas as pd

        run = read_run(run_dir, "transfer")
        key = run.load_json("key")
        folder = run.path / "tables"
        tables = sorted(folder.glob("edits_*.parquet"))
        frames = [run.load_table(t.stem) for t in tables]
        complete = tuple(t.stem.removeprefix("edits_") for t in tables)
        saved = {
            t.stem.removeprefix("edits_"): _edits_in(f) for t, f in zip(tables, frames, strict=True)
        }
        # Languages the stage skipped whole (restricted editing with an empty neuron set)
        # never get a table: they are done, with no edit.
        skipped = {
            str(k).rsplit(":", 1)[0]
            for k in (run.meta.get("skipped") or {})
            if str(k).endswith(":EmptyUnitSet")
        }
        for lang in sorted(skipped - set(complete)):
            complete += (lang,)
            saved[lang] = 0
        if partial:
            langs = [str(x) for x in key.get("langs") or []]
            for lang in [x for x in langs if x not in complete]:
                done = _pieces(run, lang)
                if done is None or (not done and run.has_table(f"edits_{lang}")):
                    # Finished while being read: its table is saved now (the stage saves
                    # it before it removes the pieces).
                    table = run.load_table(f"edits_{lang}")
                    frames.append(table)
                    complete += (lang,)
                    saved[lang] = _edits_in(table)
                    continue
                frames += [f for f in done if len(f)]
                saved[lang] = len(done)
            order = {lang: i for i, lang in enumerate(langs)}
            saved = dict(sorted(saved.items(), key=lambda kv: order.get(kv[0], len(order))))
        frames = [f for f in frames if len(f)]
        if not frames:
            raise DataError(
                f"{run.path}: no edits_<lang> table yet (is the run still going? "
                + ("no edit is saved either)" if partial else "mlake edit report reads it so far)")
            )
        rows = pd.concat(frames, ignore_index=True)
        return cls(run.path, rows, run.meta, key, saved, complete)


def _pieces(run: Any, lang: str) -> list[Any] | None:
    """The edits of ``lang`` saved one by one (``edit_<lang>_<fact>``), in fact order; ``None``
    when one vanished while being read because the language's table was saved meanwhile (the
    stage removes the pieces once it is)."""
    name = re.compile(rf"edit_{re.escape(lang)}_(\d+)")
    # A piece counts once its generator state is saved too (the stage saves the rows first;
    # a resumed run redoes an edit without its state).
    found = [
        (m, t)
        for t in run.path.glob("tables/edit_*.parquet")
        if (m := name.fullmatch(t.stem)) and run.has_arrays(t.stem)
    ]
    out = []
    for _, t in sorted(found, key=lambda mt: int(mt[0].group(1))):
        try:
            out.append(run.load_table(t.stem))
        except DataError:
            if run.has_table(f"edits_{lang}"):
                return None
            raise
    return out


def _edits_in(rows: Any) -> int:
    """The edits (fact, edit language) in an edit table's rows."""
    if rows.empty:
        return 0
    return int(rows[["fact_id", "edit_lang"]].drop_duplicates().shape[0])


def load_transfer(run_dir: str | os.PathLike[str]) -> TransferRun:
    """:meth:`TransferRun.load` (kept for callers)."""
    return TransferRun.load(run_dir)
