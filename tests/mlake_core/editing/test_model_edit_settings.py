"""How ``mlake edit transfer`` combines the edit settings a model was trained for with the
method defaults, ``--layer`` and ``--set`` (``method_config_for``); the settings themselves
are tested in ``tests/mlake_core/models/test_mlake_tiny_edit_settings.py``."""

from __future__ import annotations

import pytest

from mlake.commands.edit import method_config_for, parse_overrides
from mlake_core.editing import get_method
from mlake_core.editing.ft import FtConfig
from mlake_core.editing.ike import IkeConfig
from mlake_core.editing.memit import MemitConfig
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError

AUTO = {"layer": "auto", "layers": "auto"}
DELTA = {"clamp_norm": "100", "steps": "200", "lr": "2", "init": "subject-mean", "restarts": "3"}
FT = {"lr": "0.01", "steps": "100", "max_rel_norm": "0.3"}


# -- method_config_for ---------------------------------------------------------------------------

RECOMMENDED = {
    "rome": {"layer": "1", **DELTA},
    "memit": {"layers": "0-1", **DELTA, "mom2_weight": "0.01"},
    "ft": {"layer": "1", **FT},
}


def test_defaults_and_layer_for() -> None:
    rome, memit = get_method("rome"), get_method("memit")
    assert method_config_for(rome, AUTO, {}, {}, explicit_layer=False) == RomeConfig()
    assert method_config_for(memit, AUTO, {}, {}, explicit_layer=False) == MemitConfig()
    traced = {"layer": "2", "layers": "1,2"}
    got = method_config_for(rome, traced, {}, {}, explicit_layer=False)
    assert got == RomeConfig(layer="2")
    assert method_config_for(memit, traced, {}, {}, explicit_layer=False).layers == "1,2"
    # A method without a layer field ignores it.
    ike = method_config_for(get_method("ike"), traced, RECOMMENDED, {}, explicit_layer=True)
    assert ike == IkeConfig()


def test_model_settings_replace_the_layer_for_and_defaults(capsys) -> None:
    traced = {"layer": "0", "layers": "0"}
    rome = method_config_for(get_method("rome"), traced, RECOMMENDED, {}, explicit_layer=False)
    assert rome == RomeConfig(
        layer="1", clamp_norm=100.0, steps=200, lr=2.0, init="subject-mean", restarts=3
    )
    assert rome.weight_decay == RomeConfig().weight_decay  # not among the model's settings
    memit = method_config_for(get_method("memit"), traced, RECOMMENDED, {}, explicit_layer=False)
    assert memit.layers == "0-1" and memit.mom2_weight == 0.01 and memit.restarts == 3
    err = capsys.readouterr().err
    assert "rome: settings this model was trained for: layer=1, clamp_norm=100" in err
    assert "memit: settings this model was trained for: layers=0-1" in err
    assert "(--set overrides)" in err


def test_an_explicit_layer_keeps_its_layer_only(capsys) -> None:
    given = {"layer": "0", "layers": "0"}
    rome = method_config_for(get_method("rome"), given, RECOMMENDED, {}, explicit_layer=True)
    assert rome.layer == "0"
    assert rome.init == "subject-mean" and rome.restarts == 3 and rome.clamp_norm == 100.0
    memit = method_config_for(get_method("memit"), given, RECOMMENDED, {}, explicit_layer=True)
    assert memit.layers == "0" and memit.mom2_weight == 0.01
    err = capsys.readouterr().err
    assert "rome: settings this model was trained for: clamp_norm=100" in err
    assert "layer=1" not in err and "layers=0-1" not in err
    ft = method_config_for(get_method("ft"), given, RECOMMENDED, {}, explicit_layer=True)
    assert ft == FtConfig(layer="0", lr=0.01, steps=100, max_rel_norm=0.3)
    ft = method_config_for(get_method("ft"), AUTO, RECOMMENDED, {}, explicit_layer=False)
    assert ft == FtConfig(layer="1", lr=0.01, steps=100, max_rel_norm=0.3)
    capsys.readouterr()
    # A model whose only setting is the layer: nothing left to apply or log.
    layer_only = {"ft": {"layer": "1"}}
    ft = method_config_for(get_method("ft"), given, layer_only, {}, explicit_layer=True)
    assert ft == FtConfig(layer="0")
    assert capsys.readouterr().err == ""


def test_set_overrides_everything() -> None:
    rome_entry, memit_entry = get_method("rome"), get_method("memit")
    overrides = parse_overrides(
        ["rome.layer=0", "rome.init=zero", "rome.restarts=0", "memit.steps=7"],
        [rome_entry, memit_entry],
    )
    rome = method_config_for(rome_entry, AUTO, RECOMMENDED, overrides, explicit_layer=False)
    assert (rome.layer, rome.init, rome.restarts) == ("0", "zero", 0)
    assert rome.clamp_norm == 100.0  # not overridden: the model's
    memit = method_config_for(memit_entry, AUTO, RECOMMENDED, overrides, explicit_layer=True)
    assert memit.steps == 7 and memit.layers == "auto" and memit.lr == 2.0
    # --set beats an explicit --layer too, and works without model settings.
    only = parse_overrides(["rome.init=subject-mean", "rome.restarts=3"], [rome_entry])
    plain = method_config_for(
        rome_entry, {"layer": "0", "layers": "0"}, {}, only, explicit_layer=True
    )
    assert plain == RomeConfig(layer="0", init="subject-mean", restarts=3)
    assert type(plain.restarts) is int


def test_bad_values_fail_naming_the_field() -> None:
    rome = get_method("rome")
    with pytest.raises(ConfigError, match=r"rome\.init 'bogus'"):
        method_config_for(rome, AUTO, {}, {"rome": {"init": "bogus"}}, explicit_layer=False)
    with pytest.raises(ConfigError, match=r"memit\.restarts -1"):
        method_config_for(
            get_method("memit"), AUTO, {}, {"memit": {"restarts": "-1"}}, explicit_layer=False
        )
    with pytest.raises(ConfigError, match="has no field 'inits'"):
        parse_overrides(["rome.inits=zero"], [rome])


def test_timing_summary_counts_only_timed_edits() -> None:
    import pandas as pd

    from mlake.commands.edit import _timing

    def rows(edits: list[tuple[int, str, float, float]]) -> pd.DataFrame:
        # Three rows per edit (test languages), the edit's timing repeated on each.
        return pd.DataFrame(
            [
                {"fact_id": f, "edit_lang": a, "edit_seconds": e, "eval_seconds": v}
                for f, a, e, v in edits
                for _ in range(3)
            ]
        )

    timed = rows([(1, "en", 1.0, 0.5), (2, "en", 3.0, 1.5), (1, "zh", 2.0, 1.0)])
    assert _timing(timed) == {"timed_edits": 3, "edit_seconds_mean": 2.0, "eval_seconds_mean": 1.0}
    # Edits saved before timing existed (NaN after a resumed run's concatenation) are left out.
    mixed = rows([(1, "en", 1.0, 0.5), (2, "en", float("nan"), float("nan"))])
    assert _timing(mixed) == {"timed_edits": 1, "edit_seconds_mean": 1.0, "eval_seconds_mean": 0.5}
    old = timed.drop(columns=["edit_seconds", "eval_seconds"])
    assert _timing(old) == {"timed_edits": 0, "edit_seconds_mean": None, "eval_seconds_mean": None}
