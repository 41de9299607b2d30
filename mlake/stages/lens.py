"""The lens stage: the latent-language lens (:mod:`analysis.lens`) of every known fact, per
prompt language, saved fact by fact."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from mlake.stages.context import StageContext
from mlake.stages.transfer import edit_fact, stage_second_moment
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.results.store import Run


def lens_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
    tuned: Any = None,
) -> tuple[Any, Run]:
    """The latent-language lens of every fact the model knows, per prompt language, each
    fact's lens saved as it finishes (an interrupted run resumes there; a complete run is read
    back without writing).

    Each view is scored on its fact's answer written in every language of the run (the
    question form's original answer of each language's view): its first token with content,
    read where the prompt language's answer begins (:func:`~analysis.lens.reading_tokens`).  Facts the model does not know
    in the prompt language (``knowledge``), and views whose form or answers are not usable,
    are skipped and counted per reason.

    ``tuned``: with ``config.lens`` ``tuned``, the :class:`~analysis.tuned_lens.TunedLens`
    that decodes (:func:`tuned_lens_for`); its key enters the run key.

    The facts read in a language are read ``ctx.batch_size`` per pass, in fixed batches of
    the facts read (known, usable), each under its first piece's claim
    (:meth:`~mlake_core.results.store.Run.claim`); of a batch, only the facts not saved are
    read (a saved lens is never recomputed).  With an executor (``ctx.executor``) the batches
    are computed first as shards, chunks of whole batches in one prompt language
    (:mod:`mlake.executors`), so every fact is read in the same pass as in one process and
    the tables are bit-identical; with ``ctx.shard`` only the shard's batches are computed
    and ``(None, run)`` is returned.

    Returns:
        A :class:`~analysis.lens.LensResult` and the run folder.
    """
    from analysis.lens import (
        LENS_KEYS,
        FactLens,
        LensResult,
        lens_prompts,
        reading_tokens,
        summarize_lens,
    )
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError

    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    decode = _decoder(adapter, config, tuned)
    run = ctx.open_run(
        "lens",
        _Keyed(config.fact_key()),
        known_from="knowledge stage, question form, greedy alias match",
        reading="after the prompt language's leading answer whitespace; first content tokens; "
        "the prompt language's own as tracing reads it",
        **({"tuned": tuned.key} if tuned is not None else {}),
    )
    facts = {f.fact_id: f for f in dataset.facts}
    # Per prompt language: the facts read (known, usable; located on every run, tokenization
    # only, so a resumed run reports the same skips) in batches of batch_size, each batch one
    # pass whichever of its facts are saved, so a resumed or sharded run reads every fact in
    # the same pass as a run in one process.
    batches: dict[str, list[list[tuple[int, tuple[list[int], int, list[int]]]]]] = {}
    skipped_by_lang: dict[str, dict[str, int]] = {}
    for lang in langs:
        known = knowledge.known(lang)
        lang_skipped: dict[str, int] = {}
        todo: list[tuple[int, tuple[list[int], int, list[int]]]] = []
        for fact_id in (f for f in fact_ids if f in facts):
            if fact_id not in known:
                lang_skipped["not known before"] = lang_skipped.get("not known before", 0) + 1
                continue
            try:
                loc = locate_prompt(adapter, facts[fact_id].views[lang], ctx.template, config.form)
            except MlakeError as err:
                reason = str(err).split(": ", 1)[-1]
                lang_skipped[reason] = lang_skipped.get(reason, 0) + 1
                continue
            texts = [facts[fact_id].views[a].form(config.form).target.text for a in langs]
            lead, answers = reading_tokens(adapter, loc, texts[langs.index(lang)], texts)
            tokens = [a for a in answers if a is not None]
            if len(tokens) < len(answers):
                lang_skipped["empty answer"] = lang_skipped.get("empty answer", 0) + 1
                continue
            ids = [*loc.prompt_ids, *lead]
            todo.append((fact_id, (ids, loc.subject_positions[-1], tokens)))
        batches[lang] = [todo[i : i + ctx.batch_size] for i in range(0, len(todo), ctx.batch_size)]
        skipped_by_lang[lang] = lang_skipped
    # Sharded (mlake.executors): a shard is a chunk of whole batches in one prompt language.
    ctx.fill_shards(
        "lens",
        run,
        lens_stage,
        config,
        knowledge=knowledge,
        tuned=tuned,
        units={lang: [[f for f, _ in b] for b in batches[lang]] for lang in langs},
    )
    ctx.say(
        f"lens: {config.lens} lens at {adapter.n_layers} layers, top {config.top_k}; {run.path}"
    )
    summaries, skipped = [], {}
    for lang in langs:
        lenses: list[FactLens] = []
        for chunk in batches[lang]:
            if not ctx.mine(lang, chunk[0][0]):  # another shard's batch
                continue
            names = [f"lens_{lang}_{fact_id}" for fact_id, _ in chunk]
            if not all(run.has_arrays(n) for n in names):
                with run.claim(names[0]):  # one process reads the batch; another waits
                    # The batch's facts not saved (all of them but after an interruption
                    # inside the batch): saved lenses are never recomputed.
                    missing = [
                        (item, n)
                        for item, n in zip(chunk, names, strict=True)
                        if not run.has_arrays(n)
                    ]
                    measured = (
                        lens_prompts(
                            adapter, [item for (_, item), _ in missing], ctx.batch_size, decode
                        )
                        if missing
                        else []
                    )
                    for ((fact_id, (ids, subject_last, answer_ids)), name), (prob, rank) in zip(
                        missing, measured, strict=True
                    ):
                        lens = FactLens(
                            prob=prob,
                            rank=rank,
                            answer_ids=answer_ids,
                            answer_langs=list(langs),
                            positions=[subject_last, len(ids) - 1],
                        )
                        run.save_arrays(name, lens.to_arrays())
                        if on_fact:
                            on_fact({"lang": lang, "fact_id": fact_id})
            lenses += [
                FactLens.from_arrays(run.load_arrays(n, keys=LENS_KEYS, what="a fact lens"))
                for n in names
            ]
        if ctx.shard is not None:
            continue
        summaries.append(summarize_lens(lang, lenses, langs, config.top_k))
        for reason, n in skipped_by_lang[lang].items():
            skipped[f"{lang}:{reason}"] = n
    if ctx.shard is not None:  # a worker: its pieces are saved; the summary is the whole run's
        return None, run
    result = LensResult(
        langs=tuple(langs),
        n_layers=adapter.n_layers,
        top_k=config.top_k,
        summaries=summaries,
        skipped=skipped,
        run_path=str(run.path),
        lens=config.lens,
        tuned=tuned.report() if tuned is not None else {},
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    return result, run


class _Keyed:
    """A run-key config that is a plain dict (:meth:`StageContext.open_run` reads
    ``to_dict``)."""

    def __init__(self, key: dict[str, Any]) -> None:
        self._key = key

    def to_dict(self) -> dict[str, Any]:
        return dict(self._key)


def _decoder(adapter: Any, config: Any, tuned: Any) -> Any:
    """The lens's decoder: ``None`` (the logit lens) or the tuned lens's."""
    from mlake_core.errors import ConfigError

    if config.lens == "tuned":
        if tuned is None:
            raise ConfigError("--lens tuned: no tuned lens given (fit it with tuned_lens_for)")
        return tuned.decoder(adapter)
    return None


def tuned_lens_for(ctx: StageContext, settings: Any = None, log: Any = None) -> Any:
    """The tuned lens of the context's model (:mod:`analysis.tuned_lens`), fitted on the MLaKE
    texts of the facts *not* selected (``ctx.fact_ids`` are evaluated, so never fitted on),
    in every language of the run, or read from the mlake cache when fitted before with the
    same model, data and settings."""
    from analysis.tuned_lens import TunedLensConfig, fit_texts, load_or_fit

    settings = settings or TunedLensConfig()
    chosen = set(ctx.fact_ids)
    others = [f.fact_id for f in ctx.dataset.facts if f.fact_id not in chosen]
    fit, held = fit_texts(ctx.dataset, others, ctx.langs, settings)
    return load_or_fit(
        ctx.adapter,
        ctx.identity(),
        fit,
        held,
        settings,
        data_key=ctx.dataset.content_sha256,
        log=log or ctx.say,
    )


def lens_edits_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    method_config: Any = None,
    corpus: Sequence[str] = (),
    on_item: Callable[[dict[str, Any]], None] | None = None,
    tuned: Any = None,
) -> tuple[Any, Run]:
    """The lens before and after edits (:class:`~analysis.lens.EditLens`): the first
    ``config.edits`` facts known in each edit language A (whose view there can be edited) are
    edited with ``config.method`` (``method_config``: its resolved config; ``corpus``: the
    text of ROME's and MEMIT's key statistics), and each is read in every test language B on
    B's prompt of the same fact, before and inside the edit
    (:meth:`~mlake_core.editing.base.EditResult.applied`, which restores the model): the new
    and the old answer, each written in every language, at every layer and both positions.

    Each edit is saved as it finishes (an interrupted run resumes there; a complete run is
    read back without writing), computed under its piece's claim
    (:meth:`~mlake_core.results.store.Run.claim`).  With an executor (``ctx.executor``) the
    edits are computed first as shards, chunks of edits in one edit language
    (:mod:`mlake.executors`); with ``ctx.shard`` only the shard's edits are computed and
    ``(None, run)`` is returned.  Edits that cannot be made (no subject, a non-finite change)
    and test languages whose prompt is not usable or whose new and old answers begin with the
    same token are skipped and counted per reason.

    Returns:
        A :class:`~analysis.lens.EditLensResult` and the run folder.
    """
    from analysis.lens import (
        EDIT_LENS_KEYS,
        EditLens,
        EditLensResult,
        edit_lens_arrays,
        lens_edit,
        reading_tokens,
        summarize_edit_lens,
    )
    from mlake_core.editing import get_method, make_request
    from mlake_core.editing.base import LocatedPrompt, locate_prompt
    from mlake_core.errors import ConfigError, MlakeError
    from mlake_core.provenance import stable_hash

    if not config.measures_edits:
        raise ConfigError("lens: --method none or --edits 0 measures no edits")
    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    entry = get_method(config.method)
    if method_config is None:
        method_config = entry.config_cls()
    decode = _decoder(adapter, config, tuned)
    run = ctx.open_run(
        "lens_edits",
        config,
        method_config={k: str(v) for k, v in vars(method_config).items()},
        corpus=stable_hash(list(corpus)),
        known_from="knowledge stage, question form, greedy alias match",
        reading="as the lens reads; new answers then old, each in every language",
        **({"tuned": tuned.key} if tuned is not None else {}),
    )
    facts = {f.fact_id: f for f in dataset.facts}
    ids_in = [f for f in fact_ids if f in facts]
    skipped: dict[str, int] = {}

    def skip(what: str, lang: str, reason: str) -> None:
        key = f"{what}:{lang}:{reason}"
        skipped[key] = skipped.get(key, 0) + 1

    located: dict[tuple[str, int], LocatedPrompt | None] = {}

    def locate(lang: str, fact_id: int) -> LocatedPrompt | None:
        if (lang, fact_id) not in located:
            try:
                located[lang, fact_id] = locate_prompt(
                    adapter, facts[fact_id].views[lang], ctx.template, config.form
                )
            except MlakeError as err:
                skip("view", lang, str(err).split(": ", 1)[-1])
                located[lang, fact_id] = None
        return located[lang, fact_id]

    def answer(lang: str, fact_id: int, new: bool) -> str:
        form = facts[fact_id].views[lang].form(config.form)
        return (form.edit_target if new else form.target).text

    items_of: dict[int, list[tuple[str, tuple[list[int], int, list[int]]]]] = {}

    def items(fact_id: int) -> list[tuple[str, tuple[list[int], int, list[int]]]]:
        """Per usable test language: (B, (ids, subject_last, new then old answer tokens))."""
        if fact_id not in items_of:
            out = []
            for b in langs:
                loc = locate(b, fact_id)
                if loc is None:
                    continue
                texts = [answer(x, fact_id, True) for x in langs]
                texts += [answer(x, fact_id, False) for x in langs]
                lead, tokens = reading_tokens(adapter, loc, answer(b, fact_id, False), texts)
                if any(t is None for t in tokens):
                    skip("test", b, "an answer without a token with content")
                    continue
                j = langs.index(b)
                if tokens[j] == tokens[len(langs) + j]:
                    skip("test", b, "new and old answer not told apart")
                    continue
                ids = [*loc.prompt_ids, *lead]
                out.append((b, (ids, loc.subject_positions[-1], [int(t or 0) for t in tokens])))
            items_of[fact_id] = out
        return items_of[fact_id]

    before_of: dict[int, Any] = {}
    second_moment = stage_second_moment(ctx, corpus)

    ctx.say(
        f"lens: {config.lens} lens before and after {config.method} edits, {config.edits} per "
        f"edit language; {run.path}"
    )
    known = {lang: knowledge.known(lang) for lang in langs}
    # The edits: per edit language, the first config.edits known facts whose view there can be
    # located; each edit seeds its own generator, so they are computed in any order.
    chosen = {
        a: [f for f in ids_in if f in known[a] and locate(a, f) is not None][: config.edits]
        for a in langs
    }
    # Sharded (mlake.executors): a shard is a chunk of edits in one edit language.
    ctx.fill_shards(
        "lens_edits",
        run,
        lens_edits_stage,
        config,
        knowledge=knowledge,
        method_config=method_config,
        corpus=corpus,
        tuned=tuned,
        units={a: [[f] for f in chosen[a]] for a in langs},
    )

    def edit_plan(a: str, f: int) -> tuple[Any, Any] | None:
        """The request and the test items of fact ``f`` edited in ``a`` (``None``: skipped),
        with their skips counted: tokenization only, done for every edit, computed or read
        back, so a run read back from shards counts what a run in one process counts."""
        try:
            request = make_request(adapter, facts[f].views[a], ctx.template, config.form)
        except MlakeError as err:
            skip("edit", a, str(err).split(": ", 1)[-1])
            return None
        tests = items(f)
        if not tests:
            skip("edit", a, "no usable test language")
            return None
        return request, tests

    def edit_one(a: str, f: int, request: Any, tests: Any) -> dict[str, Any] | None:
        """The edit lens of fact ``f`` edited in ``a`` (``None``: a failed edit, counted)."""
        edited, failed = edit_fact(
            adapter, entry, request, method_config, config.seed, second_moment, "lens"
        )
        if failed:
            skip("edit", a, "non-finite edit")
            return None
        before, after = lens_edit(
            adapter,
            partial(edited.applied, adapter),
            [item for _, item in tests],
            ctx.batch_size,
            decode,
            before_of.get(f),
        )
        before_of[f] = before
        prob, rank = edit_lens_arrays(before, after, len(langs))
        lens = EditLens(
            prob=prob,
            rank=rank,
            answer_ids=np.array([item[2] for _, item in tests]).reshape(len(tests), 2, len(langs)),
            answer_langs=list(langs),
            test_langs=[b for b, _ in tests],
            positions=np.array([[item[1], len(item[0]) - 1] for _, item in tests]),
            known_before=[f in known[b] for b, _ in tests],
            edit_lang=a,
            fact_id=f,
        )
        if on_item:
            on_item({"lang": a, "fact_id": f})
        return lens.to_arrays()

    done = ctx.edit_pieces(
        run, chosen, edit_plan, edit_one, keys=EDIT_LENS_KEYS, what="an edit lens"
    )
    lenses = {a: [EditLens.from_arrays(arrays) for _, arrays in done[a]] for a in langs}
    edited_ids = {a: [f for f, _ in done[a]] for a in langs}
    if ctx.shard is not None:  # a worker: its edits are saved; the summary is the whole run's
        return None, run
    result = EditLensResult(
        langs=tuple(langs),
        method=config.method,
        n_layers=adapter.n_layers,
        top_k=config.top_k,
        lens=config.lens,
        pairs={
            a: {b: summarize_edit_lens(a, b, lenses[a], config.top_k) for b in langs} for a in langs
        },
        edits=edited_ids,
        skipped=dict(sorted(skipped.items())),
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=result.skipped)
    return result, run


def lens_edits_total(ctx: StageContext, config: Any, knowledge: KnowledgeResult) -> int:
    """About how many edits :func:`lens_edits_stage` makes (for progress bars)."""
    wanted = set(ctx.fact_ids)
    return sum(min(config.edits, len(knowledge.known(lang) & wanted)) for lang in ctx.langs)


def tuned_lines(report: dict[str, Any]) -> list[str]:
    """The tuned lens's fit and validation (:meth:`~analysis.tuned_lens.TunedLens.report`)
    as text: the split, and per layer the held-out KL to the last layer, tuned against the
    logit lens."""
    if not report:
        return []
    v = report.get("validation", {})
    cfg = report.get("config", {})
    lines = [
        f"Tuned lens: fitted on {report.get('fit_facts')} facts ({report.get('fit_texts')} texts,"
        f" {report.get('fit_tokens')} tokens) not evaluated, validated on "
        f"{report.get('held_facts')} held-out facts ({report.get('held_tokens')} tokens); "
        f"{cfg.get('steps')} steps of {cfg.get('tokens_per_step')} tokens, "
        f"{report.get('seconds')} s.",
        "Held-out KL to the last layer (nats), per layer: tuned / logit lens:",
        "  "
        + ", ".join(
            f"{i}: {t:.3f}/{g:.3f}"
            for i, (t, g) in enumerate(zip(v.get("tuned", []), v.get("logit", []), strict=True))
        ),
    ]
    return lines


#: The edit lens table's columns (one row per edit language and test language).
EDIT_LENS_COLUMNS: tuple[str, ...] = (
    "edit",
    "test",
    "edits",
    "success",
    "known before",
    "median emergence",
    "never",
    "decodable before",
    "other form first",
    "first form",
)


def edit_lens_rows(result: Any) -> list[list[str]]:
    """The rows of the edit lens table (:data:`EDIT_LENS_COLUMNS`) of an
    :class:`~analysis.lens.EditLensResult`."""
    rows = []
    for a in result.langs:
        for b in result.langs:
            s = result.pair(a, b)
            if not s.n_edits:
                continue
            med = s.median_emergence
            first = ", ".join(
                f"{k} {v}" for k, v in sorted(s.first_language.items(), key=lambda kv: -kv[1])
            )
            rows.append(
                [
                    a,
                    b,
                    str(s.n_edits),
                    str(s.n_success),
                    str(s.n_known_before),
                    "-" if med != med else f"{med:g}",
                    str(s.never),
                    str(s.emerged_before),
                    str(s.other_form_first),
                    first or "-",
                ]
            )
    return rows


def edit_lens_notes(result: Any) -> str:
    """What the edit lens table's columns mean."""
    return (
        f"{result.method} edits, read through the {result.lens} lens at the last position of "
        "the test language's prompt after the edit. success: the new answer's test-language "
        "form is the top token at the last layer; known before: the unedited model answered "
        "the fact in the test language; median emergence: the first layer (of "
        f"{result.n_layers}) where the new answer's test-language form ranks below "
        f"{result.top_k} (the fact lens's rule); never: edits where it never does; decodable "
        "before: edits where it was already decodable at some layer before the edit; other "
        "form first: edits where another language's form of the new answer is decodable "
        "earlier; first form: how often each language's form comes first."
    )


