"""Which layers an edit writes to: checking a layer index, the documented defaults before
causal tracing picks a layer, and the ``auto`` / index / range settings of the methods.

ROME and FT edit one layer (:func:`resolve_layer`); MEMIT a run of layers
(:func:`resolve_layers`).  Methods that write at the subject token (ROME, MEMIT) never edit the
last layer (:func:`check_not_last`).
"""

from __future__ import annotations

from collections.abc import Sequence

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter


def check_layer(adapter: ModelAdapter, layer: int, option: str = "--layer") -> int:
    """Validate a layer index (negative counts from the end).

    Raises:
        ConfigError: out of range, naming the option and the model's layer count.
    """
    n = adapter.n_layers
    if not -n <= int(layer) < n:
        raise ConfigError(f"{option} {layer}: the model has {n} layers (0..{n - 1})")
    return int(layer) % n


def check_not_last(adapter: ModelAdapter, layer: int, method: str) -> int:
    """Methods that write at the subject token (ROME, MEMIT) cannot use the last layer: its
    output at a token before the last is read by no later layer, so it cannot change the
    answer.

    Raises:
        ConfigError: for the last layer, naming the method and the usable range.
    """
    if layer == adapter.n_layers - 1:
        raise ConfigError(
            f"--layer {layer}: {method} writes at the subject token, and the last layer's output "
            f"there is read by no later layer; choose a layer in 0..{adapter.n_layers - 2}"
        )
    return layer


def default_layer(adapter: ModelAdapter) -> int:
    """The documented default edit layer before causal tracing picks one: the layer at about
    a third of the depth (ROME edits layer 17 of 48 in GPT-2 XL, 5 of 28 in GPT-J; MEMIT's
    ranges start in the lower third)."""
    return min(adapter.n_layers // 3, max(0, adapter.n_layers - 2))


def resolve_layer(adapter: ModelAdapter, layer: int | str) -> int:
    """``auto`` (the documented default, :func:`default_layer`) or an explicit index.

    Raises:
        ConfigError: neither ``auto`` nor an index, or an index out of range.
    """
    if layer == "auto":
        return default_layer(adapter)
    try:
        value = int(layer)
    except (TypeError, ValueError):
        raise ConfigError(f"--layer {layer!r}: expected a layer index or 'auto'") from None
    return check_layer(adapter, value)


def default_layers(adapter: ModelAdapter, end: int | None = None) -> tuple[int, ...]:
    """The documented default MEMIT layers: a run of ``max(2, round(5 * n_layers / 28))``
    layers ending at ``end`` (the layer causal tracing recommends, see ``mlake trace``), by
    default :func:`default_layer` (MEMIT edits 5 of GPT-J's 28 layers, 3-8; of a 4-layer
    model, layers 0-1; of a 2-layer one, layer 0)."""
    end = default_layer(adapter) if end is None else int(end)
    width = max(2, round(5 * adapter.n_layers / 28))
    return tuple(range(max(0, end - width + 1), end + 1))


def resolve_layers(adapter: ModelAdapter, layers: str | Sequence[int]) -> tuple[int, ...]:
    """``auto``, ``"a-b"``, ``"a,b,c"`` or a sequence of ints, checked against the model.

    Raises:
        ConfigError: for a malformed spec, a layer out of range or unsorted/duplicate layers.
    """
    if layers == "auto":
        return default_layers(adapter)
    if isinstance(layers, str):
        text = layers.strip()
        try:
            if "-" in text.lstrip("-") and "," not in text:
                a, _, b = text.partition("-")
                values = list(range(int(a), int(b) + 1))
            else:
                values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--layers {layers!r}: expected 'auto', a range such as 1-3, or a list such as 1,2,3"
            ) from None
    else:
        values = [int(x) for x in layers]
    if not values:
        raise ConfigError(f"--layers {layers!r}: no layers given")
    checked = [check_layer(adapter, v) for v in values]
    check_not_last(adapter, max(checked), "memit")
    if sorted(set(checked)) != checked:
        raise ConfigError(f"--layers {layers!r}: layers must be increasing and distinct")
    return tuple(checked)
