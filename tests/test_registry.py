import pytest

from hetpure_bench.errors import UnknownNameError
from hetpure_bench.registry import Registry


def test_build_and_metadata():
    reg = Registry("widget")
    reg.register("square", lambda side=2: side * side, available=lambda: False, sides=4)
    assert reg.build("square", side=3) == 9
    entry = reg.get("square")
    assert entry.info == {"sides": 4} and entry.available() is False
    assert "square" in reg and reg.names() == ["square"]


def test_unknown_name_suggests_the_closest():
    reg = Registry("defense")
    for name in ("hetpure", "diffpure", "gdmp"):
        reg.register(name, object)
    with pytest.raises(UnknownNameError, match=r"unknown defense 'hetpur'; did you mean 'hetpure'\?"):
        reg.get("hetpur")
    with pytest.raises(UnknownNameError, match="known: diffpure, gdmp, hetpure"):
        reg.get("zzzzzz")


def test_duplicate_registration_is_refused():
    reg = Registry("widget")
    reg.register("a", object)
    with pytest.raises(ValueError):
        reg.register("a", object)
