"""Executors run jobs and stream (job, result) pairs back to the driver, which alone writes the
store. ``local`` runs in-process; ``process`` runs one spawned worker per device (pinned with
``CUDA_VISIBLE_DEVICES``) or, on a CPU machine, per share of the cores. The optional ``ray``
executor lives in :mod:`benchmark.run.ray`. Each executor owns a :class:`DefenseCache`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from benchmark.plugins.cache import DefenseCache
from benchmark.run.runner import execute
from benchmark.spec.jobs import JobResult, JobSpec


class Executor(Protocol):
    name: str
    #: the defenses the driver builds (planning); in-process executors run jobs on them too
    cache: DefenseCache

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]: ...


class LocalExecutor:
    name = "local"

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.cache = DefenseCache()

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]:
        for job in jobs:
            yield job, execute(job, self.device, self.cache)


# State of a worker process (set by its initializer; the driver's process never uses it).
_WORKER_DEVICE: str | None = None
_WORKER_CACHE: DefenseCache | None = None


def watch_parent(parent: int, interval: float = 1.0) -> None:
    """Exit this process when its parent ``parent`` (the driver's pid, passed in so that a
    driver dying during start-up is caught too) is gone and this process re-parented: a driver
    killed with SIGKILL or SIGTERM must not leave workers computing jobs nobody will store."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="genbench-parent-watch", daemon=True).start()


def _init_worker(slots: Any, threads: int, driver: int) -> None:
    global _WORKER_DEVICE, _WORKER_CACHE
    _WORKER_CACHE = DefenseCache()
    watch_parent(driver)
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
        _WORKER_DEVICE = "cuda"
    else:
        _WORKER_DEVICE = "cpu"
    import torch

    torch.set_num_threads(threads)


def _run_in_worker(job: JobSpec) -> JobResult:
    return execute(job, _WORKER_DEVICE, _WORKER_CACHE)


class ProcessExecutor:
    """One spawned worker process per GPU (or ``workers`` CPU workers sharing the cores)."""

    name = "process"

    def __init__(self, workers: int | None = None, device: str | None = None) -> None:
        import torch

        gpus = torch.cuda.device_count() if device in (None, "auto", "cuda") else 0
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.slots: list[int | None]
        if gpus:
            n = workers or gpus
            self.slots = [i % gpus for i in range(n)]
        else:
            n = workers or max(1, min(2, os.cpu_count() or 1))
            self.slots = [None] * n
        self.threads = max(1, (os.cpu_count() or 1) // n)
        self.cache = DefenseCache()  # the driver's, for planning; each worker builds its own

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]:
        if not jobs:
            return
        ctx = mp.get_context("spawn")
        slots = ctx.Queue()
        for s in self.slots:
            slots.put(s)
        with ProcessPoolExecutor(max_workers=len(self.slots), mp_context=ctx,
                                 initializer=_init_worker,
                                 initargs=(slots, self.threads, os.getpid())) as pool:
            pending: dict[Future[JobResult], JobSpec] = {
                pool.submit(_run_in_worker, job): job for job in jobs}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = pending.pop(fut)
                        yield job, fut.result()
            finally:
                for fut in pending:
                    fut.cancel()


def make_executor(name: str, *, workers: int | None = None, device: str | None = None,
                  ray_address: str | None = None, num_cpus: float = 1.0,
                  num_gpus: float = 0.0) -> Executor:
    if name == "local":
        return LocalExecutor(device)
    if name == "process":
        return ProcessExecutor(workers, device)
    if name == "ray":
        from benchmark.run.ray import RayExecutor  # imports ray itself, with a clear error

        return RayExecutor(workers=workers, address=ray_address, num_cpus=num_cpus,
                           num_gpus=num_gpus)
    raise ValueError(f"unknown executor {name!r}; expected one of local, process, ray")
