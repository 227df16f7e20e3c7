import pytest

from benchmark.spec.suite import SuiteError, load_suite, parse_suite, shipped_suites

GOOD = """
[suite]
name = "t"
dataset = "digits"
subset = "test100-v1"

[[defenses]]
name = "undefended"

[[attacks]]
name = "pgd"
params = { steps = 3 }

[[threat_models]]
name = "linf"
eps = [0.1, 0.2]
"""


def test_good_suite_parses_with_defaults():
    s = parse_suite(GOOD, "good.toml")
    assert s.k_draws == 10 and s.seed == 0
    assert s.threat_models[0].eps == (0.1, 0.2)
    assert s.attacks[0].kwargs() == {"steps": 3}
    assert s.defenses[0].id == "undefended"


def test_shipped_suites_parse():
    names = shipped_suites()
    assert {"quick", "digits", "digits-dc", "cifar10"} <= set(names)
    for name in names:
        assert load_suite(name).name == name


def test_digits_dc_suite_plans_every_paper_attack_on_rdc():
    """The DC-family suite builds its plug-ins and pairs RDC with every attack of the paper."""
    from benchmark.spec.plan import plan_suite

    plan = plan_suite(load_suite("digits-dc"), limit=4)
    pairs = {(j.defense.id, j.attack.id if j.attack else "clean", j.threat) for j in plan.jobs}
    for attack in ("pgd-eot", "bpda", "exact", "lagrange", "apgd-dlr"):
        assert ("rdc-v1", attack, "linf") in pairs and ("rdc-t1", attack, "l2") in pairs
    assert ("rdc-v1", "stadv", "stadv") in pairs and ("dc", "lagrange", "linf") in pairs
    assert not any(d == "dc" and a in ("bpda", "exact") for d, a, _ in pairs)


def test_malformed_toml_names_file_and_line():
    with pytest.raises(SuiteError, match=r"bad\.toml: malformed TOML.*line 3"):
        parse_suite('[suite]\nname = "x"\nseed = = 1\n', "bad.toml")


@pytest.mark.parametrize(
    ("eps", "match"),
    [("-0.1", r"eps.*-0\.1"), ('"0.1"', r"real number.*'0\.1'"), ("0", "> 0"),
     ("nan", "finite"), ("true", "real number")],
)
def test_bad_epsilon_names_value_key_and_line(eps, match):
    text = GOOD.replace("eps = [0.1, 0.2]", f"eps = [{eps}]")
    with pytest.raises(SuiteError, match=match) as info:
        parse_suite(text, "s.toml")
    assert "threat_models[0].eps" in str(info.value)
    assert "line 16" in str(info.value)


def test_unknown_key_suggests():
    with pytest.raises(SuiteError, match="did you mean 'k_draws'"):
        parse_suite(GOOD.replace('subset = "test100-v1"', 'subset = "test100-v1"\nk_drawz = 3'),
                    "s.toml")


def test_duplicate_ids_and_missing_sections():
    dup = GOOD + '\n[[attacks]]\nname = "pgd"\n'
    with pytest.raises(SuiteError, match="duplicate id 'pgd'"):
        parse_suite(dup, "s.toml")
    with pytest.raises(SuiteError, match=r"\[\[threat_models\]\]"):
        parse_suite(GOOD.split("[[threat_models]]")[0], "s.toml")
    with pytest.raises(SuiteError, match="must be >= 1"):
        parse_suite(GOOD.replace('subset = "test100-v1"', 'subset = "x"\nk_draws = 0'), "s.toml")


def test_unknown_suite_name_suggests():
    with pytest.raises(SuiteError, match="did you mean 'quick'"):
        load_suite("quik")
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite("nowhere/suite.toml")


def test_error_line_points_at_the_right_table():
    text = GOOD + '\n[[threat_models]]\nname = "l2"\neps = [-1]\n'
    with pytest.raises(SuiteError, match=r"line 20: key 'threat_models\[1\]\.eps'"):
        parse_suite(text, "s.toml")


def test_ray_resources_parsed_and_validated() -> None:
    base = '[suite]\nname = "s"\ndataset = "digits"\nsubset = "test100-v1"\n{extra}\n' \
           '[[defenses]]\nname = "undefended"\n[[attacks]]\nname = "pgd"\n' \
           '[[threat_models]]\nname = "linf"\neps = [0.1]\n'
    suite = parse_suite(base.format(extra="num_cpus = 2\nnum_gpus = 0.25"), source="s.toml")
    assert (suite.num_cpus, suite.num_gpus) == (2.0, 0.25)
    default = parse_suite(base.format(extra=""), source="s.toml")
    assert (default.num_cpus, default.num_gpus) == (1.0, 0.0)
    with pytest.raises(SuiteError, match=r"suite.num_cpus.*must be > 0, got 0"):
        parse_suite(base.format(extra="num_cpus = 0"), source="s.toml")
    with pytest.raises(SuiteError, match=r"suite.num_gpus.*expected a number, got 'one'"):
        parse_suite(base.format(extra='num_gpus = "one"'), source="s.toml")


