"""``mlake probe``: linear probes and representation similarity of the residual stream, per
layer, at the subject's last token and the prompt's last token of each fact's question.

Measured per layer (0 = the embeddings, L = after block L) and position:

* language identity: a probe that tells the prompt's language;
* cross-lingual answer probe: trained in language A, tested in language B on held-out facts,
  it names the fact's answer (answers shared by at least --min-class-facts facts are the
  classes): a language x language transfer matrix;
* which-fact retrieval: a linear map learned from A to B on training facts retrieves each
  held-out fact among the others in B: a language x language matrix;
* representation similarity of the same facts across languages: debiased linear CKA and the
  mean same-fact cosine (each language centred), against the cosine of different facts.

Honest probing: folds are whole facts (a test fact is unseen in every language); the
regularisation is chosen by cross-validation on the training facts only; every probe has a
control task (labels permuted per fact, Hewitt & Liang 2019) and reports selectivity =
accuracy - control accuracy; accuracies are balanced (chance = 1 / classes, printed).  A
probe has signal when its held-out accuracy is above the larger of its control and chance by
more than its number of held-out examples reaches by chance (one-sided binomial test,
p < 0.05); the tables say which probes have none.

Prints per layer the language-ID accuracy and selectivity and the mean cross-lingual
accuracies (layer emb, the token embeddings, is the lexical baseline: a subject written the
same way in two languages has the same vector there); then, at the layer after the
embeddings where the answer probe transfers best, the language x language transfer,
selectivity and retrieval matrices and the language x language similarity matrices.  --json prints everything
(every layer's matrices).  Activations and results go to the results store; reruns load them.

With --executor ray the activations are read as shards on Ray workers, chunks of whole
batches of one language's prompts (read in the same passes as in one process); the probes
are fit on all facts at once in the calling process (README: Running on a cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Any

from mlake.commands.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_settings_args,
    data_settings,
    field_docs,
    log,
    open_session,
    settings_from_args,
)


def register(subparsers: Any) -> None:
    """Add the ``probe`` command."""
    from probes.config import ProbeConfig

    parser = subparsers.add_parser(
        "probe",
        help="probes per layer: language identity, cross-lingual transfer, similarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    group = parser.add_argument_group("probes")
    fields = [f.name for f in dataclasses.fields(ProbeConfig) if f.name != "center"]
    add_settings_args(
        group,
        ProbeConfig,
        fields=fields,
        helps={
            "cs": "grid of the logistic probes' C, comma-separated",
            "alphas": "grid of the retrieval map's ridge penalty, comma-separated",
        },
    )
    # ``center`` defaults to true: the option turns it off.
    group.add_argument(
        "--no-center",
        dest="center",
        action="store_const",
        const=False,
        default=None,
        help="turn off (default: on): " + field_docs(ProbeConfig)["center"],
    )
    add_data_args(
        parser,
        facts_default=None,
        facts_help="N (the first N of the default selection: mlake-tiny's training facts for "
        "mlake-tiny models, all facts otherwise), trained (mlake-tiny's training facts) or all "
        "(every fact); none given: the whole default selection",
    )
    add_run_args(parser)
    parser.set_defaults(func=run_probe)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~probes.config.ProbeConfig` the options describe.

    Raises:
        ConfigError: a value that does not parse or that the config rejects, naming the option.
    """
    from probes.config import ProbeConfig

    return settings_from_args(args, ProbeConfig)


