"""Restricted FT (``FtConfig.units``): only the chosen MLP neurons' output weights change;
the neuron sets come from a neuron-attribution run (``read_unit_sets``) and bad settings fail
before any model is loaded.

The edits run on the tiny random GPT-2 (Conv1D: ``[in, out]`` weights) and Llama
(``nn.Linear``: ``[out, in]``) checkpoints, so both weight orientations are checked; the
requests are built from token ids by hand (no dataset needed).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from mlake.cli import main
from mlake.commands import edit as edit_command
from mlake.stages.transfer import read_unit_sets
from mlake_core.editing import EditContext, get_method
from mlake_core.editing.base import EditRequest, down_proj_name
from mlake_core.editing.ft import UNIT_CHOICES, FtConfig, unit_mask
from mlake_core.errors import ConfigError, DataError
from mlake_core.models import load_adapter
from mlake_core.models.tiny import build_tiny_model

LAYER = 1
ALLOWED = (3, 17, 40)  # neurons of LAYER an edit may change
OTHER_LAYER_NEURON = 5  # a unit of layer 0: neuron 5 of LAYER must stay fixed


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def adapter(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    return load_adapter(str(path), "tlens", device="cpu")


def _request(adapter, lang: str = "en", fact_id: int = 0) -> EditRequest:
    tok = adapter.tokenizer
    prompt = "The capital of France is"
    ids = tuple(tok(prompt).input_ids)
    new = tuple(tok(" Berlin", add_special_tokens=False).input_ids)
    return EditRequest(
        fact_id=fact_id,
        lang=lang,
        form="question",
        prompt=prompt,
        prompt_ids=ids,
        subject="France",
        subject_last=len(ids) - 1,
        target_new="Berlin",
        target_new_ids=new,
        target_old="Paris",
    )


def _context(**sets) -> EditContext:
    return EditContext(torch.Generator().manual_seed(0), None, {}, sets)


def _flat(adapter, layer: int, neurons) -> list[int]:
    return [layer * adapter.d_mlp + n for n in neurons]


def _ft(adapter, requests, context, **config):
    entry = get_method("ft")
    return entry.fn(adapter, requests, FtConfig(layer=LAYER, steps=5, lr=1e-2, **config), context)


def _per_neuron(adapter, delta: torch.Tensor) -> torch.Tensor:
    """``|delta|`` summed over ``d_model``, one value per neuron of the layer."""
    _, out_in = adapter.mlp_down(LAYER)
    return delta.abs().sum(0 if out_in else 1)


def _logp_new(adapter, req: EditRequest) -> float:
    ids = torch.tensor([[*req.prompt_ids, *req.target_new_ids]])
    batch = adapter.batch([ids[0].tolist()], padding_side="right")
    logits, _ = adapter.run_with_cache(batch, [])
    logp = logits[0].float().log_softmax(-1)
    start = len(req.prompt_ids) - 1
    return float(sum(logp[start + k, t] for k, t in enumerate(req.target_new_ids)))


def test_shared_units_only_change_those_neurons(adapter) -> None:
    req = _request(adapter)
    units = _flat(adapter, LAYER, ALLOWED) + _flat(adapter, 0, [OTHER_LAYER_NEURON])
    result = _ft(adapter, [req], _context(shared=units), units="shared")
    delta = result.deltas[down_proj_name(adapter, LAYER)]
    weight, _ = adapter.mlp_down(LAYER)
    assert delta.shape == weight.shape
    per = _per_neuron(adapter, delta)
    assert per.shape == (adapter.d_mlp,)
    others = [n for n in range(adapter.d_mlp) if n not in ALLOWED]
    assert torch.all(per[others] == 0)  # exactly zero, not small
    assert per[OTHER_LAYER_NEURON] == 0
    assert torch.all(per[list(ALLOWED)] > 0)
    assert result.info["units"] == len(ALLOWED)
    p0 = _logp_new(adapter, req)
    with result.applied(adapter):
        assert _logp_new(adapter, req) > p0  # the restricted edit still moves the answer


def test_all_units_is_the_unrestricted_edit(adapter) -> None:
    req = _request(adapter)
    assert FtConfig().units == "all" and UNIT_CHOICES == ("all", "shared", "specific", "random")
    name = down_proj_name(adapter, LAYER)
    plain = _ft(adapter, [req], _context())
    # Unit sets in the context are ignored with units=all.
    with_sets = _ft(adapter, [req], _context(shared=[1, 2]), units="all")
    assert torch.equal(plain.deltas[name], with_sets.deltas[name])
    assert plain.info["units"] == adapter.d_mlp
    # A "restriction" to every neuron of the layer is the same edit, bit for bit.
    every = _ft(
        adapter, [req], _context(shared=_flat(adapter, LAYER, range(adapter.d_mlp))), units="shared"
    )
    assert torch.equal(plain.deltas[name], every.deltas[name])
    assert float(plain.deltas[name].abs().sum()) > 0
    # Every neuron's weights move in the unrestricted edit (so the zeros above are the mask's).
    assert torch.all(_per_neuron(adapter, plain.deltas[name]) > 0)


def test_specific_units_follow_the_request_language(adapter) -> None:
    sets = {
        "en": _flat(adapter, LAYER, [2]),
        "zh": _flat(adapter, LAYER, [9, 11]),
        "shared": _flat(adapter, LAYER, [30]),
    }
    name = down_proj_name(adapter, LAYER)
    for lang, expected in (("en", [2]), ("zh", [9, 11])):
        result = _ft(adapter, [_request(adapter, lang)], _context(**sets), units="specific")
        per = _per_neuron(adapter, result.deltas[name])
        assert torch.nonzero(per).flatten().tolist() == expected
        assert result.info["units"] == len(expected)
    with pytest.raises(ConfigError, match="one edit language"):
        _ft(
            adapter,
            [_request(adapter, "en"), _request(adapter, "zh", 1)],
            _context(**sets),
            units="specific",
        )
    with pytest.raises(ConfigError, match=r"no 'ja' unit set.*--units-from"):
        _ft(adapter, [_request(adapter, "ja")], _context(**sets), units="specific")


def test_missing_set_names_units_from(adapter) -> None:
    req = _request(adapter)
    with pytest.raises(ConfigError, match=r"no 'random' unit set.*--units-from RUN_DIR"):
        _ft(adapter, [req], _context(shared=[1]), units="random")
    with pytest.raises(ConfigError, match="--units-from"):
        _ft(adapter, [req], _context(), units="shared")


def test_empty_set_in_the_layer_changes_nothing(adapter) -> None:
    req = _request(adapter)
    # Units only in layer 0: none in the edited layer.
    result = _ft(adapter, [req], _context(random=_flat(adapter, 0, [1, 2])), units="random")
    delta = result.deltas[down_proj_name(adapter, LAYER)]
    assert torch.count_nonzero(delta) == 0
    assert result.info["units"] == 0 and result.info["rel_norm"] == 0.0
    p0 = _logp_new(adapter, req)
    with result.applied(adapter):
        assert _logp_new(adapter, req) == p0


def test_unknown_units_value() -> None:
    with pytest.raises(ConfigError, match="ft units 'bogus': choose all, shared, specific, random"):
        FtConfig(units="bogus")


def test_unit_mask_by_hand() -> None:
    class Req:
        lang = "en"

    ctx = _context(shared=[0, 3, 8, 15, 16], en=[9])
    assert unit_mask([Req()], "all", ctx, 1, 8) is None
    assert unit_mask([Req()], "shared", ctx, 0, 8).tolist() == [1, 0, 0, 1, 0, 0, 0, 0]
    assert unit_mask([Req()], "shared", ctx, 1, 8).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert unit_mask([Req()], "specific", ctx, 1, 8).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert unit_mask([Req()], "specific", ctx, 2, 8).sum() == 0


# -- read_unit_sets -------------------------------------------------------------------------


def _neuron_run(folder: Path, sets: dict, *, summary: dict | None = None, meta=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "specific_ig_neuron.json").write_text(json.dumps(sets))
    (folder / "summary.json").write_text(json.dumps(summary or {"n_layers": 2, "langs": ["en"]}))
    if meta is not False:
        (folder / "meta.json").write_text(json.dumps(meta or {"model": {"d_mlp": 8}}))
    return folder


SETS = {"en": [1, 9], "zh": [2, 12], "shared": [0, 3, 8]}  # d_mlp 8: shared 2 in layer 0, 1 in 1


def test_read_unit_sets_random_control(tmp_path: Path) -> None:
    folder = _neuron_run(tmp_path / "run", SETS)
    sets = read_unit_sets(str(folder), "ig", seed=0)
    assert {k: sets[k] for k in SETS} == SETS  # the classes as written
    rnd = sets["random"]
    assert rnd == sorted(rnd) and len(set(rnd)) == 3
    assert sum(u // 8 == 0 for u in rnd) == 2 and sum(u // 8 == 1 for u in rnd) == 1
    classed = {u for v in SETS.values() for u in v}
    assert not classed & set(rnd)
    assert all(0 <= u < 16 for u in rnd)
    assert read_unit_sets(str(folder), "ig", seed=0)["random"] == rnd  # reproducible
    draws = {tuple(read_unit_sets(str(folder), "ig", seed=s)["random"]) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    # Over many seeds every unclassed unit is drawn, and no classed one ever is.
    seen = {u for s in range(60) for u in read_unit_sets(str(folder), "ig", seed=s)["random"]}
    assert seen == set(range(16)) - classed


def test_read_unit_sets_width_from_summary_and_small_pools(tmp_path: Path) -> None:
    """d_mlp in summary.json wins (no meta.json needed).  Width 4: layer 0 (units 0-3) is all
    classed, so it gets no random units; layer 1 needs 2 and has exactly 2 free (4, 7)."""
    sets = {"en": [0, 1], "shared": [2, 3, 5, 6]}
    folder = _neuron_run(tmp_path / "run", sets, summary={"n_layers": 2, "d_mlp": 4}, meta=False)
    for seed in range(3):
        assert read_unit_sets(str(folder), "ig", seed=seed)["random"] == [4, 7]


def test_read_unit_sets_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"--units-from .*specific_ig_neuron\.json"):
        read_unit_sets(str(empty), "ig")
    folder = _neuron_run(tmp_path / "run", SETS)
    with pytest.raises(DataError, match=r"specific_atp_neuron\.json"):
        read_unit_sets(str(folder), "atp")
    (folder / "summary.json").unlink()
    with pytest.raises(DataError, match=r"summary\.json"):
        read_unit_sets(str(folder), "ig")
    no_width = _neuron_run(tmp_path / "nowidth", SETS, meta={"model": {}})
    with pytest.raises(DataError, match="d_mlp"):
        read_unit_sets(str(no_width), "ig")


# -- the command line -----------------------------------------------------------------------


@pytest.fixture()
def no_model(monkeypatch):
    """These errors must come before any model is loaded."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(edit_command, "open_session", refuse)


def _call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--set", "ft.bogus=1"), "ft has no field 'bogus' (fields: layer, steps, lr,"),
        (("--set", "ft.lr"), "expected METHOD.FIELD=VALUE"),
        (("--set", "rome.steps=3"), "method 'rome' is not among --methods (ft)"),
        (("--set", "ft.units=shared"), "needs --units-from RUN_DIR"),
        (("--units-from", "MISSING"), "no specific_ig_neuron.json and summary.json there"),
    ],
)
def test_cli_errors_before_loading(no_model, tmp_path: Path, extra, message) -> None:
    extra = tuple(str(tmp_path / "missing") if x == "MISSING" else x for x in extra)
    args = ("edit", "transfer", "--method", "ft", "--results-dir", str(tmp_path), *extra)
    code, out, err = _call(*args)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlake: error:") and message in last
    assert out == ""
    assert not any(tmp_path.iterdir())  # no run opened
