"""Write the notebooks (thin: import the library, call it, show the result), without outputs.

Run ``python notebooks/make_notebooks.py`` after changing a notebook's cells here; the
``.ipynb`` files are generated, so their diffs stay readable in this file.  Every notebook
reads ``MLAKE_NB_FACTS`` (facts, default 10), ``MLAKE_NB_MODEL`` (default mlake-tiny) and
``MLAKE_NB_OUT`` (the shared run folder, default ``runs/notebooks``) through
:func:`mlake.pipeline.notebook_run`.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

SETUP = """\
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
from mlake.commands.common import log
from mlake.pipeline import notebook_run"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_data_tour": [
        (
            "md",
            "# A tour of MLaKE\n\nOne fact in five languages, how subjects and cloze prompts are located, and the benchmark's coverage.",
        ),
        (
            "code",
            "import json\nfrom mlake_core.data import load_mlake\nfrom mlake_core.data.stats import dataset_stats, format_stats\n\nds = load_mlake()\nprint(len(ds.facts), 'facts in', ', '.join(ds.langs))",
        ),
        (
            "md",
            "Coverage per language: subjects located, well-posed cloze prompts, multi-hop links.",
        ),
        ("code", "print(format_stats(dataset_stats(ds)))"),
        ("md", "One fact: its question, subject, original and edit answers in every language."),
        (
            "code",
            'fact = ds.facts[0]\nfor lang, view in fact.views.items():\n    q = view.question\n    print(f"{lang}: {q.text!r}\\n    subject {q.subject.text if q.subject else None!r}; "\n          f"answer {q.target.forms[0]!r} -> edit {q.edit_target.forms[0]!r}; cloze usable {view.cloze.usable} ({view.cloze.reason})")',
        ),
    ],
    "02_edit_transfer": [
        (
            "md",
            "# Edit transfer\n\nEdit each fact in one language (FT and IKE) and measure it in every language: the 5x5 matrices.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["transfer"], log=log)\nprint(run.summary())'),
        (
            "code",
            'from mlake.stages.relate import load_transfer\nfrom figures.editing import transfer_counts, transfer_matrices\nfrom analysis.transfer import transfer_matrix\n\nruns = {k: load_transfer(v) for k, v in run.stages["transfer"].runs.items()}\nlangs = next(iter(runs.values())).meta["langs"]\nfor label, r in runs.items():\n    print(label)\n    print((100 * transfer_matrix(r.rows)).round(1))',
        ),
        (
            "code",
            "transfer_matrices({k: transfer_matrix(r.rows) for k, r in runs.items()}, langs,\n                  counts={k: transfer_counts(r.rows) for k, r in runs.items()})",
        ),
    ],
    "03_causal_tracing": [
        (
            "md",
            "# Causal tracing\n\nWhere each language's answer is recovered when clean states are restored into a subject-corrupted run.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["tracing"], log=log)\nprint(run.summary())'),
        (
            "code",
            'import json\nfrom pathlib import Path\nfrom analysis.tracing.summary import TracingResult\n\nfolder = Path(run.stages["tracing"].runs["tracing"])\nresult = TracingResult.from_dict(json.loads((folder / "summary.json").read_text()))\nprint("recommended edit layer:", result.recommended_layer, result.recommended_by_lang)',
        ),
        (
            "code",
            'from figures.tracing import average_effects, profiles, similarity_heatmap\naverage_effects(result, "mlp")',
        ),
        ("code", "profiles(result)"),
        ("code", "similarity_heatmap(result)"),
        ("md", "One fact, with its real tokens (CJK drawn with Noto Sans CJK)."),
        (
            "code",
            'from figures.tracing import trace_heatmap\nfrom analysis.tracing.causal import FactTrace\nimport numpy as np\n\nname = sorted((folder / "arrays").glob("trace_zh_*.npz"))[0]\nwith np.load(name) as arrays:\n    trace = FactTrace.from_arrays({k: arrays[k] for k in arrays.files})\ntrace_heatmap(trace, title=name.stem)',
        ),
    ],
    "04_neurons": [
        (
            "md",
            "# Neurons and overlap\n\nWhich MLP neurons carry a fact in each language (integrated gradients, attribution patching, LAPE), how much the languages' sets overlap, and what ablating one language's specific neurons does.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["neurons"], log=log)\nprint(run.summary())'),
        (
            "code",
            'import json\nfrom pathlib import Path\nfrom analysis.neurons.config import NeuronResult\n\nfolder = Path(run.stages["neurons"].runs["neurons"])\nresult = NeuronResult.from_dict(json.loads((folder / "summary.json").read_text()))\n[(m.method, m.unit, m.check) for m in result.methods]',
        ),
        (
            "code",
            'from figures.neurons import ablation_matrix, overlap_matrices, unit_counts\noverlap_matrices(result, "neuron")',
        ),
        ("code", 'unit_counts(result, "ig")'),
        ("code", 'ablation_matrix(result, "ig")'),
    ],
    "05_sharing_vs_transfer": [
        (
            "md",
            "# Sharing against transfer\n\nDoes the overlap of two languages' important neurons for a fact predict whether an edit made in one reaches the other?  Pair level (Mantel), fact level (logistic with controls), and restricted editing.",
        ),
        ("code", SETUP),
        (
            "code",
            'run = notebook_run(["tracing", "transfer", "neurons", "restricted", "relate"], log=log)\nprint(run.summary())',
        ),
        (
            "code",
            'from mlake.stages.relate import load_relate_result\n\nresult = load_relate_result(run.stages["relate"].runs["ft"])\nresult.pair_level',
        ),
        ("code", 'result.fits["logistic"].terms'),
        (
            "code",
            "from figures.relate import restricted_editing, sharing_vs_transfer\nsharing_vs_transfer(result)",
        ),
        (
            "code",
            "restricted_editing(result) if result.interventions else 'no restricted editing in this run'",
        ),
    ],
    "06_probes": [
        (
            "md",
            "# Probes\n\nLanguage identity and cross-lingual probes on the residual stream, layer by layer.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["probes"], log=log)\nprint(run.summary())'),
        (
            "code",
            'rec = run.stages["probes"]\nif rec.status != "complete":\n    print("probes not run:", rec.note)\nelse:\n    from probes.config import load_probe_result\n    from figures.probes import accuracy_by_layer\n    result = load_probe_result(rec.runs["probes"])\n    display(accuracy_by_layer(result))',
        ),
    ],
    "07_latent_lens": [
        (
            "md",
            "# The latent-language lens\n\nIn which language is a fact's answer written, layer by layer, before the model writes it in the prompt's language?  The logit lens (Wendler et al. 2024) at the last position and at the subject's last token, on the facts the model knows, per prompt language.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["lens"], log=log)\nprint(run.summary())'),
        (
            "md",
            "Per prompt language: the facts looked at, the median emergence layer (the first layer where the prompt language's answer ranks in the top k at the last position) and the facts where it never does, how often each answer language is decodable first, and where the latent English curve peaks.",
        ),
        (
            "code",
            'import pandas as pd\nfrom analysis.lens import LensResult\nfrom mlake.pipeline.report import LENS_COLUMNS, lens_cells\n\nresult = LensResult.load(run.stages["lens"].runs["lens"])\npd.DataFrame([lens_cells(s) for s in result.summaries], columns=LENS_COLUMNS)',
        ),
        (
            "md",
            "The answer written in each language, by layer, at the last position: the prompt's own language thick, the latent English curve (facts whose English token differs from the prompt language's) dotted.",
        ),
        (
            "code",
            'from figures.lens import answer_probabilities\nanswer_probabilities(result, "last")',
        ),
        ("md", "The same at the subject's last token."),
        ("code", 'answer_probabilities(result, "subject_last")'),
        (
            "md",
            "## Before and after an edit\n\nThe notebook settings edit the first 3 facts known in each language with FT (`lens.method`, `lens.edits`) and read each edit in every test language, before and inside the edit: the new and the old answer, each written in every language, at every layer.  Per edit and test language: how many edits succeed there, the new answer's median emergence layer after the edit (the rule above), and how often another language's form of it is decodable first.",
        ),
        (
            "code",
            'from analysis.lens import EditLensResult\nfrom mlake.stages.lens import edit_lens_lines\n\nedits = EditLensResult.load(run.stages["lens"].runs["lens_edits"])\nprint("\\n".join(edit_lens_lines(edits)))',
        ),
        (
            "md",
            "The edits made in English, read in each test language: the new answer (red) and the old one (grey), each in the test language's form, before the edit (dashed) and after it (solid).",
        ),
        ("code", 'from figures.lens import edit_curves\nedit_curves(edits, "en")'),
        (
            "md",
            "One edit's arrays, as the failure classification reads them: `prob` and `rank` are `[test language, phase (before, after), position (subject_last, last), layer, kind (new, old), answer language]`.",
        ),
        (
            "code",
            'one = next(edits.lenses("en"))\nprint(one.fact_id, one.test_langs, one.prob.shape)\n{b: (one.emergence_layer(b, edits.top_k), one.first_language(b, edits.top_k), one.success(b)) for b in one.test_langs}',
        ),
    ],
    "08_crosslingual_patching": [
        (
            "md",
            "# Cross-lingual patching\n\nDoes a hidden state from a prompt in language A make the model's run on a prompt in language B follow A's content?  The residual stream leaving each layer is patched, one layer at a time, at the subject's last token or at the last position (Dumas et al. 2025; Fierro et al. 2025).  Counterfactual pairs (another known fact's state) on the unedited model, and whether an edit's state carries the edit into another language.",
        ),
        ("code", SETUP),
        ("code", 'run = notebook_run(["patching"], log=log)\nprint(run.summary())'),
        (
            "md",
            "The 5x5 matrices at each position's best layer (the layer where B follows A most often off the diagonal): rows are the source (or edit) language A, columns the target language B.",
        ),
        (
            "code",
            'from analysis.patching import PatchingResult\nfrom mlake.stages.patching import report_lines\n\nresult = PatchingResult.load(run.stages["patching"].runs["patching"])\nprint("\\n".join(report_lines(result)))',
        ),
        ("code", "from figures.patching import layer_curves, matrices\nmatrices(result)"),
        (
            "md",
            "By layer: how often B follows A, per target language (the mean over the other source languages), the diagonal dashed, and the edit-carried rate dotted.",
        ),
        ("code", "layer_curves(result)"),
    ],
    "09_where_transfer_fails": [
        (
            "md",
            "# Where transfer fails\n\nFor each edit and each language pair, where is the transfer lost?  The lens before and after an edit, the cross-lingual patching matrices, the failure classes read from them (not enriched at B's subject, not extracted to B's last position, lost at the output), and these measures as predictors of transfer in the relation analysis, beside the neuron overlap (issue 21).",
        ),
        ("code", SETUP),
        (
            "code",
            'run = notebook_run(["lens", "patching", "transfer", "neurons", "relate"], log=log)\nprint(run.summary())',
        ),
        (
            "md",
            "## The lens before and after an edit\n\nThe notebook settings edit the first 3 facts known in each language with FT.  The edits made in English, read in each test language: the new answer (red) and the old one (grey), in the test language's form, before the edit (dashed) and after it (solid).",
        ),
        (
            "code",
            'from analysis.lens import EditLensResult\nfrom figures.lens import edit_curves\n\nedits = EditLensResult.load(run.stages["lens"].runs["lens_edits"])\nedit_curves(edits, "en")',
        ),
        (
            "md",
            "## Cross-lingual patching\n\nThe matrices at each position's best layer (the layer where B follows A most often off the diagonal, on the unedited model): rows are the source (or edit) language A, columns the target language B; the edit-carried rate patches the edited model's state into B's unedited run.",
        ),
        (
            "code",
            'from analysis.patching import PatchingResult\nfrom figures.patching import matrices\n\npatched = PatchingResult.load(run.stages["patching"].runs["patching"])\nmatrices(patched)',
        ),
        (
            "md",
            "## The failure classes\n\nEvery edit made in A and read in B, by the rules of `analysis/failures.py` in order: not applicable (counted), transferred, not enriched (the new answer, in any language's form, is decodable at B's subject position at no layer after the edit), not extracted (decodable there, but at B's last position in no latent layer), lost at the output.  With the patching run of the same FT edits, `carried` counts the failures whose edited subject state, patched into B, makes B give the new answer.",
        ),
        (
            "code",
            'from mlake.stages.lens import edit_failures, failure_lines\n\nfailures = edit_failures(edits, patching=run.stages["patching"].runs["patching"])\nprint("\\n".join(failure_lines(failures)))',
        ),
        (
            "code",
            "from figures.failures import failure_matrices\nfailure_matrices(failures, edits.method)",
        ),
        (
            "md",
            "## The lens and patching measures as predictors of transfer\n\n`mlake relate` takes the patching run and the lens run of the transfer run's method (here the pipeline's own) and adds, per language pair and per fact: B follows A at the best layer (subject, last position), the edit carried, and the new answer decodable at B's subject / last latent position after the edit.  Pair level: each matrix against the transfer matrix (Spearman, Mantel test).  Fact level: the same logistic and linear models as the neuron overlap's, each on the rows its run measures; the rows it does not measure are counted.  On a few facts most models are not estimable, and the table says why.",
        ),
        (
            "code",
            'from analysis.relate import INTERVENTION_PREDICTORS\nfrom mlake.stages.relate import load_relate_result\n\nrelated = load_relate_result(run.stages["relate"].runs["ft"])\nprint({k: v for k, v in related.inputs.items() if k in ("lens_edits", "patching")})\nrelated.pair_level[related.pair_level["predictor"].isin(["neuron_jaccard_ig_neuron", *INTERVENTION_PREDICTORS])]',
        ),
        (
            "code",
            "from figures.relate import predictors_vs_transfer\npredictors_vs_transfer(related)",
        ),
        (
            "code",
            'import pandas as pd\n\npd.DataFrame(\n    [\n        {"predictor": name, "model": kind, "rows": fit.n_rows, "facts": fit.n_facts,\n         "missing": related.missing.get(name, 0), "not estimated": fit.note,\n         **({} if fit.note else fit.term(name))}\n        for name, fits in {"overlap": related.fits, **related.predictor_fits}.items()\n        for kind, fit in fits.items()\n    ]\n)',
        ),
    ],
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells:
        cell = (
            nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        )
        cell.id = f"{name[:2]}-{len(nb.cells)}"
        nb.cells.append(cell)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
