"""Executors run jobs and stream (job, result) pairs back to the driver, which alone writes the
store. ``local`` runs in-process; ``process`` runs one spawned worker per device (pinned with
``CUDA_VISIBLE_DEVICES``) or, on a CPU machine, per share of the cores. The optional ``ray``
executor lives in :mod:`benchmark.run.ray`. Each executor owns a :class:`DefenseCache`.

What a plug-in does to its process is survived by the ``process`` and ``ray`` executors, not by
``local`` (a plug-in there shares the driver's process):

* a worker that dies (out of memory, a segfault, ``os._exit``, SIGKILL) is replaced and its job
  retried up to ``max_retries`` times (default 2), then stored as an error result; the other
  jobs go on;
* with a suite's ``job_timeout_s``, a job over time is stopped (its worker killed and replaced)
  and stored as the error result "timed out after N s". The ``local`` executor cannot stop a
  job and warns when a timeout is set.

``sys.exit`` and exceptions in a plug-in are caught by :func:`benchmark.run.runner.execute` under
every executor.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any, Protocol

from benchmark.plugins.cache import DefenseCache
from benchmark.run.runner import execute
from benchmark.spec.jobs import JobResult, JobSpec

#: how often a job that killed its worker is retried before it becomes an error result.
MAX_RETRIES = 2
#: worker processes that die before they are ready, in a row, before the run gives up (a
#: broken environment, not a plug-in: retrying would loop forever).
MAX_START_FAILURES = 3


class Executor(Protocol):
    name: str
    #: the defenses the driver builds (planning); in-process executors run jobs on them too
    cache: DefenseCache

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]: ...


def check_timeout(job_timeout_s: float | None) -> float | None:
    """``job_timeout_s`` as a positive float, or None (no timeout); ValueError otherwise."""
    if job_timeout_s is None:
        return None
    if isinstance(job_timeout_s, bool) or not isinstance(job_timeout_s, int | float) or not (
            job_timeout_s > 0) or job_timeout_s == float("inf"):
        raise ValueError(f"job_timeout_s must be a positive number of seconds, got "
                         f"{job_timeout_s!r}")
    return float(job_timeout_s)


def error_result(job: JobSpec, message: str, wall_s: float = 0.0) -> JobResult:
    """The error result of a job that produced none itself (lost worker, timeout)."""
    return JobResult(key=job.key, status="error", outcomes=[], k=job.k_draws, wall_s=wall_s,
                     error=message)


def timeout_message(seconds: float) -> str:
    return f"timed out after {seconds:g} s (the suite's job_timeout_s); the job was stopped"


class LocalExecutor:
    """Jobs in the driver's own process, one after the other. It cannot stop a job that hangs
    or survive a plug-in that kills its process; ``job_timeout_s`` is not enforced here (a
    warning says so): use the ``process`` executor for that."""

    name = "local"

    def __init__(self, device: str | None = None, *, job_timeout_s: float | None = None
                 ) -> None:
        self.device = device
        self.cache = DefenseCache()
        self.job_timeout_s = check_timeout(job_timeout_s)
        if self.job_timeout_s is not None:
            warnings.warn(f"job_timeout_s = {self.job_timeout_s:g} is not enforced by the local "
                          "executor (a job runs in this process and cannot be stopped); use "
                          "--executor process or ray to enforce it", RuntimeWarning,
                          stacklevel=2)

    def map(self, jobs: Sequence[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]:
        for job in jobs:
            yield job, execute(job, self.device, self.cache)


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


# -- process workers ------------------------------------------------------------------------

def _worker_main(conn: Connection, slot: int | None, threads: int, driver: int) -> None:
    """A worker process: set up, say ``ready``, then run the jobs it is sent, one at a time,
    until it is sent None or the driver's end of the pipe closes."""
    # Ctrl-C goes to the whole process group: the driver stops the run and kills its workers,
    # a worker must not turn it into an error result of the job it is running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(driver)
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    device = "cuda" if slot is not None else "cpu"
    import torch

    torch.set_num_threads(threads)
    cache = DefenseCache()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = execute(job, device, cache)
        try:
            conn.send(("result", result))
        except Exception as exc:  # an unpicklable result: report it, not the bare traceback
            conn.send(("result", error_result(
                job, f"could not send the result back to the driver: {type(exc).__name__}: "
                     f"{exc}", result.wall_s)))


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if (
            -code == signal.SIGKILL) else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


#: worker processes alive in this (driver) process, killed at exit should a run not have
#: stopped them (workers are not daemonic, so that plug-ins may start processes of their own).
_LIVE: set[Any] = set()


@atexit.register
def _kill_live_workers() -> None:
    for proc in list(_LIVE):
        try:
            if proc.is_alive():
                proc.kill()
        except ValueError:  # already closed
            pass


