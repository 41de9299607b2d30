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

Each row has the probability measures (``success_prob``: alias-aware p(new) > p(old);
``p_new``: the summed probability of the new answer's forms) and the greedy measure
(``success_greedy``: greedy alias match gives the new answer), with ``known_before``: whether
the model answered ``f`` in B correctly before the edit (transfer is only meaningful there).

A transfer run's rows are read back as a :class:`TransferRun` (:meth:`TransferRun.load`).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mlake_core.configs import coerce_fields
from mlake_core.data.dataset import MlakeDataset
from mlake_core.editing.base import EditResult
from mlake_core.errors import ConfigError, DataError
from mlake_core.metrics.knowledge import (
    KnowledgeConfig,
    answer_decided,
    greedy_generate,
    match_answer,
    measure_knowledge,
)
from mlake_core.models.prompting import PromptTemplate
from mlake_core.results.store import read_run

#: Row kinds, in report order.
KINDS: tuple[str, ...] = ("efficacy", "generalization", "transfer", "locality", "portability")


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
    """

    edit_form: str = "question"
    n_locality: int = 10
    locality_seed: int = 0
    max_new_tokens: int = KnowledgeConfig().max_new_tokens
    stop_when_decided: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.edit_form not in ("question", "cloze"):
            raise ConfigError(f"--edit-form {self.edit_form!r}: choose question or cloze")
        if self.n_locality < 0:
            raise ConfigError("--n-locality must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.stop_when_decided:  # added later: earlier runs' keys stay valid
            del out["stop_when_decided"]
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
) -> list[dict[str, Any]]:
    """Rows (one per fact, test language, form and kind) for one edit (see the module
    docstring).  ``known_before`` says whether the unedited model answered each
    (fact, language) correctly in the question form (greedy alias match)."""
    (request,) = result.requests[:1]
    fact = dataset.fact(request.fact_id)
    tpl = template.with_context(result.prefix) if result.prefix else template
    kcfg = KnowledgeConfig(
        max_new_tokens=config.max_new_tokens,
        mcqa=False,
        stop_when_decided=config.stop_when_decided,
    )
    rows: list[dict[str, Any]] = []
    base = {
        "method": result.method,
        "fact_id": request.fact_id,
        "edit_lang": request.lang,
        "edit_form": request.form,
        "edit_loss": result.loss,
    }
    with result.applied(adapter):
        measured = measure_knowledge(
            adapter, [fact.views[b] for b in langs], tpl, kcfg, batch_size=batch_size
        ).table
        loc_views = [dataset.fact(i).views[b] for b in langs for i in locality_ids]
        loc = measure_knowledge(
            adapter,
            loc_views,
            tpl,
            replace(kcfg, forms=("question",)),
            batch_size=batch_size,
            scored=False,  # locality reads only the greedy answer
        ).table
        port = _portability(adapter, fact.multi_hop, langs, tpl, config, batch_size)
    for rec in measured.to_dict(orient="records"):
        b, form = rec["lang"], rec["form"]
        if b == request.lang:
            kind = "efficacy" if form == request.form else "generalization"
        else:
            kind = "transfer"
        noop = fact.views[b].edit_is_noop  # new answer == old one there: nothing to measure
        rows.append(
            {
                **base,
                "test_lang": b,
                "form": form,
                "kind": kind,
                "n": 0 if noop else 1,
                "success_prob": math.nan
                if noop
                else float(rec["edit_alias_logp"] > rec["target_alias_logp"]),
                "p_new": math.nan if noop else math.exp(rec["edit_alias_logp"]),
                "success_greedy": math.nan if noop else float(rec["greedy_match"] == "edit"),
                "known_before": bool(known_before.get((request.fact_id, b), False)),
                "greedy_text": rec["greedy_text"],
            }
        )
    for b in langs:
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
            }
        )
    for b, (hits, n) in port.items():
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
            }
        )
    return rows


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

    @property
    def method(self) -> str:
        """The editing method."""
        return str(self.meta.get("method") or self.key.get("method"))

    @property
    def label(self) -> str:
        """The method with its unit restriction, e.g. ``ft[shared]`` (``ft`` when all)."""
        units = (self.meta.get("method_config") or {}).get("units", "all")
        return self.method if units in ("all", None) else f"{self.method}[{units}]"

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> TransferRun:
        """A transfer run's per-edit-language tables (``tables/edits_<lang>.parquet``),
        concatenated in file-name order (by language code; the stage returned the same rows
        in the run's language order), with its meta and key.

        Raises:
            DataError: not a transfer run, or no table saved yet (the message names the
                folder).
        """
        import pandas as pd

        run = read_run(run_dir, "transfer")
        tables = sorted((run.path / "tables").glob("edits_*.parquet"))
        if not tables:
            raise DataError(f"{run.path}: no edits_<lang> table yet (is the run still going?)")
        rows = pd.concat([run.load_table(t.stem) for t in tables], ignore_index=True)
        return cls(run.path, rows, run.meta, run.load_json("key"))


def load_transfer(run_dir: str | os.PathLike[str]) -> TransferRun:
    """:meth:`TransferRun.load` (kept for callers)."""
    return TransferRun.load(run_dir)