PAIRED = GOOD.replace('name = "undefended"\n', 'name = "undefended"\n\n[[defenses]]\nid = "at"\n'
                      'name = "undefended"\nparams = { model = "digits-cnn-at" }\n'
                      ).replace('params = { steps = 3 }\n', 'params = { steps = 3 }\n'
                                'defenses = ["at"]\neps = [0.2]\n')


def test_attack_pairing_and_eps_restrict_the_plan_with_reasons() -> None:
    from benchmark.spec.plan import plan_suite

    suite = parse_suite(PAIRED, "paired.toml")
    assert suite.attacks[0].paired_with == ("at",) and suite.attacks[0].eps == (0.2,)
    plan = plan_suite(suite, limit=2)
    attacked = {(j.defense.id, j.eps) for j in plan.jobs if not j.is_clean and not j.probe}
    assert attacked == {("at", 0.2)}
    # its probes run where the attack runs, and only there: unconstrained at l-inf 1, the
    # single-step probe in its cell
    assert {(j.defense.id, j.eps, j.probe) for j in plan.jobs if j.probe} == {
        ("at", 1.0, True), ("at", 0.2, "single-step")}
    reasons = {(s["defense"], s["eps"]): s["reason"] for s in plan.skipped}
    assert reasons[("at", 0.1)] == "suite restricts pgd to eps [0.2]"
    assert "restricts pgd to defenses ['at']" in reasons[("undefended", 0.2)]


@pytest.mark.parametrize("old,new,match", [
    ('defenses = ["at"]', 'defenses = ["tа"]', r"attacks\[0\].defenses.*not the id"),
    ('defenses = ["at"]', 'defenses = ["a"]', r"did you mean 'at'"),
    ('defenses = ["at"]', "defenses = []", "non-empty list of ids"),
    ("eps = [0.2]", "eps = [0.3]", r"0.3 is not an epsilon of its threat models"),
    ("eps = [0.2]", "eps = [-1]", r"attacks\[0\].eps"),
])
def test_bad_pairing_and_attack_eps_are_named(old: str, new: str, match: str) -> None:
    with pytest.raises(SuiteError, match=match):
        parse_suite(PAIRED.replace(old, new), "paired.toml")


def test_defense_limit_evaluates_that_defense_on_the_first_samples_only() -> None:
    from benchmark.spec.plan import plan_suite

    text = PAIRED.replace('params = { model = "digits-cnn-at" }\n',
                          'params = { model = "digits-cnn-at" }\nlimit = 3\n')
    suite = parse_suite(text.replace("[suite]\n", "[suite]\nshard_size = 2\n"), "limit.toml")
    assert suite.defenses[1].limit == 3 and suite.defenses[0].limit is None
    plan = plan_suite(suite, limit=5)
    ids = {}
    for j in plan.jobs:
        if not j.probe:
            ids.setdefault((j.defense.id, j.is_clean), []).extend(j.sample_ids)
    assert ids[("at", True)] == list(plan.sample_ids[:3]) == ids[("at", False)]
    assert ids[("undefended", True)] == list(plan.sample_ids)
    assert max(len(j.sample_ids) for j in plan.jobs if not j.probe) == 2  # shards: shard_size


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "true", '"all"'])
def test_bad_defense_limit_is_named(bad: str) -> None:
    text = GOOD.replace('name = "undefended"\n', f'name = "undefended"\nlimit = {bad}\n')
    with pytest.raises(SuiteError, match=r"defenses\[0\].limit.*integer >= 1"):
        parse_suite(text, "limit.toml")


#: every TOML value type a parameter can hold, including the shapes the tuple-based freeze lost
TOML_PARAMS = """
pairs = [["a", 1], ["b", 2]]
pair = ["a", 1]
opts = {}
empty_list = []
list_of_lists = [[1, 2], [], [3.0]]
list_of_tables = [{ a = 1 }, {}, { b = { c = [] } }]
nested = { inner = { deepest = { x = 1, y = 1.0 } }, blank = {} }
int = 1
float = 1.0
neg_zero = -0.0
big = 9223372036854775807
infinite = inf
minus_infinite = -inf
exp = 1e300
tiny = 5e-324
bool_true = true
bool_false = false
string = "héllo \\" quoted"
empty_string = ""
mixed = [1, 1.0, "1", true, [1], { one = 1 }]
"""


