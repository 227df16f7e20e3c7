import importlib.metadata as md

import pytest

from benchmark.plugins.registry import PluginLoadError, Registry, UnknownNameError, import_ref


class Thing:
    pass


def test_decorator_lazy_and_direct_references():
    reg: Registry[type] = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        pass

    reg.add("beta", "tests.test_registry:Thing")
    assert reg.get("alpha") is Alpha
    assert reg.get("beta") is Thing  # imported on first use
    assert reg.get("tests.test_registry:Thing") is Thing  # never registered, named directly
    assert reg.names() == ["alpha", "beta", "tests.test_registry:Thing"]
    assert reg.provenance("alpha").dist == "genbench" or reg.provenance("alpha").dist == "tests"


def test_unknown_name_suggests_close_matches():
    reg: Registry[object] = Registry("widget")
    reg.add("undefended", object())
    with pytest.raises(UnknownNameError, match="unknown widget 'undefnded'; did you mean "
                                               "'undefended'"):
        reg.get("undefnded")


def test_duplicate_registration_refused():
    reg: Registry[object] = Registry("widget")
    reg.add("a", "x:y")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", "x:z")


def test_bad_references_name_the_missing_part():
    with pytest.raises(PluginLoadError, match="no attribute 'Nope'"):
        import_ref("tests.test_registry:Nope")
    with pytest.raises(PluginLoadError, match="cannot import module 'no_such_pkg.mod'"):
        import_ref("no_such_pkg.mod:X")
    reg: Registry[object] = Registry("widget")
    reg.add("broken", "tests.test_registry:Missing")
    with pytest.raises(PluginLoadError, match="widget 'broken' failed to load"):
        reg.get("broken")


class _Dist:
    version = "1.2.3"
    metadata = {"Name": "thirdparty"}


class _EP:
    name = "fancy"
    value = "tests.test_registry:Thing"
    dist = _Dist()


def test_entry_point_plugins_are_namespaced_and_can_be_disabled(monkeypatch):
    monkeypatch.setattr(md, "entry_points", lambda group: [_EP()] if group == "g" else [])
    reg: Registry[type] = Registry("widget", entry_point_group="g")
    assert reg.get("thirdparty/fancy") is Thing
    assert str(reg.provenance("thirdparty/fancy")) == "thirdparty==1.2.3"

    monkeypatch.setenv("GENBENCH_NO_PLUGINS", "1")
    off: Registry[type] = Registry("widget", entry_point_group="g")
    assert "thirdparty/fancy" not in off.names()
