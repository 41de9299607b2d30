"""``mlake data``: fetch, stats and show for MLaKE and the other datasets mlake reads
(``--dataset``, :mod:`mlake_core.data.sources`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mlake.commands.common import add_settings_args, settings_from_args
from mlake_core.data import RELEASES
from mlake_core.data.dataset import FactView, PromptForm
from mlake_core.data.external import ExternalDataset, ExternalView
from mlake_core.data.paths import ENV_VAR, fetch_release
from mlake_core.data.sources import DATASETS
from mlake_core.data.stats import dataset_stats, format_stats
from mlake_core.errors import ConfigError

#: The :class:`~mlake.settings.DataSettings` fields that are options (no facts: every fact).
DATA_FIELDS: tuple[str, ...] = ("dataset", "langs", "version", "data_dir")


def _add_common(p: argparse.ArgumentParser) -> None:
    from mlake.settings import DataSettings

    add_settings_args(
        p,
        DataSettings,
        fields=DATA_FIELDS,
        helps={
            "langs": "comma-separated language codes, or all: the languages come from the "
            "data folder (MLaKE's five, en,zh,ja,fr,de, in the published releases; a folder "
            "in MLaKE's format may hold others: README, Other languages)",
            "data_dir": f"MLaKE data directory (default: ${ENV_VAR}, else ../shared/mlake "
            "beside the repository, else ./mlake_data); for another --dataset, the folder "
            "holding its files (where mlake data fetch --dataset NAME --dest DIR put them)",
        },
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _load(args: argparse.Namespace) -> Any:
    """The dataset the options of :func:`_add_common` ask for."""
    from mlake.session import load_dataset
    from mlake.settings import DataSettings

    return load_dataset(settings_from_args(args, DataSettings, fields=DATA_FIELDS))


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="the data (MLaKE or --dataset): fetch, stats, show")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    stats = dsub.add_parser(
        "stats", help="per-language coverage: subjects, cloze prompts, multi-hop links"
    )
    _add_common(stats)
    stats.set_defaults(func=_stats)

    show = dsub.add_parser("show", help="one fact in every language, subject and target marked")
    show.add_argument("fact_id", type=int, metavar="FACT_ID")
    _add_common(show)
    show.set_defaults(func=_show)

    fetch = dsub.add_parser(
        "fetch", help="download MLaKE (or --dataset NAME) from its public repository"
    )
    fetch.add_argument(
        "--dataset",
        default="mlake",
        choices=DATASETS,
        help="which dataset (default mlake; the others: README, Other datasets)",
    )
    fetch.add_argument(
        "--dest",
        default="mlake_data",
        help=f"folder to write (default ./mlake_data; point ${ENV_VAR} at it afterwards)",
    )
    fetch.add_argument(
        "--version",
        dest="data_version",
        default="all",
        help=f"release to fetch: {', '.join(RELEASES)} or all (default all)",
    )
    fetch.add_argument(
        "--from",
        dest="base_url",
        default=None,
        metavar="URL",
        help="another dataset than mlake: a mirror holding the same files "
        "(default: the public repository at the pinned commit; file:// works)",
    )
    fetch.add_argument("--force", action="store_true", help="download again if present")
    fetch.set_defaults(func=_fetch)


def _stats(args: argparse.Namespace) -> int:
    ds = _load(args)
    if isinstance(ds, ExternalDataset):
        summary = ds.summary()
        if args.json:
            print(json.dumps(summary, ensure_ascii=False, indent=1))
        else:
            print(_format_summary(summary))
        return 0
    stats = dataset_stats(ds)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=1))
    else:
        print(format_stats(stats))
    return 0


def _format_summary(summary: dict[str, Any]) -> str:
    """The text of ``mlake data stats`` for another dataset than MLaKE."""
    lines = [
        f"{summary['title']}: {summary['facts']} facts in {len(summary['langs'])} languages "
        f"({summary['provenance']}; read from {summary['root']})",
        f"subjects given: {'yes' if summary['has_subjects'] else 'no'}; original answers: "
        f"{'yes' if summary['has_original_answers'] else 'no (knowledge cannot be measured)'}",
        "lang  subject not in question  records without this language",
    ]
    for lang in summary["langs"]:
        lines.append(
            f"{lang:<5} {summary['subject_not_in_prompt'].get(lang, 0):>23}  "
            f"{summary['skipped_records'].get(lang, 0):>30}"
        )
    return "\n".join(lines)


def _mark(text: str | None, form: PromptForm, answer: str | None = None) -> str:
    """The prompt with the subject in [brackets] and the target appended in <angles>."""
    if text is None:
        return "(none)"
    if form.subject is not None:
        s = form.subject
        text = f"{text[: s.start]}[{text[s.start : s.end]}]{text[s.end :]}"
    return f"{text} <{answer if answer is not None else form.target.text}>"


def _show_view(v: FactView) -> str:
    q, c = v.question, v.cloze
    lines = [
        f"[{v.lang}] subject: {v.subject.text!r}",
        f"  question: {_mark(q.text, q)}",
        f"    target: {q.target.text!r} aliases {list(q.target.aliases)}"
        f" | edit: {q.edit_target.text!r} aliases {list(q.edit_target.aliases)}",
        f"  cloze:    {_mark(c.text, c)}" + ("" if c.usable else f"   (not usable: {c.reason})"),
        f"    answer in o_prompt: {v.answer.text if v.answer else None!r} ({v.answer_method}),"
        f" at end: {v.answer_at_end}, prefix = question start: {v.prefix_is_question_start}",
        f"  o_prompt: {v.record.o_prompt}",
        f"  e_prompt: {v.record.e_prompt}",
    ]
    if isinstance(v, ExternalView):
        if v.rephrase is not None:
            lines.append(f"  rephrase: {_mark(v.rephrase.text, v.rephrase)}")
        if v.locality is not None:
            lines.append(f"  locality: {v.locality[0]} <{v.locality[1]}>")
        if v.portability is not None:
            lines.append(f"  portability: {v.portability[0]} <{v.portability[1]}>")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    ds = _load(args)
    fact = ds.fact(args.fact_id)
    if args.json:
        print(json.dumps(fact.to_dict(), ensure_ascii=False, indent=1))
        return 0
    title = ds.title if isinstance(ds, ExternalDataset) else f"MLaKE {ds.version}"
    print(f"fact {fact.fact_id} ({title})")
    for v in fact.views.values():
        print(_show_view(v))
    if fact.multi_hop:
        print("multi-hop:")
        for m in fact.multi_hop:
            print(f"  [{m.lang} {m.kind} #{m.index} via {m.link}] {m.question} <{m.answer}>")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    if args.dataset != "mlake":
        from mlake.commands.common import log
        from mlake_core.data.fetch import fetch_dataset

        folder = fetch_dataset(
            args.dataset, Path(args.dest), base_url=args.base_url, force=args.force, progress=log
        )
        print(f"{args.dataset}: {folder}")
        print(f"pass --dataset {args.dataset} --data-dir {Path(args.dest).resolve()}")
        return 0
    if args.base_url is not None:
        raise ConfigError("--from: only for another dataset than mlake (--dataset)")
    versions = list(RELEASES) if args.data_version == "all" else [args.data_version]
    dest = Path(args.dest)
    for version in versions:
        path = fetch_release(version, dest, force=args.force)
        print(f"MLaKE {version}: {path}")
    print(f"set {ENV_VAR}={dest.resolve()} or pass --data-dir {dest}")
    return 0
