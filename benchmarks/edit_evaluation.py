"""Edit evaluation with and without ``stop_when_decided``, on the same model, edits and facts.

Evaluating an edit (``analysis.transfer.evaluate_edit``: the edited fact in every test
language and both forms, the locality sample, portability) is mostly greedy decoding, and on a
large-vocabulary model each decoding step is dear.  ``stop_when_decided`` stops each
continuation once no further token can change its verdict.  This times ``evaluate_edit`` for
the same edits both ways (alternating, twice each) in one process and checks that every
verdict is the same.

The edits are null edits (no weight change: what is timed is the evaluation, which does not
depend on the weights' values), one per fact, requested in English and evaluated in
``--langs`` with ``--n-locality`` locality facts per language, with the few-shot template a
base model is measured with.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_evaluation.py \\
        --model gemma-3-270m --facts 4 [--langs en,zh,ja,fr,de] [--n-locality 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    from analysis.transfer import TransferConfig, evaluate_edit, locality_facts
    from mlake.commands.common import log
    from mlake.loading import resolve_model_path
    from mlake_core.data.dataset import load_mlake
    from mlake_core.editing import EditResult, make_request
    from mlake_core.metrics.knowledge import KnowledgeConfig, measure_knowledge
    from mlake_core.models import load_adapter
    from mlake_core.models.prompting import get_template

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--backend", default="tlens")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--langs", default="en,zh,ja,fr,de")
    parser.add_argument("--n-locality", type=int, default=3)
    parser.add_argument("--template", default="fewshot")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    adapter = load_adapter(path, args.backend, device="cpu")
    ds = load_mlake()
    langs = args.langs.split(",")
    ids = [f.fact_id for f in ds.facts][: args.facts]
    template = get_template(args.template)
    if hasattr(template, "for_run"):
        template = template.for_run(ds, ids, langs)
    configs = {
        "full_text": TransferConfig(n_locality=args.n_locality),
        "stop_when_decided": TransferConfig(n_locality=args.n_locality, stop_when_decided=True),
    }
    loc_ids = locality_facts(ds, ids, configs["full_text"], [f.fact_id for f in ds.facts])
    views = [ds.fact(i).views[b] for i in [*ids, *loc_ids] for b in langs]
    pre = measure_knowledge(
        adapter, views, template, KnowledgeConfig(mcqa=False, forms=("question",))
    )
    known = {
        (int(f), str(b)): m == "original"
        for f, b, m in zip(
            pre.table["fact_id"], pre.table["lang"], pre.table["greedy_match"], strict=True
        )
    }
    requests = [make_request(adapter, ds.fact(i).views["en"], template) for i in ids]
    seconds = {name: 0.0 for name in configs}
    rows: dict[str, list] = {name: [] for name in configs}
    for round_ in range(2):
        for name, config in configs.items():
            log(f"round {round_ + 1}: {name}")
            start = time.perf_counter()
            got = [
                evaluate_edit(
                    adapter,
                    EditResult("none", (r,)),
                    ds,
                    langs,
                    template,
                    config,
                    locality_ids=loc_ids,
                    known_before=known,
                )
                for r in requests
            ]
            seconds[name] += time.perf_counter() - start
            if round_ == 0:
                rows[name] = [row for edit in got for row in edit]
    keys = ("fact_id", "kind", "test_lang", "form", "success_greedy", "n")
    verdicts = {name: [[r.get(k) for k in keys] for r in rs] for name, rs in rows.items()}
    report = {
        "model": args.model,
        "edits": len(requests),
        "langs": langs,
        "n_locality": args.n_locality,
        "template": template.name,
        "seconds_per_edit": {n: round(s / (2 * len(requests)), 2) for n, s in seconds.items()},
        "speedup_stop_when_decided": round(seconds["full_text"] / seconds["stop_when_decided"], 2),
        "same_verdicts": verdicts["full_text"] == verdicts["stop_when_decided"],
        "rows": len(rows["full_text"]),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
