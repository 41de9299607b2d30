"""The one resolution of editing-method settings (:mod:`mlake.method_settings`): the
method's defaults, tracing's layer for ``auto``, the settings a model brings, and what the
user set, in that rising precedence; ``auto`` resolved once."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mlake.commands.common import parse_set
from mlake.method_settings import resolve_method, set_fields
from mlake_core.editing import get_method
from mlake_core.editing.ft import FtConfig
from mlake_core.editing.ike import IkeConfig
from mlake_core.editing.layers import default_layer, default_layers
from mlake_core.editing.memit import MemitConfig
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError

DELTA = {"clamp_norm": "100", "steps": "200", "lr": "2", "init": "subject-mean", "restarts": "3"}
FT = {"lr": "0.01", "steps": "100", "max_rel_norm": "0.3"}
RECOMMENDED = {
    "rome": {"layer": "1", **DELTA},
    "memit": {"layers": "0-1", **DELTA, "mom2_weight": "0.01"},
    "ft": {"layer": "1", **FT},
}
#: A 12-layer model: the documented default edit layer is 12 // 3 = 4.
ADAPTER = SimpleNamespace(n_layers=12)


@pytest.fixture
def model(monkeypatch, tmp_path):
    """``(settings, traced)`` -> a resolver for a model that brings ``settings`` and whose
    tracing recommended ``traced`` (``None``: never traced); returns (config, source, logs)."""
    from mlake.stages import tracing
    from mlake_core.models import mlake_tiny

    def make(settings=None, traced=None):
        monkeypatch.setattr(mlake_tiny, "recommended_edit_settings", lambda path: settings or {})
        entry = None if traced is None else {"layer": traced, "run": "runs/tracing/abc"}
        monkeypatch.setattr(tracing, "lookup_recommended_layer", lambda *a, **k: entry)

        def resolve(name, given=None, model_settings=True):
            logs: list[str] = []
            r = resolve_method(
                name,
                ADAPTER,
                "model",
                given=given,
                model_settings=model_settings,
                results_dir=tmp_path,
                log=logs.append,
            )
            return r.config, r.layer_source, logs

        return resolve

    return make


def test_auto_takes_tracing_then_the_documented_default(model) -> None:
    rome, source, logs = model(traced=6)("rome")
    assert rome == RomeConfig(layer="6") and source == "tracing"
    assert logs == ["rome: layer auto -> layer 6 (causal tracing, runs/tracing/abc)"]
    memit, _, _ = model(traced=6)("memit")
    assert memit.layers == ",".join(map(str, default_layers(ADAPTER, end=6))) == "5,6"
    rome, source, logs = model()("rome")
    assert rome.layer == str(default_layer(ADAPTER)) == "4" and source == "default"
    assert logs == ["rome: layer auto -> layer 4 (documented default)"]
    # A method without layers: nothing to resolve.
    ike, source, logs = model(RECOMMENDED, traced=6)("ike")
    assert ike == IkeConfig() and source is None and logs == []


def test_model_settings_win_over_tracing_and_defaults(model) -> None:
    resolve = model(RECOMMENDED, traced=0)
    rome, source, logs = resolve("rome")
    assert rome == RomeConfig(
        layer="1", clamp_norm=100.0, steps=200, lr=2.0, init="subject-mean", restarts=3
    )
    assert source == "model" and rome.weight_decay == RomeConfig().weight_decay
    assert logs == [
        "rome: settings this model was trained for: layer=1, clamp_norm=100, steps=200, lr=2, "
        "init=subject-mean, restarts=3"
    ]
    memit, _, _ = resolve("memit")
    assert memit.layers == "0-1" and memit.mom2_weight == 0.01 and memit.restarts == 3
    ft, _, _ = resolve("ft")
    assert ft == FtConfig(layer="1", lr=0.01, steps=100, max_rel_norm=0.3)
    # Turned off: tracing's layer and the defaults.
    rome, source, _ = resolve("rome", model_settings=False)
    assert rome == RomeConfig(layer="0") and source == "tracing"


def test_what_the_user_sets_wins_and_is_logged(model) -> None:
    resolve = model(RECOMMENDED, traced=3)
    rome, source, logs = resolve("rome", {"layer": "0"})
    assert rome.layer == "0" and source == "explicit"
    assert rome.init == "subject-mean" and rome.restarts == 3 and rome.clamp_norm == 100.0
    assert "layer=1" not in logs[0] and logs[0].endswith("; set here instead: layer=0")
    sets = parse_set(
        ["rome.layer=0", "rome.init=zero", "rome.restarts=0", "memit.steps=7"],
        {"rome": RomeConfig, "memit": MemitConfig},
    )
    rome, _, _ = resolve("rome", sets["rome"])
    assert (rome.layer, rome.init, rome.restarts) == ("0", "zero", 0)
    assert rome.clamp_norm == 100.0 and type(rome.restarts) is int
    memit, source, _ = resolve("memit", sets["memit"])
    assert memit.steps == 7 and memit.layers == "0-1" and memit.lr == 2.0
    assert source == "model"
    # Without model settings or tracing.
    plain, source, _ = model()("rome", {"layer": "0", "init": "subject-mean", "restarts": "3"})
    assert plain == RomeConfig(layer="0", init="subject-mean", restarts=3)
    assert source == "explicit"
    # A model whose only setting is the layer, given by the user: nothing left to log.
    ft, _, logs = model({"ft": {"layer": "1"}})("ft", {"layer": "0"})
    assert ft == FtConfig(layer="0") and logs == []


def test_bad_values_fail_naming_the_field(model) -> None:
    resolve = model()
    with pytest.raises(ConfigError, match=r"rome\.init 'bogus'"):
        resolve("rome", {"init": "bogus"})
    with pytest.raises(ConfigError, match=r"memit\.restarts -1"):
        resolve("memit", {"restarts": "-1"})
    with pytest.raises(ConfigError, match="has no field 'inits'"):
        parse_set(["rome.inits=zero"], {"rome": RomeConfig})
    with pytest.raises(ConfigError, match=r"expected NAME\.FIELD=VALUE"):
        parse_set(["rome-init"], {"rome": RomeConfig})
    with pytest.raises(ConfigError, match="--method 'bogus' is not known"):
        resolve("bogus")


def test_set_fields_compares_as_text() -> None:
    assert set_fields(FtConfig()) == {}
    assert set_fields(FtConfig(lr=0.01, layer="auto")) == {"lr": 0.01}
    # A YAML round trip (layer 0 read as an int, or as text) counts the same.
    assert set(set_fields(FtConfig(layer=0))) == set(set_fields(FtConfig(layer="0"))) == {"layer"}
    assert json.dumps(sorted(set_fields(RomeConfig(restarts=3)))) == '["restarts"]'
    assert get_method("ft").config_cls is FtConfig
