"""The generic registry (mlake_core/registry.py): duplicates refused, unknown names reported
with the option and the known names, registration order kept; and the two registries built
on it (editing methods, attribution methods)."""

from __future__ import annotations

import pytest

from mlake_core.errors import ConfigError
from mlake_core.registry import Registry


def test_register_get_and_order():
    reg: Registry[int] = Registry("widget", option="--widget")
    assert reg.register("b", 2) == 2
    reg.register("a", 1)
    reg.register("c", 3)
    assert reg.get("a") == 1 and reg.get("c") == 3
    assert reg.names() == ("b", "a", "c")  # registration order, not sorted
    assert list(reg) == ["b", "a", "c"] and reg.entries() == (2, 1, 3)
    assert len(reg) == 3 and "a" in reg and "z" not in reg and 1 not in reg


def test_duplicates_are_refused_and_keep_the_first():
    reg: Registry[str] = Registry("widget")
    reg.register("a", "first")
    with pytest.raises(ValueError, match=r"^widget 'a' is already registered$"):
        reg.register("a", "second")
    assert reg.get("a") == "first" and len(reg) == 1


def test_unknown_name_names_the_option_and_lists_the_known_names():
    reg: Registry[int] = Registry("widget", option="--widget")
    for name in ("zeta", "alpha"):
        reg.register(name, 0)
    with pytest.raises(ConfigError) as err:
        reg.get("beta")
    assert str(err.value) == "--widget 'beta' is not known; choose from alpha, zeta"
    plain: Registry[int] = Registry("widget")
    plain.register("one", 1)
    with pytest.raises(ConfigError, match=r"^unknown widget 'x'; choose from one$"):
        plain.get("x")


def test_copy_is_independent():
    reg: Registry[int] = Registry("widget", option="--widget")
    reg.register("a", 1)
    other = reg.copy()
    other.register("b", 2)
    assert reg.names() == ("a",) and other.names() == ("a", "b")
    assert (other.kind, other.option) == ("widget", "--widget")


def test_the_editing_and_attribution_registries():
    from analysis.neurons.attribution import ATTRIBUTION_METHODS
    from mlake_core.editing import EDIT_METHODS, get_method

    assert set(EDIT_METHODS) == {"ft", "rome", "memit", "ike"}
    assert get_method("memit").batched and not get_method("rome").batched
    with pytest.raises(ConfigError, match=r"--method 'nope' is not known; choose from ft, ike"):
        get_method("nope")
    assert ATTRIBUTION_METHODS.names() == ("ig", "atp", "lape")
