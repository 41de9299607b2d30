"""The where-transfer-fails figure on a built result: one panel per outcome, each cell the
outcome's share with its count, pairs without applicable edits n/a, an unknown method
refused."""

from __future__ import annotations

import matplotlib
import pytest

from analysis.failures import FAILURES, OUTCOMES, TRANSFERRED, FailureResult, FailureSummary
from figures.failures import failure_matrices

matplotlib.use("Agg")

LANGS = ("en", "zh")


def _summary(a: str, b: str) -> FailureSummary:
    counts = dict.fromkeys(OUTCOMES, 0)
    if a == "en":  # en edits: 3 transferred in en; in zh 1 of 4 not enriched, 3 lost
        counts.update({TRANSFERRED: 3} if b == "en" else {FAILURES[0]: 1, FAILURES[2]: 3})
    return FailureSummary("ft", a, b, sum(counts.values()), counts)


def test_failure_matrices() -> None:
    import matplotlib.pyplot as plt

    result = FailureResult(LANGS, 4, 10, [0, 1, 2], [_summary(a, b) for a in LANGS for b in LANGS])
    fig = failure_matrices(result, "ft")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [TRANSFERRED, *FAILURES]
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in panels}
    assert texts[TRANSFERRED][:4] == ["1.00", "3/3", "0.00", "0/4"]  # en row: en, zh
    assert texts[FAILURES[0]][2:4] == ["0.25", "1/4"]
    assert texts[FAILURES[2]][2:4] == ["0.75", "3/4"]
    assert texts[TRANSFERRED][4:] == ["n/a", "n/a"]  # zh edits: none
    assert "latent layers 0-2 of 4" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="rome"):
        failure_matrices(result, "rome")


def test_the_pipeline_draws_it_from_a_lens_edit_run(tmp_path) -> None:
    """``lens_failures`` among the pipeline's figures when the lens ran with edits: classified
    from the run's saved edit lenses (two facts edited in en and in zh; each edit succeeds in
    its own language; in the other, fact 0's new answer is decodable at the subject only (not
    extracted), fact 1's nowhere (not enriched))."""
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.lens import EDIT_KINDS, PHASES, EditLens, EditLensResult, summarize_edit_lens
    from mlake.pipeline import figures as pipeline_figures
    from mlake_core.results.store import open_run

    k, n_layers = len(LANGS), 4
    after, new = PHASES.index("after"), EDIT_KINDS.index("new")

    def edit_lens(f: int, a: str) -> EditLens:
        rank = np.full((k, 2, 2, n_layers, 2, k), 500)
        for t, b in enumerate(LANGS):
            if b == a:
                rank[t, after, 1, -1, new, t] = 0  # the new answer is A's output
            elif f == 0:
                rank[t, after, 0, 1, new, t] = 4  # decodable at B's subject only
        return EditLens(
            prob=np.full(rank.shape, 1e-3),
            rank=rank,
            answer_ids=np.array([[[10, 11], [20, 21]]] * k),
            answer_langs=list(LANGS),
            test_langs=list(LANGS),
            positions=np.tile([2, 5], (k, 1)),
            known_before=[True] * k,
            edit_lang=a,
            fact_id=f,
        )

    run = open_run("lens_edits", {"test": "failure figure"}, tmp_path / "store")
    lenses = {a: [edit_lens(f, a) for f in (0, 1)] for a in LANGS}
    for a, items in lenses.items():
        for lens in items:
            run.save_arrays(f"edit_{a}_{lens.fact_id}", lens.to_arrays())
    result = EditLensResult(
        langs=LANGS,
        method="ft",
        n_layers=n_layers,
        top_k=10,
        lens="logit",
        pairs={a: {b: summarize_edit_lens(a, b, lenses[a], 10) for b in LANGS} for a in LANGS},
        edits={a: [0, 1] for a in LANGS},
        skipped={},
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete")
    runs = {"lens_edits": str(run.path)}
    manifest = {"stages": {"lens": {"status": "complete", "runs": runs}}}
    maker = dict(pipeline_figures.figure_makers(manifest))["lens_failures"]
    assert callable(maker)
    fig = maker()
    panels = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes if ax.get_title()}
    # cells in row order: en->en, en->zh, zh->en, zh->zh
    assert panels[TRANSFERRED] == ["1.00", "2/2", "0.00", "0/2", "0.00", "0/2", "1.00", "2/2"]
    assert panels[FAILURES[0]][2:6] == ["0.50", "1/2", "0.50", "1/2"]  # not enriched
    assert panels[FAILURES[1]][2:6] == ["0.50", "1/2", "0.50", "1/2"]  # not extracted
    assert panels[FAILURES[2]][2:4] == ["0.00", "0/2"]
    assert "Where ft edits fail" in fig._suptitle.get_text()
    plt.close(fig)
    # Without edits in the lens stage: no such figure.
    del runs["lens_edits"]
    assert "lens_failures" not in dict(pipeline_figures.figure_makers(manifest))