def edit_lens_lines(result: Any, *, markdown: bool = False) -> list[str]:
    """The edit lens table with its notes, as text (``mlake lens``) or Markdown (the
    pipeline report)."""
    import textwrap

    header, rows = list(EDIT_LENS_COLUMNS), edit_lens_rows(result)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", edit_lens_notes(result)]
    else:
        table = [header, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines = [
            ("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip()
            for r in table
        ]
        lines += [
            "",
            *textwrap.wrap(
                edit_lens_notes(result), width=96, initial_indent="  ", subsequent_indent="  "
            ),
        ]
    if result.skipped:
        lines += ["", "Skipped: " + ", ".join(f"{k} {v}" for k, v in result.skipped.items())]
    return lines


def edit_failures(result: Any, patching: str | None = None) -> Any:
    """Where each edit of a lens-edit run (an :class:`~analysis.lens.EditLensResult`) fails to
    transfer (:mod:`analysis.failures`), read from the run's saved edit lenses (nothing is
    recomputed).  ``patching``: the folder of a patching run of the same method whose edit
    patches (matched by edit language and fact) say whether each failed edit is carried (the
    method and the model are checked; the method's settings are the caller's to match).

    Raises:
        ConfigError: a patching run of another method or model.
        DataError: not a complete patching run (naming it).
    """
    from pathlib import Path

    from analysis.failures import classify_edits
    from analysis.patching import EditPatch
    from mlake_core.errors import ConfigError
    from mlake_core.results.store import read_run

    lenses = {a: list(result.lenses(a)) for a in result.langs}
    patches: dict[str, dict[int, Any]] = {}
    if patching is not None:
        run = read_run(patching, "patching")
        mine = read_run(result.run_path, "lens_edits").meta
        method = run.meta.get("config", {}).get("method")
        model = (run.meta.get("model") or {}).get("model_id")
        if method != result.method or model != (mine.get("model") or {}).get("model_id"):
            raise ConfigError(
                f"--patching-run {patching}: a patching run of {method} edits on another "
                f"model or method than the lens's ({result.method})"
            )
        for a, facts in result.edits.items():
            for f in facts:
                path = Path(run.path) / "arrays" / f"edit_{a}_{f}.npz"
                if path.is_file():
                    patches.setdefault(a, {})[f] = EditPatch.load(path)
    return classify_edits(
        result.method,
        lenses,
        result.langs,
        result.n_layers,
        result.top_k,
        result.run_path,
        patches if patching is not None else None,
    )


#: The failure table's columns (one row per method, edit language and test language).
FAILURE_COLUMNS: tuple[str, ...] = (
    "method",
    "edit",
    "test",
    "edits",
    "not applicable",
    "transferred",
    "not enriched",
    "not extracted",
    "lost at output",
    "other form",
    "own failed",
    "old at subject",
    "carried",
)


def failure_rows(failures: Any) -> list[list[str]]:
    """The failure table's rows (:data:`FAILURE_COLUMNS`) of an
    :class:`~analysis.failures.FailureResult`: counts, and after each outcome its share of
    the applicable edits; a last row per method sums its pairs."""
    from analysis.failures import FAILURES, NOT_APPLICABLE, TRANSFERRED, FailureSummary

    def cells(s: FailureSummary) -> list[str]:
        def with_rate(outcome: str) -> str:
            n, r = s.counts.get(outcome, 0), s.rate(outcome)
            return str(n) if r != r else f"{n} ({r:.0%})"

        return [
            str(s.n_edits),
            str(sum(s.counts.get(o, 0) for o in NOT_APPLICABLE)),
            *(with_rate(o) for o in (TRANSFERRED, *FAILURES)),
            str(s.other_form_at_output),
            str(s.own_failed),
            str(s.old_at_subject),
            (
                "/".join(str(s.carried.get(o, 0)) for o in FAILURES)
                if sum(s.patched.values())
                else "-"
            ),
        ]

    rows = []
    for method in failures.methods:
        pairs = [s for s in failures.summaries if s.method == method and s.n_edits]
        rows += [[method, s.edit_lang, s.test_lang, *cells(s)] for s in pairs]
        total = FailureSummary(
            method,
            "all",
            "all",
            sum(s.n_edits for s in pairs),
            failures.totals(method),
            sum(s.other_form_at_output for s in pairs),
            sum(s.own_failed for s in pairs),
            sum(s.old_at_subject for s in pairs),
            {o: sum(s.patched.get(o, 0) for s in pairs) for o in FAILURES},
            {o: sum(s.carried.get(o, 0) for s in pairs) for o in FAILURES},
        )
        rows.append([method, "all", "all", *cells(total)])
    return rows


def failure_notes(failures: Any) -> str:
    """What the failure table's columns mean."""
    latent = failures.latent
    return (
        "Where transfer fails (analysis/failures.py), per edit and test language, rules in "
        "order: not applicable (the test language not read, the fact not known there before "
        "the edit, or new and old answers sharing a first token); transferred (the new "
        "answer's test-language form is the top token at the last layer); not enriched (no "
        "language's form of the new answer ranks below "
        f"{failures.top_k} at the test prompt's subject position after the edit, at any "
        "layer); not extracted (it does there, but at no latent layer "
        f"({latent[0]}-{latent[-1]} of {failures.n_layers}) at the last position); lost at "
        "output (it does, but the output is not the test-language form). Percentages are of "
        "the applicable edits. other form: lost at output with another language's form of "
        "the new answer as the output; own failed: failures whose edit fails in its own "
        "language too; old at subject: applicable edits whose old answer was decodable at the "
        "subject position before the edit (how often the lens reads a known answer there at "
        "all: the baseline of not enriched); carried (with --patching-run): per failure "
        "category (not enriched/not extracted/lost at output), the failures whose edit, "
        "successful in its own language, is carried: the edited subject state patched into "
        "the test language's unedited run makes the new answer its top token at some layer "
        "(- : no patch of these edits)."
    )


def failure_lines(failures: Any, *, markdown: bool = False) -> list[str]:
    """The failure table with its notes, as text (``mlake lens --failures``) or Markdown."""
    import textwrap

    header, rows = list(FAILURE_COLUMNS), failure_rows(failures)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return [*lines, "", failure_notes(failures)]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        ("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip()
        for r in table
    ]
    return [
        *lines,
        "",
        *textwrap.wrap(
            failure_notes(failures), width=96, initial_indent="  ", subsequent_indent="  "
        ),
    ]
