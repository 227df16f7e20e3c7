import sqlite3

import numpy as np
import pytest

from benchmark.spec.jobs import JobResult, JobSpec, SampleOutcome
from benchmark.spec.suite import NO_PARAMS, PluginSpec, freeze
from benchmark.store import Store, StoreError


def job(ids=(1, 2, 3)) -> JobSpec:
    return JobSpec(suite="s", dataset="digits", dataset_params=NO_PARAMS, subset_id="x",
                   subset_hash="h",
                   defense=PluginSpec("d", "undefended"), defense_params=NO_PARAMS,
                   attack=PluginSpec("a", "pgd", freeze({"steps": 3})), threat="linf", eps=0.1,
                   sample_ids=tuple(ids), seed=0, k_draws=1, batch_size=10)


def result(j: JobSpec, correct=1) -> JobResult:
    return JobResult(key=j.key, status="done", k=1, wall_s=0.1,
                     outcomes=[SampleOutcome(i, correct) for i in j.sample_ids],
                     x_adv=np.zeros((len(j.sample_ids), 1, 2, 2), dtype=np.float32))


def test_job_key_is_stable_and_budget_sensitive():
    assert job().key == job().key
    other = JobSpec(**{**job().__dict__, "attack": PluginSpec("a", "pgd", freeze({"steps": 4}))})
    assert other.key != job().key
    assert job().run_seed == job().run_seed


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