def run_probe(args: argparse.Namespace) -> int:
    """Entry point of ``mlake probe``."""
    from mlake.progress import progress_bar
    from mlake.stages.probes import probe_stage
    from mlake_core.errors import ConfigError
    from probes.config import pair_matrices

    langs = data_settings(args).langs
    if len(langs) < 2:
        raise ConfigError(f"--langs {args.langs}: probes compare languages; give at least two")
    config = config_from_args(args)
    session = open_session(args)
    ctx = session.ctx
    knowledge = session.measure_knowledge()
    bar = progress_bar("activations", len(ctx.fact_ids) * len(ctx.langs), "prompt", log)
    started = time.perf_counter()
    result, _ = probe_stage(ctx, config, knowledge=knowledge, progress=bar.update)
    bar.close()
    seconds = round(time.perf_counter() - started, 1)
    model, n_facts = session.loaded.name, len(ctx.fact_ids)
    if args.json:
        report = {"model": model, "n_facts": n_facts, **result.to_dict()}
        report["pair_matrices"] = {}
        for position in result.positions:
            try:
                matrices = pair_matrices(result, position)
            except KeyError:
                continue
            report["pair_matrices"][position] = {
                name: {"attrs": dict(m.attrs), "matrix": _rows(m)} for name, m in matrices.items()
            }
        report["seconds"] = seconds
        print(json.dumps(report, ensure_ascii=False, indent=2, default=_json_default))
    else:
        print(format_report(result, model, n_facts))
        print(f"\n{seconds:.1f} s")
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _rows(matrix: Any) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in matrix.values]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = f"{v:.{digits}f}"
    # A value that rounds to zero prints unsigned (-0.00 reads as a real negative).
    return text.lstrip("-") if text.lstrip("-").strip("0.") == "" else text


def _matrix(matrix: Any, indent: str = "  ") -> list[str]:
    cols = list(matrix.columns)
    lines = [indent + "      " + "".join(f"{c:>7}" for c in cols)]
    for name, row in matrix.iterrows():
        lines.append(indent + f"{name:<6}" + "".join(f"{_fmt(v):>7}" for v in row.values))
    return lines


def _off_diagonal_mean(result: Any, task: str, position: str, layer: int, value: str) -> float:
    t = result.transfer
    sel = t[
        (t["task"] == task)
        & (t["position"] == position)
        & (t["layer"] == layer)
        & (t["train_lang"] != t["test_lang"])
    ]
    return float(sel[value].mean()) if len(sel) else math.nan


#: What the ``signal`` column of the probe tables means (:func:`probes.config.probe_signal`).
SIGNAL_NOTE = (
    "signal: held-out accuracy above the larger of control and chance by more than that many "
    "held-out examples reach by chance (one-sided binomial test, p < 0.05); no: no signal"
)


def _verdict(verdict: tuple[bool | None, str | None]) -> str:
    signal = verdict[0]
    return "-" if signal is None else ("yes" if signal else "no")


