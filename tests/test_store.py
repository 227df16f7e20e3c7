import sqlite3

import numpy as np
import pytest

from benchmark.spec.jobs import JobResult, JobSpec, SampleOutcome
from benchmark.spec.suite import NO_PARAMS, PluginSpec, freeze
from benchmark.store import Store, StoreError

#: what a plan resolves for pgd on the undefended CNN (benchmark.spec.fingerprint.resolve)
RESOLVED = {
    "defense": {"version": "genbench==0.1.0", "defaults": {}},
    "attack": {"version": "genbench==0.1.0",
               "config": {"eot_draws": 1, "loss": "ce", "random_start": True, "restarts": 1,
                          "step_size": None, "steps": 3},
               "budget": {"steps": 3, "restarts": 1, "eot_draws": 1}},
    "threat_model": {"version": "genbench==0.1.0"},
    "weights": {"digits-cnn": "160f823d9526170770d0b95480ece38492e26304f21d9b5461c1daa254596624"},
}


def job(ids=(1, 2, 3), **changes) -> JobSpec:
    fields = dict(suite="s", dataset="digits", dataset_params=NO_PARAMS, subset_id="x",
                  subset_hash="h", defense=PluginSpec("d", "undefended",
                                                      freeze({"model": "digits-cnn"})),
                  defense_params=freeze({"model": "digits-cnn"}),
                  attack=PluginSpec("a", "pgd", freeze({"steps": 3})), threat="linf", eps=0.1,
                  sample_ids=tuple(ids), seed=0, k_draws=1, batch_size=10,
                  resolved=freeze(RESOLVED))
    return JobSpec(**{**fields, **changes})


def result(j: JobSpec, correct=1) -> JobResult:
    return JobResult(key=j.key, status="done", k=1, wall_s=0.1,
                     outcomes=[SampleOutcome(i, correct) for i in j.sample_ids],
                     x_adv=np.zeros((len(j.sample_ids), 1, 2, 2), dtype=np.float32))


def test_job_key_is_stable_and_budget_sensitive():
    assert job().key == job().key
    other = job(attack=PluginSpec("a", "pgd", freeze({"steps": 4})))
    assert other.key != job().key
    assert job().run_seed == job().run_seed


def test_job_key_fixed_digest():
    """The key of a fixed job, hard-coded: a change to what the key hashes (or how) must be
    deliberate, and makes every stored run recompute (bump KEY_VERSION, regenerate the
    reference run in results/reference/)."""
    assert job().key == "11a64d293a2244c249dd8c59c1f81febb5c9d538a4b7f02bb771756b7421beef"


def _resolved(**changes):
    import copy

    r = copy.deepcopy(RESOLVED)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = r
        for part in parents:
            target = target[part]
        target[leaf] = value
    return freeze(r)


def test_job_key_ignores_display_labels():
    base = job().key
    assert job(suite="renamed").key == base
    assert job(defense=PluginSpec("cnn", "undefended", freeze({"model": "digits-cnn"}))).key \
        == base
    assert job(attack=PluginSpec("pgd-renamed", "pgd", freeze({"steps": 3}))).key == base
    assert job(subset_id="renamed-v1").key == base  # the ids and their hash are the content
    assert job(suite="x", defense=PluginSpec("y", "undefended", freeze({"model": "digits-cnn"})),
               attack=PluginSpec("z", "pgd", freeze({"steps": 3}))).run_seed == job().run_seed


@pytest.mark.parametrize("changes", [
    {"weights__digits-cnn": "0" * 64},  # retrained weights
    {"defense__version": "genbench==0.2.0"},  # a new plug-in version
    {"attack__version": "third-party==1.1"},
    {"threat_model__version": "genbench==0.2.0"},
    {"attack__config__steps": 4},  # a resolved default of the attack
    {"attack__budget__eot_draws": 2},
    {"defense__defaults": {"width": 64}},  # a default of the defense's factory
])
def test_job_key_changes_with_what_the_plan_resolves(changes):
    assert job(resolved=_resolved(**changes)).key != job().key


def test_job_key_changes_with_what_determines_the_result():
    base = job().key
    for changes in [dict(sample_ids=(1, 2, 4)), dict(seed=1), dict(k_draws=2),
                    dict(batch_size=5), dict(shard=1), dict(eps=0.2), dict(threat="l2"),
                    dict(dataset="cifar10"), dict(subset_hash="h2"),
                    dict(dataset_params=freeze({"size": 8})),
                    dict(defense_params=freeze({"model": "digits-cnn-at"})),
                    dict(attack=PluginSpec("a", "pgd", freeze({"steps": 3.0}))),
                    dict(attack=PluginSpec("a", "eot", freeze({"steps": 3}))),
                    dict(attack=None, threat=None, eps=None)]:
        assert job(**changes).key != base, changes


def test_stored_spec_keeps_the_labels_and_the_resolved_data():
    spec = job().to_json()
    assert spec["defense"]["id"] == "d" and spec["attack"]["id"] == "a" and spec["suite"] == "s"
    assert spec["resolved"] == RESOLVED


def test_rewriting_a_job_never_double_counts(tmp_path):
    j = job()
    with Store(tmp_path / "r.sqlite") as store:
        store.write(j, result(j, 1), "v")
        store.write(j, result(j, 0), "v")  # e.g. --retry-errors
        assert store.count_samples() == 3
        assert {c for _, c, _, _ in store.samples([j.key])[j.key]} == {0}
        assert store.finished_keys() == {j.key}
        advs = store.adversarial(j.key, (1, 2, 2))
        assert set(advs) == {1, 2, 3}


def test_a_failed_write_leaves_nothing_half_written(tmp_path):
    j = job()
    bad = result(j)
    bad.outcomes.append(SampleOutcome(1, 1))  # duplicate sample id -> integrity error
    bad.x_adv = np.zeros((4, 1, 2, 2), dtype=np.float32)
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.write(j, bad, "v")
        assert store.finished_keys() == set() and store.count_samples() == 0


def test_not_a_store(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a genbench run store"):
        Store(path)
