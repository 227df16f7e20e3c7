"""The ``ray`` executor (optional extra ``genbench[ray]``): one Ray task per job.

Each job runs :func:`benchmark.run.runner.execute` in a Ray worker (``num_cpus`` / ``num_gpus`` per
task, fractional GPUs allowed), results come back to the driver in completion order, and the
driver alone writes the store. A task whose worker dies is retried ``max_retries`` times; a job
that still fails becomes an error result, so the run goes on and ``--retry-errors`` picks it up.

With a suite's ``job_timeout_s``, at most as many tasks as the cluster has room for (its CPUs /
``num_cpus``, and GPUs / ``num_gpus``) are in flight, so that a task's clock starts when it is
submitted; a task over time is cancelled (``ray.cancel(force=True)`` kills its worker) and
becomes the error result "timed out after N s". The time includes the worker's start-up and any
retries after a lost worker.

``address`` connects to an existing cluster (``ray.init(address=...)``); nothing answering there
is a clear error within ``connect_timeout`` seconds, never a hang. Without ``address`` a local
cluster with ``workers`` CPUs is started for the run and shut down after it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from benchmark.plugins.cache import DefenseCache
from benchmark.run.executors import check_timeout, error_result, timeout_message
from benchmark.run.runner import execute
from benchmark.spec.jobs import JobResult, JobSpec

# A Ray worker process's own defenses (built on its first job, reused by the next ones).
_WORKER_CACHE: DefenseCache | None = None


def _run_job(job: JobSpec, device: str | None, threads: int) -> JobResult:
    global _WORKER_CACHE
    import torch

    torch.set_num_threads(max(1, threads))
    if _WORKER_CACHE is None:
        _WORKER_CACHE = DefenseCache()
    return execute(job, device, _WORKER_CACHE)


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``ray://host:10001``, ``host:6379``); None for ``auto``."""
    addr = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


class RayExecutor:
    """Run jobs as Ray tasks on a local or existing cluster (see the module docstring)."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, *,
                 num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
                 connect_timeout: float = 30, job_timeout_s: float | None = None) -> None:
        self.cache = DefenseCache()  # the driver's, for planning; Ray workers build their own
        try:
            import ray  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ValueError("executor 'ray' needs the extra: pip install 'genbench[ray]'"
                             ) from exc
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus}, "
                             f"{num_gpus}")
        if max_retries < 0 or connect_timeout <= 0:
            raise ValueError("max_retries must be >= 0 and connect_timeout > 0")
        self.workers = workers
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.connect_timeout = connect_timeout
        self.job_timeout_s = check_timeout(job_timeout_s)

    # -- cluster ----------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Initialize Ray; returns whether this executor owns (started) the connection."""
        import ray

        if ray.is_initialized():
            return False
        if self.address is None:
            n = self.workers or max(1, min(2, os.cpu_count() or 1))
            # Local workers import the same code as the driver (tests.plugins, a checkout).
            path = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")]
                                   if p)
            ray.init(num_cpus=n, num_gpus=None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=200 * 1024 * 1024,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
            return True
        where = _host_port(self.address)
        if where is not None:
            try:
                socket.create_connection(where, timeout=min(self.connect_timeout, 10)).close()
            except OSError as exc:
                raise ValueError(f"no Ray cluster answers at {self.address!r} ({exc}); start "
                                 "one with `ray start --head` or check --ray-address") from None
        errors: list[BaseException] = []

        def init() -> None:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)

        thread = threading.Thread(target=init, daemon=True)
        thread.start()
        thread.join(self.connect_timeout)
        if thread.is_alive():
            raise ValueError(f"could not connect to the Ray cluster at {self.address!r} within "
                             f"{self.connect_timeout:g}s")
        if errors:
            raise ValueError(f"could not connect to the Ray cluster at {self.address!r}: "
                             f"{errors[0]}") from None
        return True

    # -- jobs -------------------------------------------------------------------------------
    def _room(self) -> int:
        """Tasks the cluster runs at once (its CPUs and GPUs over one task's share)."""
        import ray

        res = ray.cluster_resources()
        room = int(res.get("CPU", 0) // self.num_cpus)
        if self.num_gpus > 0:
            room = min(room, int(res.get("GPU", 0) // self.num_gpus))
        return max(1, room)

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]:
        if not jobs:
            return
        import ray

        owned = self._connect()
        device = "cuda" if self.num_gpus > 0 else "cpu"
        task: Any = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                               max_retries=self.max_retries)(_run_job)
        threads = max(1, int(self.num_cpus))
        todo: deque[JobSpec] = deque(jobs)
        pending: dict[Any, tuple[JobSpec, float]] = {}
        limit = self.job_timeout_s
        try:
            while todo or pending:
                # without a timeout every task is submitted at once (Ray queues them); with
                # one, only what the cluster runs at once, so that the clock starts on time
                room = len(todo) if limit is None else self._room() - len(pending)
                for _ in range(min(room, len(todo))):
                    job = todo.popleft()
                    pending[task.remote(job, device, threads)] = (job, time.monotonic())
                wait_s = None if limit is None else max(
                    0.0, min(t for _, t in pending.values()) + limit - time.monotonic())
                done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
                for ref in done:
                    job, _started = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # worker lost after all retries: an error row
                        result = error_result(job, f"ray task failed after {self.max_retries} "
                                                   f"retries: {type(exc).__name__}: {exc}")
                    yield job, result
                if limit is None:
                    continue
                now = time.monotonic()
                for ref, (job, started) in list(pending.items()):
                    if now - started >= limit:
                        del pending[ref]
                        ray.cancel(ref, force=True)  # kills the worker running it
                        yield job, error_result(job, timeout_message(limit), now - started)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if owned:
                ray.shutdown()
