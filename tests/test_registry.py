import dataclasses
import importlib.metadata as md
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.plugins import register_attack
from benchmark.plugins.builtin import (
    ATTACKS,
    BUILTIN_MODULES,
    DATASETS,
    DEFENSES,
    THREAT_MODELS,
    TRAINERS,
)
from benchmark.plugins.registry import (
    Definition,
    PluginLoadError,
    Registry,
    UnknownNameError,
    import_ref,
)
from benchmark.plugins.suggest import did_you_mean


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


# -- registration at the definition, and where it is recorded ----------------------------------
ROOT = Path(__file__).resolve().parent.parent
HERE = "tests/test_registry.py"
WIDGETS: Registry[object] = Registry("widget")


@WIDGETS.register("gadget")
class Gadget:
    pass


@WIDGETS.register("frozen")
@dataclasses.dataclass(frozen=True)
class Frozen:
    x: int = 0


@WIDGETS.register("make")
def make_gadget() -> Gadget:
    return Gadget()


def _line_of(text: str) -> int:
    """The 1-based line of this file that starts with ``text``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(text))


def test_decorator_registration_records_the_definition_site():
    assert WIDGETS.get("gadget") is Gadget and WIDGETS.get("make") is make_gadget
    assert WIDGETS.definition("gadget") == Definition(
        "tests.test_registry:Gadget", HERE, _line_of("class Gadget:"))
    # the class/def line, below every decorator
    assert WIDGETS.definition("frozen") == Definition(
        "tests.test_registry:Frozen", HERE, _line_of("class Frozen:"))
    assert WIDGETS.definition("make") == Definition(
        "tests.test_registry:make_gadget", HERE, _line_of("def make_gadget("))
    assert WIDGETS.definition("make").location == f"{HERE}:{_line_of('def make_gadget(')}"


def test_definition_of_entries_registered_elsewhere_or_broken():
    reg: Registry[object] = Registry("widget")
    reg.register("thing")(Thing)  # registered away from its definition: found by inspect
    reg.add("lazy", "tests.test_registry:Thing")
    reg.add("broken", "tests.test_registry:Missing")
    for name in ("thing", "lazy"):
        assert reg.definition(name) == Definition(
            "tests.test_registry:Thing", HERE, _line_of("class Thing:"))
    broken = reg.definition("broken")  # listed, not raised: get() says why it fails
    assert broken == Definition("tests.test_registry:Missing") and broken.location == "-"
    with pytest.raises(UnknownNameError, match="unknown widget 'thnig'; did you mean 'thing'"):
        reg.definition("thnig")


def test_registering_the_same_definition_again_is_harmless():
    reg: Registry[object] = Registry("widget")
    reg.add("x", Thing)
    reg.add("x", Thing)
    again = type("Thing", (), {"__module__": Thing.__module__})  # its module imported again
    reg.add("x", again)
    assert reg.get("x") is again
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", Gadget)


def test_a_broken_builtin_module_is_a_warning_not_a_crash():
    reg: Registry[object] = Registry("widget", modules=["tests.no_such_plugin_module"])
    with pytest.warns(UserWarning, match="'tests.no_such_plugin_module' failed to import"):
        assert reg.names() == []
    with pytest.raises(UnknownNameError, match="built-in module 'tests.no_such_plugin_module' "
                                               "failed to import"):
        reg.get("anything")


def test_builtin_plugin_modules_are_imported_on_first_lookup_only():
    code = (
        "import sys\n"
        "import benchmark.plugins, benchmark.plugins.builtin as b\n"
        "mods = [m for ms in b.BUILTIN_MODULES.values() for m in ms]\n"
        "print(sorted(m for m in mods if m in sys.modules))\n"
        "b.ATTACKS.names()\n"
        "print(sorted(m for m in b.BUILTIN_MODULES['attack'] if m not in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    before, missing_after = res.stdout.splitlines()
    assert before == "[]", f"imported by `import benchmark.plugins.builtin` alone: {before}"
    assert missing_after == "[]", f"not imported by ATTACKS.names(): {missing_after}"


def test_genbench_list_attacks_points_at_the_class_definition(capsys):
    from benchmark.cli import main

    assert main(["list", "attacks"]) == 0
    rows = {line.split("\t")[0]: line.split("\t")
            for line in capsys.readouterr().out.splitlines()}
    name, ref, location, prov = rows["pgd"]
    assert ref == "attacks.pgd:PGD" and prov.startswith("genbench==")
    file, _, line = location.rpartition(":")
    assert file == "attacks/pgd.py"
    assert (ROOT / file).read_text().splitlines()[int(line) - 1].startswith("class PGD(")
    import attacks.pgd

    assert int(line) == inspect.getsourcelines(attacks.pgd.PGD)[1] + 1  # below its decorator
    assert all(len(fields) == 4 for fields in rows.values()), rows


#: the built-in plug-ins by registry name and the object each name resolved to before plug-ins
#: registered at their definition: the registries' public contract (job keys, stored results)
PREVIOUS = {
    "threat model": (THREAT_MODELS, {
        "linf": "threat_models.linf:LinfThreat",
        "l2": "threat_models.l2:L2Threat",
        "stadv": "threat_models.stadv:StAdvThreat",
        "unrestricted": "threat_models.unrestricted:UnrestrictedThreat",
    }),
    "attack": (ATTACKS, {
        "pgd": "attacks.pgd:PGD",
        "eot": "attacks.eot:EOT",
        "bpda": "attacks.bpda:BPDA",
        "stadv": "attacks.stadv:StAdv",
        "autoattack": "attacks.autoattack:AutoAttack",
        "torchattacks": "attacks.torchattacks_adapter:TorchAttacks",
        "exact": "attacks.exact:Exact",
        "lagrange": "attacks.lagrange:Lagrange",
        "ll-near-sample": "attacks.likelihood:NearSampleAttack",
        "ll-random-region": "attacks.likelihood:RandomRegionAttack",
        "ll-high-complexity": "attacks.likelihood:HighComplexityAttack",
        "ll-reverse": "attacks.likelihood:ReverseIntegrationAttack",
        "ll-prior-only": "attacks.likelihood:PriorOnlyAttack",
        "ll-unrestricted": "attacks.likelihood:UnrestrictedLikelihoodAttack",
        "flow-pgd-in": "attacks.flow_pgd:FlowPGDIn",
        "flow-pgd-ood": "attacks.flow_pgd:FlowPGDOOD",
        "pgd-eot": "attacks.pgd_eot:PGDEOT",
        "fixed-noise": "attacks.fixed_noise:FixedNoise",
        "scoreag-gat": "attacks.scoreag_gat:ScoreAGGAT",
    }),
    "defense": (DEFENSES, {
        "undefended": "defenses.baseline:Undefended",
        "dc": "defenses.rdc:DiffusionClassifier",
        "rdc": "defenses.rdc:RobustDiffusionClassifier",
        "dc-optimal": "defenses.rdc:OptimalDiffusionClassifier",
        "diffpure": "defenses.diffpure:DiffPure",
        "scoreag-gap": "defenses.scoreag:ScoreAGPurification",
        "flow": "defenses.flow:FlowDensity",
        "pfode": "defenses.pfode:PFODEDensity",
    }),
    "dataset": (DATASETS, {
        "digits": "benchmark.data.digits:load_digits",
        "cifar10": "benchmark.data.cifar10:load_cifar10",
    }),
    "trainable model": (TRAINERS, {
        "classifier": "benchmark.train.classifier:train",
        "cnn-at": "benchmark.train.classifier:train_adversarial",
        "eps": "benchmark.train.denoiser:train",
        "realnvp": "benchmark.train.flow:train_realnvp",
        "glow": "benchmark.train.flow:train_glow",
    }),
}


def test_previous_counts_are_the_contract():
    assert {kind: len(names) for kind, (_, names) in PREVIOUS.items()} == {
        "threat model": 4, "attack": 19, "defense": 8, "dataset": 2, "trainable model": 5}
    assert set(PREVIOUS) == set(BUILTIN_MODULES)


@pytest.mark.parametrize("kind", sorted(PREVIOUS))
def test_every_previous_name_resolves_to_the_same_object(kind):
    reg, previous = PREVIOUS[kind]
    assert reg.kind == kind
    builtin = {n for n in reg.names() if "/" not in n and ":" not in n}  # not third-party
    assert set(previous) <= builtin, f"{kind} names lost: {set(previous) - builtin}"
    for name, ref in previous.items():
        assert reg.get(name) is import_ref(ref), name
        assert reg.definition(name).ref == ref, name  # each is registered where defined
        assert reg.definition(name).file == ref.partition(":")[0].replace(".", "/") + ".py"
        assert reg.provenance(name).dist == "genbench"


def test_register_aliases_are_the_registries_decorators():
    reg_before = set(ATTACKS.names())
    assert "pgd" in reg_before
    import attacks.pgd

    assert ATTACKS.get("pgd") is attacks.pgd.PGD
    assert register_attack == ATTACKS.register  # the same bound method


def test_did_you_mean():
    assert did_you_mean("pgdd", ["pgd", "eot", "stadv"]) == "; did you mean 'pgd'?"
    assert did_you_mean("ll-revers", ATTACKS.names()).startswith("; did you mean 'll-reverse'")
    assert did_you_mean("ll-revers", ATTACKS.names(), n=1) == "; did you mean 'll-reverse'?"
    assert did_you_mean("l", ["l2", "l1", "linf"], n=2) == "; did you mean 'l2' or 'l1'?"
    assert did_you_mean("zzz", ["pgd", "eot"]) == ""
    assert did_you_mean("zzz", []) == ""
    assert did_you_mean(3, ["3d"], cutoff=0.6) == "; did you mean '3d'?"  # any object
    assert did_you_mean("digits-tset", ["digits-test"],
                        show=lambda h: h.removeprefix("digits-")) == "; did you mean 'test'?"