def format_report(result: Any, model: str, n_facts: int) -> str:
    """The human-readable summary ``mlake probe`` prints."""
    from probes.activations import layer_name
    from probes.config import pair_matrices

    lines = [f"model {model}; {n_facts} facts; {result.run_path}"]
    lines.append(
        "probed (question form): "
        + ", ".join(
            f"{lang} {c['probed']}"
            + f" (usable {c['usable']}"
            + (f", known {c['known']}" if "known" in c else "")
            + ")"
            for lang, c in result.counts.items()
        )
    )
    tasks = result.tasks()
    if result.classes:
        n_class_facts = sum(result.classes.values())
        shown = ", ".join(f"{k} {v}" for k, v in list(result.classes.items())[:8])
        more = " ..." if len(result.classes) > 8 else ""
        lines.append(
            f"answer classes ({result.answer_lang} answers shared by >= "
            f"{result.config.get('min_class_facts')} facts): {len(result.classes)} classes, "
            f"{n_class_facts} facts: {shown}{more}"
        )
    positions = list(result.positions)
    # Per layer: language identity, and the mean cross-lingual accuracies.
    lines += [
        "",
        "language identity per layer (balanced accuracy; control: labels permuted within each fact)",
    ]
    head = "  layer  site          "
    for p in positions:
        head += f"{p + ' acc':>12}{'ctrl':>6}{'sel':>6}{'signal':>8}"
    lines.append(head)
    chance = math.nan
    for layer, site in enumerate(result.sites):
        line = f"  {layer_name(layer):<6} {site:<14}"
        for p in positions:
            t = result.language_id
            row = t[(t["position"] == p) & (t["layer"] == layer)]
            if len(row):
                r = row.iloc[0]
                chance = float(r["chance"])
                line += (
                    f"{_fmt(r['accuracy']):>12}{_fmt(r['control']):>6}{_fmt(r['selectivity']):>6}"
                    f"{_verdict(result.language_id_signal(p, layer)):>8}"
                )
            else:
                line += f"{'-':>12}{'-':>6}{'-':>6}{'-':>8}"
        lines.append(line)
    lines.append(f"  chance {_fmt(chance)}")
    lines.append(f"  {SIGNAL_NOTE}")
    labels = {
        "answer": "cross-lingual answer probe",
        "fact": "which-fact retrieval through a learned map",
    }
    for task in tasks:
        lines += [
            "",
            f"{labels[task]}: mean over ordered language pairs A != B, per layer "
            "(accuracy / selectivity, signal as above)",
        ]
        lines.append("  layer  " + "".join(f"{p:>20}" for p in positions))
        for layer in result.layers:
            cells = []
            for p in positions:
                acc = _off_diagonal_mean(result, task, p, layer, "accuracy")
                sel = _off_diagonal_mean(result, task, p, layer, "selectivity")
                verdict = _verdict(result.cross_lingual_signal(task, p, layer))
                cells.append(f"{_fmt(acc)} / {_fmt(sel)} {verdict:>3}")
            lines.append(f"  {layer_name(layer):<6} " + "".join(f"{c:>20}" for c in cells))
    for p in positions:
        if not tasks:
            break
        matrices = pair_matrices(result, p)
        first = next(iter(matrices.values()))
        layer, site = first.attrs["layer"], first.attrs["site"]
        lines += [
            "",
            f"== {p} position, layer {layer_name(layer)} ({site}): where the "
            f"{labels[tasks[0]]} transfers best (after the embeddings)",
        ]
        if result.cross_lingual_signal(tasks[0], p, layer)[0] is False:
            lines.append(
                f"no signal: even here the {labels[tasks[0]]} is not reliably above its control "
                "or chance (mean over language pairs), so its matrix below shows no "
                "representation shared across languages"
            )
        if "probe_transfer" in matrices:
            t = result.transfer
            sel = t[(t["task"] == "answer") & (t["position"] == p) & (t["layer"] == layer)]
            lines.append(
                "answer probe: balanced accuracy, trained in (rows), tested on held-out facts in "
                f"(columns); chance {_fmt(float(sel['chance'].mean()))}, "
                f"control {_fmt(float(sel['control'].mean()))}"
            )
            lines += _matrix(matrices["probe_transfer"])
            lines.append("selectivity (accuracy - control accuracy)")
            lines += _matrix(matrices["probe_transfer_selectivity"])
        if "fact_retrieval" in matrices:
            t = result.transfer
            sel = t[(t["task"] == "fact") & (t["position"] == p) & (t["layer"] == layer)]
            lines.append(
                "which-fact retrieval: top-1 among held-out facts through a map from rows to "
                f"columns; chance {_fmt(float(sel['chance'].mean()), 3)}, "
                f"control {_fmt(float(sel['control'].mean()), 3)}"
            )
            lines += _matrix(matrices["fact_retrieval"])
        s = result.similarity
        sel = s[(s["position"] == p) & (s["layer"] == layer) & (s["lang_a"] != s["lang_b"])]
        lines.append("representation similarity of the same facts: debiased linear CKA")
        lines += _matrix(matrices["rep_similarity_cka"])
        lines.append(
            "same-fact cosine (each language centred); different facts: mean "
            f"{_fmt(float(sel['cos_diff'].mean()), 3)}"
        )
        lines += _matrix(matrices["rep_similarity_cosine"])
    if result.skipped:
        lines += [
            "",
            "left out: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())),
        ]
    return "\n".join(lines)
