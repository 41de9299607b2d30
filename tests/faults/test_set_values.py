"""``--set`` values are checked where they are given: a value that does not parse, NaN or an
infinity is refused before anything runs, naming ``--set METHOD.FIELD`` (or ``--set FIELD``
for ``models train-tiny``), never the dataclass's own option name."""

from __future__ import annotations

import math

import pytest

from mlake.commands.common import parse_set
from mlake.commands.models import parse_fields
from mlake_core.configs import coerce_given, coerce_value
from mlake_core.editing.ft import FtConfig
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError
from mlake_core.models.mlake_tiny import TinyTrainConfig


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", math.nan, math.inf])
def test_non_finite_numbers_are_refused(value) -> None:
    with pytest.raises(ConfigError, match=r"^x\.lr: expected a finite number"):
        coerce_value(value, 0.1, float, "x.lr")
    with pytest.raises(ConfigError, match="finite"):
        FtConfig(lr=value)


def test_finite_numbers_pass() -> None:
    assert coerce_value("5e-1", 0.1, float, "x") == 0.5
    assert coerce_value(-3, 0.1, float, "x") == -3.0
    assert coerce_given(RomeConfig, {"lr": "0.1", "layer": "auto"}, "--set rome") == {
        "lr": 0.1,
        "layer": "auto",
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("ft.lr=abc", r"^--set ft\.lr: expected a number, got 'abc'"),
        ("ft.lr=nan", r"^--set ft\.lr: expected a finite number, got 'nan'"),
        ("ft.steps=inf", r"^--set ft\.steps: expected an integer, got 'inf'"),
        ("rome.clamp_norm=-inf", r"^--set rome\.clamp_norm: expected a finite number"),
        ("rome.init=zero", None),
        ("ft.lr=0.01", None),
    ],
)
def test_set_names_the_option_it_came_from(item: str, message: str | None) -> None:
    known = {"ft": FtConfig, "rome": RomeConfig}
    if message is None:
        name, _, rest = item.partition(".")
        field, _, value = rest.partition("=")
        assert parse_set([item], known) == {name: {field: value}}
        return
    with pytest.raises(ConfigError, match=message):
        parse_set([item], known)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("max_epochs=abc", r"^--set max_epochs: expected an integer, got 'abc'"),
        ("seed=1.5", r"^--set seed: expected an integer"),
        ("lr=nan", r"^--set lr: expected a finite number"),
    ],
)
def test_train_tiny_set_names_the_option(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_fields([item], TinyTrainConfig)
    field, _, value = "max_epochs=3".partition("=")
    assert parse_fields(["max_epochs=3"], TinyTrainConfig) == {field: value}