class _Worker:
    """One worker process, its pipe and the job it runs."""

    def __init__(self, ctx: Any, slot: int | None, threads: int) -> None:
        self.slot = slot
        ours, theirs = ctx.Pipe()
        self.conn: Connection = ours
        self.proc = ctx.Process(target=_worker_main, args=(theirs, slot, threads, os.getpid()),
                                name="genbench-worker")
        self.proc.start()
        _LIVE.add(self.proc)
        theirs.close()
        self.ready = False
        self.job: JobSpec | None = None
        self.started = 0.0

    def give(self, job: JobSpec) -> None:
        self.conn.send(job)
        self.job = job
        self.started = time.monotonic()

    def stop(self, *, kill: bool) -> None:
        if kill:
            if self.proc.is_alive():
                self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(None if kill else 10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        _LIVE.discard(self.proc)
        self.proc.close()


class ProcessExecutor:
    """One spawned worker process per GPU (or ``workers`` CPU workers sharing the cores).

    A worker that dies is replaced; its job is retried ``max_retries`` times and then stored as
    an error result. With ``job_timeout_s`` a job over time is stopped (its worker killed and
    replaced) and stored as an error result."""

    name = "process"

    def __init__(self, workers: int | None = None, device: str | None = None, *,
                 job_timeout_s: float | None = None, max_retries: int = MAX_RETRIES) -> None:
        import torch

        gpus = torch.cuda.device_count() if device in (None, "auto", "cuda") else 0
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.job_timeout_s = check_timeout(job_timeout_s)
        self.max_retries = max_retries
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
        todo: deque[JobSpec] = deque(jobs)
        deaths: dict[str, int] = {}
        start_failures = 0
        free_slots = list(self.slots[:len(jobs)])
        workers: list[_Worker] = []
        try:
            while todo or any(w.job is not None for w in workers):
                # start workers for free slots while there is work, and hand out jobs
                while free_slots and len(todo) > sum(w.job is None for w in workers):
                    workers.append(_Worker(ctx, free_slots.pop(), self.threads))
                for w in workers:
                    if w.job is None and todo:
                        w.give(todo.popleft())
                running = [w for w in workers if w.job is not None and w.ready]
                timeout = None  # wait for a result, a worker ready or dead, or a deadline
                if self.job_timeout_s is not None and running:
                    timeout = max(0.0, min(w.started for w in running) + self.job_timeout_s
                                  - time.monotonic())
                ready = set(wait_any([w.conn for w in workers]
                                     + [w.proc.sentinel for w in workers], timeout))
                for w in list(workers):
                    message: Any = None
                    if w.conn in ready:
                        try:
                            message = w.conn.recv()
                        except (EOFError, OSError):
                            message = None  # died; its sentinel says how (below)
                    if message is not None and message[0] == "ready":
                        w.ready = True
                        start_failures = 0
                        if w.job is not None:
                            w.started = time.monotonic()  # the clock starts once set up
                        continue
                    if message is not None and message[0] == "result":
                        job, w.job = w.job, None
                        assert job is not None
                        yield job, message[1]
                        continue
                    if w.proc.sentinel in ready or (w.conn in ready and message is None):
                        w.proc.join(5)
                        why = _exit_reason(w.proc.exitcode)
                        job, w.job = w.job, None
                        workers.remove(w)
                        w.stop(kill=True)
                        free_slots.append(w.slot)
                        if not w.ready:  # died while setting up: not the job's fault
                            start_failures += 1
                            if start_failures >= MAX_START_FAILURES:
                                raise RuntimeError(f"process workers keep dying while they "
                                                   f"start ({why}); see their output above")
                            if job is not None:
                                todo.appendleft(job)
                            continue
                        if job is None:
                            continue
                        deaths[job.key] = deaths.get(job.key, 0) + 1
                        if deaths[job.key] <= self.max_retries:
                            todo.appendleft(job)  # retried on a fresh worker
                        else:
                            yield job, error_result(
                                job, f"the worker process died ({why}) while running this job, "
                                     f"{deaths[job.key]} times (retried {self.max_retries} "
                                     "times)", time.monotonic() - w.started)
                        continue
                    if (self.job_timeout_s is not None and w.job is not None and w.ready
                            and time.monotonic() - w.started >= self.job_timeout_s):
                        job, w.job = w.job, None
                        workers.remove(w)
                        w.stop(kill=True)
                        free_slots.append(w.slot)
                        yield job, error_result(job, timeout_message(self.job_timeout_s),
                                                time.monotonic() - w.started)
        finally:
            for w in workers:
                w.stop(kill=w.job is not None)


def make_executor(name: str, *, workers: int | None = None, device: str | None = None,
                  ray_address: str | None = None, num_cpus: float = 1.0,
                  num_gpus: float = 0.0, job_timeout_s: float | None = None) -> Executor:
    if name == "local":
        return LocalExecutor(device, job_timeout_s=job_timeout_s)
    if name == "process":
        return ProcessExecutor(workers, device, job_timeout_s=job_timeout_s)
    if name == "ray":
        from benchmark.run.ray import RayExecutor  # imports ray itself, with a clear error

        return RayExecutor(workers=workers, address=ray_address, num_cpus=num_cpus,
                           num_gpus=num_gpus, job_timeout_s=job_timeout_s)
    raise ValueError(f"unknown executor {name!r}; expected one of local, process, ray")
