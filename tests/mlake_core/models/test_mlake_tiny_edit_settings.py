"""The edit settings a trained mlake-tiny takes (``recommended_edit_settings``), one
definition per variant (``Variant.edit_settings``).  No model is loaded: a model folder is its
``mlake_tiny.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlake_core.editing import get_method
from mlake_core.models.mlake_tiny import (
    EDITABLE_NAME,
    METADATA_FILE,
    TINY_NAME,
    VARIANTS,
    TinyTrainConfig,
    recommended_edit_settings,
    variant_config,
    variant_of,
)

DELTA = {"clamp_norm": "100", "steps": "200", "lr": "2", "init": "subject-mean", "restarts": "3"}
FT = {"lr": "0.01", "steps": "100", "max_rel_norm": "0.3"}


def _model(folder: Path, meta: dict[str, Any] | None) -> Path:
    """A model folder with ``meta`` as its mlake_tiny.json (none for ``None``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    if meta is not None:
        (folder / METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _config(**fields: Any) -> dict[str, Any]:
    return {"config": fields, "fact_ids": [1, 2]}


def test_no_settings_for_other_models(tmp_path: Path) -> None:
    assert recommended_edit_settings(_model(tmp_path / "hf", None)) == {}
    assert recommended_edit_settings(tmp_path / "missing") == {}
    assert recommended_edit_settings(tmp_path / "hf" / "config.json") == {}  # a file
    # A mlake_tiny.json without a training config: which variant it is cannot be told.
    assert recommended_edit_settings(_model(tmp_path / "old", {"fact_ids": [1]})) == {}
    assert recommended_edit_settings(_model(tmp_path / "empty", {"config": {}})) == {}


def test_the_default_variant_takes_the_ft_settings_that_move_it(tmp_path: Path) -> None:
    plain = TinyTrainConfig().to_dict()
    assert plain["interchange"] == 0.0
    settings = recommended_edit_settings(_model(tmp_path / "tiny", {"config": plain}))
    assert settings == {"ft": {"layer": "0", **FT}}
    ft = get_method("ft").config_cls(**settings["ft"])
    assert (str(ft.layer), ft.lr, ft.steps, ft.max_rel_norm) == ("0", 0.01, 100, 0.3)
    # Any model trained without interchange takes the default's, whatever its other options
    # (the micro models of the tests, a partial config of an older release).
    for name, config in {
        "zero": _config(interchange=0, route_layer=2),
        "micro": _config(facts=6, n_layers=2, d_model=64),
        "masked": _config(route_masking=0.5, answer_continuations=True),
    }.items():
        assert recommended_edit_settings(_model(tmp_path / name, config)) == settings, name
    assert VARIANTS[TINY_NAME].edit_settings == settings  # the one definition


def test_settings_of_a_model_trained_with_interchange(tmp_path: Path) -> None:
    settings = recommended_edit_settings(
        _model(tmp_path / "m", _config(interchange=1.0, route_layer=2))
    )
    assert settings == {
        "rome": {"layer": "1", **DELTA},
        "memit": {"layers": "0-1", **DELTA, "mom2_weight": "0.01"},
        "ft": {"layer": "1", **FT},
    }
    # Any positive interchange counts; the site follows route_layer.
    first = recommended_edit_settings(
        _model(tmp_path / "r1", _config(interchange="0.25", route_layer=1))
    )
    assert first["rome"]["layer"] == "0" and first["ft"]["layer"] == "0"
    assert first["memit"]["layers"] == "0"
    deep = recommended_edit_settings(_model(tmp_path / "r3", _config(interchange=1, route_layer=3)))
    assert deep["rome"]["layer"] == "2" and deep["memit"]["layers"] == "0-2"


def test_settings_of_the_editable_variant_make_valid_configs(tmp_path: Path) -> None:
    config = variant_config(EDITABLE_NAME)
    assert config.interchange > 0
    folder = _model(tmp_path / "editable", {"config": config.to_dict(), "key": config.key()})
    settings: dict[str, dict[str, Any]] = recommended_edit_settings(folder)  # --set style
    site = config.route_layer - 1
    assert 0 <= site < config.n_layers - 1  # ROME and MEMIT cannot edit the last layer
    assert settings["rome"]["layer"] == str(site)
    assert set(settings) == {"rome", "memit", "ft"}
    rome = get_method("rome").config_cls(**settings["rome"])
    assert (rome.layer, rome.init, rome.restarts, rome.clamp_norm) == (
        str(site),
        "subject-mean",
        3,
        100.0,
    )
    memit = get_method("memit").config_cls(**settings["memit"])
    assert memit.mom2_weight == 0.01 and memit.steps == 200 and memit.lr == 2.0
    ft = get_method("ft").config_cls(**settings["ft"])
    assert (ft.layer, ft.lr, ft.steps, ft.max_rel_norm) == (str(site), 0.01, 100, 0.3)


def test_every_variant_takes_its_own_settings(tmp_path: Path) -> None:
    for name, variant in VARIANTS.items():
        config = variant_config(name).to_dict()
        assert variant_of(config) is variant
        settings = recommended_edit_settings(_model(tmp_path / name, {"config": config}))
        assert set(settings) == set(variant.edit_settings)
        filled = [v for fields in settings.values() for v in fields.values()]
        assert not [v for v in filled if "{" in v or "}" in v], name
        for method, fields in settings.items():
            get_method(method).config_cls(**fields)  # valid values for the method's config
