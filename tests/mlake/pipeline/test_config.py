"""The pipeline config: the shipped YAML equals the defaults, YAML values are coerced through
the config dataclasses, and every mistake is one error naming the file and the key path."""

from __future__ import annotations

import dataclasses

import pytest

from mlake.pipeline import (
    DEFAULT_CONFIG_FILE,
    STAGES,
    PipelineConfig,
    config_from_dict,
    dump_config,
    load_config,
    with_overrides,
)
from mlake_core.errors import ConfigError


def _write(tmp_path, text: str):
    path = tmp_path / "my_config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_yaml_is_the_defaults():
    assert load_config(DEFAULT_CONFIG_FILE).to_dict() == PipelineConfig().to_dict()


def test_dump_and_load_round_trip(tmp_path):
    config = config_from_dict(
        {"data": {"facts": 7, "langs": "en,zh"}, "transfer": {"ft": {"lr": "5e-1"}}}
    )
    again = load_config(_write(tmp_path, dump_config(config)))
    assert again.to_dict() == config.to_dict()
    assert again == config


def test_partial_file_keeps_other_defaults(tmp_path):
    config = load_config(
        _write(
            tmp_path,
            "data:\n  facts: 12\n  langs: [en, ja]\ntracing:\n  n_samples: 3\n"
            "transfer:\n  ft:\n    lr: 5e-1\n  ike:\n    n_demonstrations: 2\n"
            "neurons:\n  attribution:\n    steps: 4\nrelate:\n  unit: atp_neuron\n  n_boot: 50\n",
        )
    )
    default = PipelineConfig()
    assert config.data.facts == 12 and config.data.langs == ("en", "ja")
    assert config.tracing.n_samples == 3 and config.tracing.kinds == default.tracing.kinds
    ft = config.transfer.method_config("ft")
    # YAML reads 5e-1 as a string: coerced to the field's type, other FT fields kept.
    assert ft.lr == 0.5 and isinstance(ft.lr, float)
    library = type(ft)()
    assert (ft.steps, ft.max_rel_norm, ft.layer) == (library.steps, library.max_rel_norm, "auto")
    assert config.transfer.method_config("ike").n_demonstrations == 2
    assert config.neurons.attribution.steps == 4
    assert config.neurons.attribution.samples == default.neurons.attribution.samples
    assert config.relate.unit == "atp_neuron" and config.relate.stats.n_boot == 50
    assert config.relate.stats.n_perm == default.relate.stats.n_perm


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tracing:\n  n_sample: 3\n", "tracing.n_sample: unknown key"),
        ("neurons:\n  attribution:\n    stepz: 4\n", "neurons.attribution.stepz: unknown key"),
        ("transfer:\n  ft:\n    learning_rate: 0.1\n", "transfer.ft.learning_rate: unknown key"),
        ("transfer:\n  sgd: {}\n", "transfer.sgd: unknown key"),
        ("tracting: {}\n", "tracting: unknown section"),
        ("tracing:\n  n_samples: many\n", "tracing.n_samples: expected an integer, got 'many'"),
        ("tracing:\n  n_samples: 2.5\n", "tracing.n_samples: expected an integer"),
        ("transfer:\n  ft:\n    lr: fast\n", "transfer.ft.lr: expected a number"),
        ("transfer:\n  ft:\n    lr: .nan\n", "transfer.ft.lr: expected a finite number"),
        (
            "transfer:\n  rome:\n    clamp_norm: inf\n",
            "transfer.rome.clamp_norm: expected a finite",
        ),
        ("knowledge:\n  mcqa: maybe\n", "knowledge.mcqa: expected true or false"),
        ("tracing:\n  kinds: [mlp, ffn]\n", "tracing: --kinds mlp,ffn"),
        ("data:\n  langs: [en, xx]\n", "data:"),
        ("data:\n  facts: 0\n", "data: facts 0: must be at least 1"),
        ("run:\n  stages: [data, plots]\n", "run: stages: unknown plots"),
        ("transfer:\n  methods: [ft, sgd]\n", "transfer:"),
        ("transfer:\n  restricted: [everything]\n", "transfer: restricted everything"),
        ("relate:\n  n_boot: 3\n", "relate: --n-boot must be >= 10"),
        (
            "transfer:\n  methods: [ft, ike]\n  ike:\n    n_demonstrations: 5\n",
            "at most n_locality (3)",
        ),
        ("model:\n  backend: jax\n", "model: backend 'jax'"),
        ("tracing: 3\n", "tracing: expected a mapping"),
        ("lens:\n  top_k: 0\n", "lens: --top-k 0: must be at least 1"),
        ("lens:\n  form: essay\n", "lens: --form 'essay': choose question or cloze"),
        ("lens:\n  depth: 3\n", "lens.depth: unknown key"),
        ("- a\n- b\n", "expected a mapping of sections"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message, message


def test_the_lens_section(tmp_path):
    """The lens stage runs after tracing and before editing; its section is LensConfig's."""
    from analysis.lens import LensConfig

    assert STAGES.index("tracing") + 1 == STAGES.index("lens") == STAGES.index("transfer") - 2
    assert PipelineConfig().lens == LensConfig()
    config = load_config(_write(tmp_path, "lens:\n  top_k: '3'\n"))
    assert config.lens == LensConfig(top_k=3)
    assert config.to_dict()["lens"] == {
        "form": "question",
        "top_k": 3,
        "lens": "logit",
        "method": "none",
        "edits": 10,
        "seed": 0,
    }
    edits = load_config(_write(tmp_path, "lens:\n  method: ft\n  edits: 2\n  lens: tuned\n"))
    assert edits.lens == LensConfig(method="ft", edits=2, lens="tuned")
    assert edits.lens.measures_edits
    assert load_config(_write(tmp_path, dump_config(config))) == config


def test_the_transfer_protocol(tmp_path):
    """``transfer.protocol`` reaches the TransferConfig the stage runs with; a bad value is
    one error naming the file and the key."""
    assert PipelineConfig().transfer.transfer_config(24).protocol == "free-form"
    config = load_config(_write(tmp_path, "transfer:\n  protocol: mlake\n"))
    assert config.transfer.transfer_config(24).protocol == "mlake"
    assert load_config(_write(tmp_path, dump_config(config))) == config
    path = _write(tmp_path, "transfer:\n  protocol: paper\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and "protocol" in str(err.value)


def test_values_validated_together(tmp_path):
    """IKE's demonstrations and the locality sample are checked with the file's values."""
    config = load_config(
        _write(
            tmp_path,
            "transfer:\n  methods: [ike]\n  restricted: []\n  n_locality: 6\n  ike:\n    n_demonstrations: 6\n",
        )
    )
    assert config.transfer.method_config("ike").n_demonstrations == 6


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))


