"""The patching stage: cross-lingual activation patching (:mod:`analysis.patching`) of the
facts the model knows, per language pair, saved pair by pair and edit by edit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from mlake.stages.context import StageContext
from mlake.stages.transfer import edit_fact, stage_second_moment
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run


def patching_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    method_config: Any = None,
    corpus: Sequence[str] = (),
    on_item: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Cross-lingual patching of the selected facts: the counterfactual matrix (every ordered
    language pair, each fact known in B paired with another fact known in A,
    :func:`~analysis.patching.pair_facts`), then, unless ``config.method`` is ``none`` or
    ``config.edits`` is 0, the edit-carried measurement of the first ``config.edits`` facts
    known in each edit language, edited with ``config.method`` (``method_config``: its
    resolved config; ``corpus``: the text of ROME's and MEMIT's key statistics).

    Each pair and each edit is saved as it finishes (an interrupted run resumes there; a
    complete run is read back without writing), each target (with every source language: they
    share its passes) and each edit under its claim
    (:meth:`~mlake_core.results.store.Run.claim`).  With an executor (``ctx.executor``) they
    are computed first as shards, chunks of facts in one language: the targets in it and the
    edits made in it (:mod:`mlake.executors`); with ``ctx.shard`` only the shard's are
    computed and ``(None, run)`` is returned.  Views whose form is not usable, whose
    answers have no token with content, or (counterfactual) without another known fact whose
    answer in B begins with a different token are skipped and counted per reason.

    Returns:
        A :class:`~analysis.patching.PatchingResult` and the run folder.

    Raises:
        ConfigError: a method whose edits change no weights (no edited state to patch).
    """

    from analysis.lens import reading_tokens
    from analysis.patching import (
        CF_KEYS,
        EDIT_KEYS,
        CounterfactualPatch,
        EditPatch,
        PatchingResult,
        pair_facts,
        patch_edit,
        patch_sources,
        relation_key,
        source_states,
        summarize_counterfactual,
        summarize_edits,
    )
    from mlake_core.editing import get_method, make_request
    from mlake_core.editing.base import LocatedPrompt, locate_prompt
    from mlake_core.errors import MlakeError

    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    edits_on = config.measures_edits
    extra: dict[str, Any] = {}
    if edits_on:
        if method_config is None:
            method_config = get_method(config.method).config_cls()
        extra = {
            "method_config": {k: str(v) for k, v in vars(method_config).items()},
            "corpus": stable_hash(list(corpus)),
        }
    run = ctx.open_run(
        "patching",
        config,
        known_from="knowledge stage, question form, greedy alias match",
        reading="as the lens reads (after the prompt language's leading answer whitespace)",
        **extra,
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

    def answer(lang: str, fact_id: int, new: bool = False) -> str:
        form = facts[fact_id].views[lang].form(config.form)
        return (form.edit_target if new else form.target).text

    def reading(lang: str, fact_id: int, texts: Sequence[str]) -> Any:
        """(ids with the lead joined, (subject_last, last), tokens) or None."""
        loc = locate(lang, fact_id)
        if loc is None:
            return None
        lead, tokens = reading_tokens(adapter, loc, answer(lang, fact_id), texts)
        ids = [*loc.prompt_ids, *lead]
        return ids, (loc.subject_positions[-1], len(ids) - 1), tokens

    known = {lang: [f for f in ids_in if f in knowledge.known(lang)] for lang in langs}
    states: dict[tuple[str, int], Any] = {}

    def state(lang: str, fact_id: int) -> Any:
        if (lang, fact_id) not in states:
            ids, pos, _ = reading(lang, fact_id, [answer(lang, fact_id)])
            states[lang, fact_id] = source_states(adapter, ids, pos)
        return states[lang, fact_id]

    def first_token(lang_target: str, target: int, source: int) -> tuple[int | None, int | None]:
        got = reading(
            lang_target, target, [answer(lang_target, source), answer(lang_target, target)]
        )
        return (None, None) if got is None else (got[2][0], got[2][1])

    ctx.say(
        f"patching: resid_post at {adapter.n_layers} layers, subject's last token and last "
        f"position; {run.path}"
    )
    # -- the counterfactual matrix ------------------------------------------------------------
    pairs: dict[tuple[str, str], list[CounterfactualPatch]] = {}
    relation = {}
    for f in ids_in:
        view = facts[f].views.get("en") or next(iter(facts[f].views.values()))
        form = view.form(config.form)
        relation[f] = (
            relation_key(form.text, (form.subject.start, form.subject.end))
            if form.text and form.subject
            else f"fact {f}"
        )
    chosen: dict[tuple[str, str], dict[int, int]] = {}
    tokens_of: dict[tuple[str, int, int], tuple[int | None, int | None]] = {}
    for a in langs:
        sources = [f for f in known[a] if locate(a, f) is not None]
        for b in langs:
            targets = [f for f in known[b] if locate(b, f) is not None]

            def usable(s: int, t: int, b: str = b) -> bool:
                if (b, s, t) not in tokens_of:
                    tokens_of[b, s, t] = first_token(b, t, s)
                src, tgt = tokens_of[b, s, t]
                return src is not None and tgt is not None and src != tgt

            chosen[a, b] = pair_facts(
                targets,
                sources,
                seed=config.seed,
                key=f"{a}:{b}",
                relation=relation.__getitem__,
                usable=usable,
            )
            for t in targets:
                if t not in chosen[a, b]:
                    skip("counterfactual", f"{a}-{b}", "no other known fact to pair")
    # The edits: per edit language, the first config.edits known facts whose view there can be
    # located; each edit seeds its own generator, so they are computed in any order.
    chosen_edits = {
        a: [f for f in known[a] if locate(a, f) is not None][: config.edits] if edits_on else []
        for a in langs
    }
    # Sharded (mlake.executors): a shard is a chunk of facts in one language, the targets of
    # the counterfactual matrix in that language (with every source language) and the edits
    # made in it.
    ctx.fill_shards(
        "patching",
        run,
        patching_stage,
        config,
        knowledge=knowledge,
        method_config=method_config,
        corpus=corpus,
        units={x: [[f] for f in known[x]] for x in langs},
    )

    def measure_target(b: str, t: int) -> None:
        """Patch every source language's pair of target ``t`` in ``b`` missing from the run:
        the rows of every source language share the target's passes."""
        todo = []
        for a in langs:
            if t not in chosen[a, b] or run.has_arrays(f"cf_{a}_{b}_{t}"):
                continue
            s = chosen[a, b][t]
            src_token, tgt_token = tokens_of[b, s, t]
            todo.append((a, s, (int(src_token or 0), int(tgt_token or 0))))
        if not todo:
            return
        ids, pos, _ = reading(b, t, [answer(b, t)])
        measured = patch_sources(
            adapter,
            [(state(a, s), tokens) for a, s, tokens in todo],
            ids,
            pos,
            config.max_rows,
        )
        for (a, s, tokens), (prob, rank, clean_prob, clean_rank) in zip(
            todo, measured, strict=True
        ):
            patch = CounterfactualPatch(prob, rank, clean_prob, clean_rank, (s, t), tokens)
            run.save_arrays(f"cf_{a}_{b}_{t}", patch.to_arrays())
            if on_item:
                on_item({"kind": "counterfactual", "lang": f"{a}-{b}", "fact_id": t})

    # Target by target, each under its claim (one process patches a target; another waits).
    for b in langs:
        for t in known[b]:
            if not ctx.mine(b, t):  # another shard's target
                continue
            names = [f"cf_{a}_{b}_{t}" for a in langs if t in chosen[a, b]]
            if not all(run.has_arrays(n) for n in names):
                with run.claim(f"cf_{b}_{t}"):
                    measure_target(b, t)
            for a in langs:
                if t in chosen[a, b]:
                    pairs.setdefault((a, b), []).append(
                        CounterfactualPatch.from_arrays(
                            run.load_arrays(
                                f"cf_{a}_{b}_{t}", keys=CF_KEYS, what="a counterfactual patch"
                            )
                        )
                    )
    pairs = {(a, b): pairs.get((a, b), []) for a in langs for b in langs}
    counterfactual = summarize_counterfactual(langs, pairs, adapter.n_layers)

    # -- edit carried -------------------------------------------------------------------------
    edits: dict[str, list[EditPatch]] = {}
    if edits_on:
        entry = get_method(config.method)
        second_moment = stage_second_moment(ctx, corpus)

        def edit_plan(a: str, f: int) -> tuple[Any, Any, list[Any]] | None:
            """The request, source reading and targets of fact ``f`` edited in ``a``
            (``None``: skipped), with their skips counted: tokenization only, done for every
            edit, computed or read back, so a run read back from shards counts what a run in
            one process counts."""
            try:
                request = make_request(adapter, facts[f].views[a], ctx.template, config.form)
            except MlakeError as err:
                skip("edit", a, str(err).split(": ", 1)[-1])
                return None
            src = reading(a, f, [answer(a, f, new=True)])
            edit_targets: list[Any] = []
            for b in langs:
                got = reading(b, f, [answer(b, f, new=True), answer(b, f)])
                if got is None or None in got[2] or got[2][0] == got[2][1]:
                    skip("edit", f"{a}-{b}", "new and old answer not told apart in B")
                    continue
                edit_targets.append((b, got[0], got[1], (int(got[2][0]), int(got[2][1]))))
            if src is None or src[2][0] is None or not edit_targets:
                skip("edit", a, "no usable target")
                return None
            return request, src, edit_targets

        def edit_one(
            a: str, f: int, request: Any, src: Any, edit_targets: list[Any]
        ) -> dict[str, Any] | None:
            """The edit patch of fact ``f`` edited in ``a`` (``None``: a failed edit,
            counted)."""
            edited, failed = edit_fact(
                adapter, entry, request, method_config, config.seed, second_moment, "patching"
            )
            if failed:
                skip("edit", a, "non-finite edit")
                return None
            carried = patch_edit(
                adapter,
                partial(edited.applied, adapter),
                (src[0], src[1]),
                edit_targets,
                int(src[2][0]),
                config.max_rows,
            )
            if on_item:
                on_item({"kind": "edit", "lang": a, "fact_id": f})
            return carried.to_arrays()

        done = ctx.edit_pieces(
            run, chosen_edits, edit_plan, edit_one, keys=EDIT_KEYS, what="an edit patch"
        )
        edits = {a: [EditPatch.from_arrays(arrays) for _, arrays in done[a]] for a in langs}
    if ctx.shard is not None:  # a worker: its pieces are saved; the summary is the whole run's
        return None, run
    edit_summary = summarize_edits(langs, edits, adapter.n_layers) if edits_on else {}
    result = PatchingResult(
        langs=tuple(langs),
        n_layers=adapter.n_layers,
        config=config.to_dict(),
        counterfactual=counterfactual,
        edits=edit_summary,
        skipped=dict(sorted(skipped.items())),
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=result.skipped)
    return result, run


def patching_total(ctx: StageContext, config: Any, knowledge: KnowledgeResult) -> int:
    """About how many items the stage computes (for progress bars): one per known target
    view per source language, plus the edits."""
    wanted = set(ctx.fact_ids)
    n = len(ctx.langs)
    views = sum(len(knowledge.known(lang) & wanted) for lang in ctx.langs)
    edits = (
        sum(min(config.edits, len(knowledge.known(lang) & wanted)) for lang in ctx.langs)
        if config.measures_edits
        else 0
    )
    return views * n + edits


def _cell(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def _matrix_lines(langs: Sequence[str], matrix: Any, markdown: bool) -> list[str]:
    if markdown:
        lines = ["| A \\ B | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
        lines += [
            f"| {a} | " + " | ".join(_cell(v) for v in row) + " |"
            for a, row in zip(langs, matrix, strict=True)
        ]
        return lines
    lines = ["  A\\B " + "".join(f"{b:>7}" for b in langs)]
    lines += [
        f"  {a:<5}" + "".join(f"{_cell(v):>7}" for v in row)
        for a, row in zip(langs, matrix, strict=True)
    ]
    return lines


def report_lines(result: Any, *, markdown: bool = False) -> list[str]:
    """The 5x5 matrices of a :class:`~analysis.patching.PatchingResult` at each position's
    best layer, as text (``mlake patch``) or Markdown (the pipeline report): the
    counterfactual follow rate, its unpatched baseline, and the forward edit-carried rate
    (with the reverse direction's restored rate at the same layer)."""
    from analysis.patching import DIRECTIONS, POSITIONS

    langs, lines = list(result.langs), []
    cf = result.counterfactual
    lines.append(
        "Counterfactual pairs per cell (rows: source language A, columns: target B): "
        + "; ".join(
            f"{a}: " + ",".join(str(x) for x in row) for a, row in zip(langs, cf["n"], strict=True)
        )
    )
    for pos in POSITIONS:
        layer = cf[pos]["best_layer"]
        lines += [
            "",
            f"B follows A, patched at {pos}, best layer {layer} of {result.n_layers} "
            "(fraction of pairs where the source fact's answer in B beats the target's):",
            "",
            *_matrix_lines(langs, result.matrix("follows", pos), markdown),
        ]
    import numpy as np

    clean = np.array([[np.nan if v is None else v for v in r] for r in cf["clean_follows"]])
    lines += ["", "Unpatched baseline (the source fact's answer already ahead):", ""]
    lines += _matrix_lines(langs, clean, markdown)
    ed = result.edits
    if ed:
        lines += [
            "",
            "Edits counted (successful in A): "
            + ", ".join(f"{a} {ed['n'][a]}" for a in langs)
            + "; failed in A: "
            + ", ".join(f"{a} {ed['n_failed'][a]}" for a in langs),
        ]
        if "n_cells" in ed:
            lines.append(
                "Edits per cell (rows: edit language A, columns: target B): "
                + "; ".join(
                    f"{a}: " + ",".join(str(x) for x in row)
                    for a, row in zip(langs, ed["n_cells"], strict=True)
                )
            )
        for pos in POSITIONS:
            layer = ed[DIRECTIONS[0]][pos]["best_layer"]
            lines += [
                "",
                f"Edit carried (edited A state into the unedited B run), at {pos}, best layer "
                f"{layer}:",
                "",
                *_matrix_lines(langs, result.matrix("carried", pos), markdown),
            ]
            if layer is not None:
                grid = ed[DIRECTIONS[1]][pos]["restored"][layer]
                rev = np.array([[np.nan if v is None else v for v in r] for r in grid])
                lines += [
                    "",
                    f"Reverse (unedited A state into the edited B run), at {pos}, layer "
                    f"{layer}: the old answer restored:",
                    "",
                    *_matrix_lines(langs, rev, markdown),
                ]
        base = np.array(
            [[np.nan if v is None else v for v in r] for r in ed["clean_carried"][DIRECTIONS[1]]]
        )
        lines += ["", "Unpatched edited B run (the edit's own transfer, top token):", ""]
        lines += _matrix_lines(langs, base, markdown)
    if result.skipped:
        lines += ["", "Skipped: " + ", ".join(f"{k} {v}" for k, v in result.skipped.items())]
    return lines
