"""The per-sample result store: one SQLite database (WAL) per run folder.

Only the driver writes it. A job's result (its row and all its per-sample rows) is written in
one transaction, keyed by the job's hash and the sample id, so a run killed at any point
resumes where it stopped and never counts a sample twice. Leaderboards are derived from it.

Jobs on density defenses also write one ``density`` row per sample (log p, bits/dim and PNG
complexity before and after the attack, and the subsampled attack curve; see
:class:`benchmark.spec.jobs.DensityOutcome`), in the same transaction. The table is created with
``IF NOT EXISTS``, so stores written before it existed open (and resume) unchanged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.spec.jobs import JobResult, JobSpec

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    defense TEXT NOT NULL,
    attack TEXT NOT NULL,
    threat TEXT,
    eps REAL,
    status TEXT NOT NULL,
    error TEXT,
    k INTEGER NOT NULL,
    stochastic INTEGER NOT NULL,
    wall_s REAL NOT NULL,
    grad_evals INTEGER NOT NULL,
    nfe_per_pred REAL,
    budget TEXT NOT NULL,
    plugin_versions TEXT NOT NULL,
    code_version TEXT NOT NULL,
    extras TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    job TEXT NOT NULL REFERENCES jobs(key),
    sample_id INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    distance REAL,
    error TEXT,
    x_adv BLOB,
    PRIMARY KEY (job, sample_id)
);
CREATE TABLE IF NOT EXISTS density (
    job TEXT NOT NULL REFERENCES jobs(key),
    sample_id INTEGER NOT NULL,
    logp_before REAL,
    bpd_before REAL,
    complexity_before REAL,
    logp_after REAL,
    bpd_after REAL,
    complexity_after REAL,
    curve TEXT,
    PRIMARY KEY (job, sample_id)
);
"""

#: columns of the density table after (job, sample_id), in order.
DENSITY_FIELDS = ("logp_before", "bpd_before", "complexity_before", "logp_after", "bpd_after",
                  "complexity_after", "curve")


class StoreError(RuntimeError):
    pass


def _real(value: float) -> float | None:
    """SQLite has no NaN or infinity that survives a round trip: store them as NULL."""
    v = float(value)
    return v if np.isfinite(v) else None


class Store:
    """A run's SQLite store. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a genbench run store: {exc}") from exc
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, expected "
                             f"{SCHEMA_VERSION}; use a new --out folder")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.conn:  # commits, or rolls back on exception
            yield self.conn

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- jobs ------------------------------------------------------------------------------
    def finished_keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM jobs")}

    def write(self, job: JobSpec, result: JobResult, code_version: str) -> None:
        """Write one job's result atomically (replacing an earlier result of the same job)."""
        if result.key != job.key:
            raise StoreError(f"result for job {result.key[:12]} does not match {job.key[:12]}")
        advs: Iterable[bytes | None]
        if result.x_adv is not None:
            advs = [np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in result.x_adv]
        else:
            advs = [None] * len(result.outcomes)
        with self._tx() as c:
            c.execute("DELETE FROM samples WHERE job=?", (job.key,))
            c.execute("DELETE FROM density WHERE job=?", (job.key,))
            c.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.key, json.dumps(job.to_json(), sort_keys=True), job.defense.id,
                 job.attack_id, job.threat, job.eps, result.status, result.error, result.k,
                 int(result.stochastic), result.wall_s, result.grad_evals, result.nfe_per_pred,
                 json.dumps(result.budget, sort_keys=True),
                 json.dumps(result.plugin_versions, sort_keys=True), code_version,
                 json.dumps(result.extras, sort_keys=True, default=str), time.time()))
            c.executemany(
                "INSERT INTO samples VALUES (?,?,?,?,?,?)",
                [(job.key, o.sample_id, o.correct, o.distance, o.error, adv)
                 for o, adv in zip(result.outcomes, advs, strict=True)])
            if result.density:
                c.executemany(
                    "INSERT INTO density VALUES (?,?,?,?,?,?,?,?,?)",
                    [(job.key, d.sample_id, _real(d.logp_before), _real(d.bpd_before),
                      _real(d.complexity_before), _real(d.logp_after), _real(d.bpd_after),
                      _real(d.complexity_after),
                      None if d.curve is None else json.dumps([_real(v) for v in d.curve]))
                     for d in result.density])

    def jobs(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM jobs")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur]
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["key"] in wanted]
        for r in rows:
            for field in ("budget", "plugin_versions", "extras", "spec"):
                r[field] = json.loads(r[field])
        return rows

    def jobs_of(self, specs: Iterable[JobSpec]) -> list[dict[str, Any]]:
        """The stored rows of ``specs`` (a plan's jobs), one per spec in order (missing ones
        absent), labelled by the spec: ``defense``, ``attack`` and ``spec`` are the spec's, not
        the stored ones. Job keys hold no display label, so a suite whose ids were renamed, or
        two entries that differ only by id, read their stored results under today's labels."""
        specs = list(specs)
        stored = {r["key"]: r for r in self.jobs({s.key for s in specs})}
        out = []
        for spec in specs:
            row = stored.get(spec.key)
            if row is not None:
                out.append({**row, "defense": spec.defense.id, "attack": spec.attack_id,
                            "spec": spec.to_json()})
        return out

    def relabel(self, specs: Iterable[JobSpec]) -> int:
        """Store today's display labels (ids, suite name) with the finished jobs of ``specs``
        (the first spec of each key); the results are untouched. Returns how many changed."""
        first: dict[str, JobSpec] = {}
        for spec in specs:
            first.setdefault(spec.key, spec)
        rows = [(json.dumps(j.to_json(), sort_keys=True), j.defense.id, j.attack_id, key)
                for key, j in first.items()]
        with self._tx() as c:
            before = c.total_changes
            c.executemany("UPDATE jobs SET spec=?1, defense=?2, attack=?3 WHERE key=?4 AND "
                          "(spec IS NOT ?1 OR defense IS NOT ?2 OR attack IS NOT ?3)", rows)
            return c.total_changes - before

    def samples(self, keys: Iterable[str]) -> dict[str, list[tuple[int, int, float, str | None]]]:
        out: dict[str, list[tuple[int, int, float, str | None]]] = {}
        for key in keys:
            out[key] = [tuple(r) for r in self.conn.execute(
                "SELECT sample_id, correct, distance, error FROM samples WHERE job=? "
                "ORDER BY sample_id", (key,))]
        return out

    def density(self, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Per-sample density rows of the given jobs (ordered by sample id; missing numbers
        are NaN; ``curve`` is a float array or None). Jobs without rows are absent."""
        out: dict[str, list[dict[str, Any]]] = {}
        for key in keys:
            rows = []
            for r in self.conn.execute(
                    "SELECT sample_id, " + ", ".join(DENSITY_FIELDS)
                    + " FROM density WHERE job=? ORDER BY sample_id", (key,)):
                row: dict[str, Any] = {"sample_id": int(r[0])}
                for name, value in zip(DENSITY_FIELDS[:-1], r[1:-1], strict=True):
                    row[name] = float("nan") if value is None else float(value)
                row["curve"] = (None if r[-1] is None else
                                np.array([np.nan if v is None else v for v in json.loads(r[-1])],
                                         dtype=np.float64))
                rows.append(row)
            if rows:
                out[key] = rows
        return out

    def adversarial(self, key: str, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
        return {int(sid): np.frombuffer(blob, dtype=np.float32).reshape(shape)
                for sid, blob in self.conn.execute(
                    "SELECT sample_id, x_adv FROM samples WHERE job=? AND x_adv IS NOT NULL",
                    (key,))}

    def count_samples(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