def test_overrides_and_seeds():
    config = with_overrides(
        PipelineConfig(), model="/tmp/m", facts="all", results_dir="/tmp/r", stages=["data"]
    )
    assert config.model.name == "/tmp/m" and config.data.facts == "all"
    assert config.run.results_dir == "/tmp/r" and config.run.stages == ("data",)
    seeds = config.seeds()
    assert seeds["run"] == 0 and seeds["tracing"] == 0 and "neurons" in seeds
    assert set(PipelineConfig().run.stages) == set(STAGES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.name = "x"  # type: ignore[misc]


#: A model of 6 layers that was never traced (layer auto: the documented default, layer 2).
N_LAYERS = 6


def _resolve(config, name, settings, monkeypatch, tmp_path=None):
    """The pipeline's method config for a model that brings ``settings``, with logs."""
    from types import SimpleNamespace

    from mlake.pipeline import steps
    from mlake_core.models import mlake_tiny

    monkeypatch.setattr(mlake_tiny, "recommended_edit_settings", lambda path: settings)
    logs: list[str] = []
    ctx = SimpleNamespace(adapter=SimpleNamespace(n_layers=N_LAYERS), model_path="model")
    state = SimpleNamespace(config=config, context=ctx, log=logs.append, store=tmp_path)
    return steps._method_config(state, name), logs


def test_model_settings_fill_the_fields_the_config_leaves_at_defaults(tmp_path, monkeypatch):
    settings = {
        "ft": {"layer": "1", "lr": "0.01", "steps": "100", "max_rel_norm": "0.3"},
        "rome": {"layer": "1", "clamp_norm": "100", "steps": "200", "restarts": "3"},
    }
    # Defaults everywhere: every model setting applies (the pipeline's FT layer 0 included).
    rome, logs = _resolve(PipelineConfig(), "rome", settings, monkeypatch)
    assert (str(rome.layer), rome.clamp_norm, rome.steps, rome.restarts) == ("1", 100.0, 200, 3)
    assert "settings this model was trained for: layer=1, clamp_norm=100" in logs[0]
    ft, _ = _resolve(PipelineConfig(), "ft", settings, monkeypatch)
    assert (str(ft.layer), ft.lr, ft.steps) == ("1", 0.01, 100)
    # A field the file sets to another value keeps it, and the log says so.
    config = load_config(_write(tmp_path, "transfer:\n  rome:\n    layer: 2\n    steps: 50\n"))
    rome, logs = _resolve(config, "rome", settings, monkeypatch)
    assert (str(rome.layer), rome.steps, rome.clamp_norm, rome.restarts) == ("2", 50, 100.0, 3)
    assert "set here instead: layer=2, steps=50" in logs[0]
    # Turned off: the config alone.
    config = load_config(
        _write(tmp_path, "transfer:\n  model_settings: false\n  rome:\n    layer: 2\n")
    )
    rome, logs = _resolve(config, "rome", settings, monkeypatch)
    assert (str(rome.layer), rome.clamp_norm, rome.restarts) == ("2", 4.0, 0) and not logs
    # A model without settings: the config, with layer auto resolved once, to the documented
    # default when the model was never traced.
    ft, logs = _resolve(config, "ft", {}, monkeypatch, tmp_path)
    assert ft == dataclasses.replace(config.transfer.method_config("ft"), layer="2")
    assert logs == ["transfer: ft: layer auto -> layer 2 (documented default)"]