def _same(a, b) -> bool:
    """Equal with types: 1 and 1.0 and True are different values here."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a == 0:
        return str(a) == str(b)  # -0.0 stays -0.0
    return a == b


def test_freeze_thaw_round_trips_every_toml_value_type():
    import tomllib

    from benchmark.spec.suite import freeze, thaw

    value = tomllib.loads(TOML_PARAMS)
    frozen = freeze(value)
    hash(frozen)
    assert _same(thaw(frozen), value)
    assert freeze(thaw(frozen)) == frozen  # canonical: a fixed point
    # each value on its own, at top level too
    for v in [*value.values(), value]:
        assert _same(thaw(freeze(v)), v), v
    # the shapes the former tuple encoding confused
    assert thaw(freeze({"pairs": [["a", 1]]})) == {"pairs": [["a", 1]]}
    assert thaw(freeze({"opts": {}})) == {"opts": {}}
    assert thaw(freeze({"l": []})) == {"l": []}
    assert freeze({"x": 1}) != freeze({"x": 1.0}) != freeze({"x": True})
    assert freeze({"b": 1, "a": 2}) == freeze({"a": 2, "b": 1})  # key order is not content


def test_suite_params_arrive_with_their_toml_types():
    text = GOOD.replace("params = { steps = 3 }",
                        "params_by_threat = { linf = { extra = [[1, 2]], none = {} } }\n"
                        "[attacks.params]\n" + TOML_PARAMS.strip()) \
        .replace('subset = "test100-v1"',
                 'subset = "test100-v1"\ndataset_params = { a = { b = {} }, c = [[]] }')
    import tomllib

    from benchmark.spec.suite import thaw

    s = parse_suite(text, "types.toml")
    want = tomllib.loads(TOML_PARAMS)
    assert _same(s.attacks[0].kwargs(), want)
    assert _same(s.attacks[0].to_json()["params"], want)
    got = s.attacks[0].kwargs("linf")
    assert _same(got["extra"], [[1, 2]]) and _same(got["none"], {})
    assert _same(thaw(s.dataset_params), {"a": {"b": {}}, "c": [[]]})
    assert _same(s.defenses[0].kwargs(), {})


def test_dates_in_params_are_a_clear_error():
    bad = GOOD.replace("params = { steps = 3 }", "params = { when = 1979-05-27 }")
    with pytest.raises(SuiteError, match=r"attacks\[0\]\.params.*dates and times"):
        parse_suite(bad, "date.toml")


KEYED = """
[suite]
name = "keyed"
dataset = "digits"
subset = "test100-v1"
shard_size = 2

[[defenses]]
name = "undefended"
id = "cnn"

[[attacks]]
name = "pgd"
id = "pgd-ce"
params = { steps = 2 }
defenses = ["cnn"]

[[threat_models]]
name = "linf"
eps = [0.1]
"""


def _keys(text: str) -> list[str]:
    from benchmark.spec.plan import plan_suite

    return [j.key for j in plan_suite(parse_suite(text, "keyed.toml"), limit=4).jobs
            if not j.probe]


def test_renaming_ids_or_the_suite_keeps_the_job_keys():
    base = _keys(KEYED)
    assert len(base) == 4 and len(set(base)) == 4  # 2 shards x (clean, pgd)
    renamed = (KEYED.replace('name = "keyed"', 'name = "renamed"')
               .replace('id = "cnn"', 'id = "the-cnn"').replace('["cnn"]', '["the-cnn"]')
               .replace('id = "pgd-ce"', 'id = "pgd-2"'))
    assert _keys(renamed) == base


def test_job_keys_change_with_weights_versions_and_resolved_defaults(monkeypatch):
    import attacks.pgd
    import defenses.baseline
    from benchmark.plugins.builtin import ATTACKS, DEFENSES
    from benchmark.plugins.registry import Provenance
    from benchmark.spec import fingerprint

    base = _keys(KEYED)
    clean, attacked = set(base[:2]), set(base[2:])
    # a retrained model: the manifest's sha256 of the weights the defense's default names
    real = fingerprint.zoo_hashes()
    with monkeypatch.context() as m:
        m.setattr(fingerprint, "zoo_hashes", lambda: {**real, "digits-cnn": "0" * 64})
        assert set(_keys(KEYED)).isdisjoint(base)
    # a new version of the attack plug-in: its jobs change, the clean ones do not
    with monkeypatch.context() as m:
        m.setattr(ATTACKS, "provenance", lambda name: Provenance("genbench", "9.9"))
        keys = set(_keys(KEYED))
        assert clean <= keys and keys.isdisjoint(attacked)
    with monkeypatch.context() as m:
        m.setattr(DEFENSES, "provenance", lambda name: Provenance("genbench", "9.9"))
        assert set(_keys(KEYED)).isdisjoint(base)
    # a new default of the attack, which the suite does not set (PGD's random_start)
    with monkeypatch.context() as m:
        m.setitem(attacks.pgd.PGD.__init__.__kwdefaults__, "random_start", False)
        keys = set(_keys(KEYED))
        assert clean <= keys and keys.isdisjoint(attacked)
    # a new default of the defense (another zoo model): new defaults and new weights
    with monkeypatch.context() as m:
        m.setitem(defenses.baseline.Undefended.__init__.__kwdefaults__, "model", "digits-cnn-at")
        assert set(_keys(KEYED)).isdisjoint(base)
    assert _keys(KEYED) == base
