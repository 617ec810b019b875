"""The generic registry: registration, aliases, errors with suggestions, plugins, isolation."""

from __future__ import annotations

import pytest

from cwa.errors import InvalidInput, UnknownName
from cwa.registry import Registry


def test_register_lookup_alias_and_listing() -> None:
    reg: Registry = Registry("widget")

    @reg.register("grad_x_weight", aliases=("gxw",))
    def gxw():
        """Gradient times weight."""

    reg.add("magnitude", "cwa.errors:CwaError", description="|w|")
    assert reg.get("gxw") is gxw
    assert reg.describe() == [("grad_x_weight", "Gradient times weight."), ("magnitude", "|w|")]
    from cwa.errors import CwaError

    assert reg.get("magnitude") is CwaError  # lazy placeholder resolved on first use


def test_unknown_name_suggests_and_lists() -> None:
    reg: Registry = Registry("metric")
    reg.add("grad_x_weight", object())
    reg.add("grad_squared", object())
    with pytest.raises(UnknownName) as info:
        reg.get("grad_x_wieght")
    message = str(info.value)
    assert "unknown metric 'grad_x_wieght'" in message
    assert "did you mean 'grad_x_weight'" in message
    assert "available: grad_squared, grad_x_weight" in message


def test_duplicate_registration_is_an_error() -> None:
    reg: Registry = Registry("task")
    reg.add("a", 1)
    with pytest.raises(InvalidInput, match="already registered"):
        reg.add("a", 2)


def test_plugin_spec_and_isolation() -> None:
    reg: Registry = Registry("metric")
    with reg.isolated():
        name = reg.canonical("cwa.registry:import_object")
        assert name == "import_object" and "import_object" in reg
    assert "import_object" not in reg
    with pytest.raises(InvalidInput, match="cannot import plugin module"):
        reg.load_plugin("no_such_module_xyz:thing")
    with pytest.raises(InvalidInput, match="has no attribute"):
        reg.load_plugin("cwa.errors:Nope")
