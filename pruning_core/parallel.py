"""Score pruned allocations in parallel: worker processes that each hold their own :class:`PruningSession`.

A search spends nearly all its time evaluating allocations (prune, refit, recalibrate, score), and those evaluations
are independent. :class:`EvaluationPool` runs them in ``N`` processes on this machine; each worker rebuilds the
session once from the paths it was made from (model, weights, data) and takes the driver's channel scores, so every
worker prunes exactly as the driver would. Torch threads are split among the workers, or with ``--device cuda`` each
worker takes one GPU in turn. A worker that dies, or hangs (no result in :attr:`WorkerPool.hang_limit` seconds), is
replaced and its evaluation retried.

:class:`~pruning_core.ray_pool.RayPool` does the same with Ray actors on a cluster (``pip install prunepilot[ray]``);
:func:`envs.evaluation_workers` picks one of the two.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing.connection import Connection, wait

import torch

from pruning_core.errors import UserError

__all__ = ["EvaluationPool", "Job", "Result", "WorkerPool", "build_worker_session", "usable_cores",
           "worker_settings"]

log = logging.getLogger(__name__)

RETRIES = 2  # a job whose worker died this many times is reported as a failure
HANG_FACTOR = 20  # a worker is hung after this many times the slowest evaluation so far ...
HANG_MIN_S = 300.0  # ... and at least this long
HANG_FIRST_S = 3600.0  # before any evaluation has finished (the first ones warm up)

Job = tuple[dict[str, float], "int | None"]  # (ratios per group, round_to)
Result = tuple[float, dict[str, float], int]  # (reward-split accuracy %, timings, index of the worker that ran it)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_settings(session) -> dict:
    """What a worker rebuilds ``session`` from: its source paths, its current config and its scores.

    :raises UserError: the session was built from Python objects, which a worker cannot rebuild.
    """
    if not session.rebuildable:
        raise UserError("parallel evaluation rebuilds the session in each worker from its model, weights and data "
                        "specs; a session built from Python objects (an nn.Module, ImageData or Split) needs workers=1")
    src = session.source
    config = {**asdict(session.config), "loader_workers": 0}  # no decoding processes inside a worker
    return {"model": src["model"], "weights": src["weights"], "data": src["data"], "val_data": src["val_data"],
            "config": config, "scores": {k: v.detach().cpu() for k, v in session.scores.items()}}


def build_worker_session(settings: dict, device: str):
    """The session a worker evaluates with (:func:`worker_settings`, on ``device``)."""
    from pruning_core import PruningSession, SessionConfig
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["config"].items()}
    return PruningSession(settings["model"], settings["weights"], settings["data"],
                          SessionConfig(**{**config, "device": device}), settings["val_data"], settings["scores"])


def _serve(conn: Connection, settings: dict, threads: int, device: str) -> None:
    """A worker process: rebuild the session, say so, then score ``(job id, ratios, round_to)`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the workers
    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # the driver already warned about the session; failures go back to it
    try:
        session = build_worker_session(settings, device)
    except Exception as e:  # noqa: BLE001 - reported to the driver in one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, ratios, round_to = msg
        try:
            acc, timings = session.score_allocation(ratios, round_to)
        except Exception as e:  # noqa: BLE001
            conn.send(("fail", job, f"{type(e).__name__}: {e}"))
        else:
            conn.send(("ok", job, acc, timings))


class WorkerPool:
    """What both pools share: jobs go to idle workers, a worker that died or hung is replaced and its job retried,
    and results come back in the jobs' order. Subclasses say how a job is sent (:meth:`_submit`), how finished ones
    are collected (:meth:`_finished`) and how a worker is replaced (:meth:`_replace`).
    """

    size: int
    what = "evaluation worker"  # how errors name a worker
    hang_s: float | None = None  # a fixed hang limit; None: :attr:`hang_limit`'s rule
    _slowest: float | None = None  # seconds of the slowest evaluation finished so far

    @property
    def hang_limit(self) -> float:
        """Seconds after which a worker with no result counts as hung: ``hang_s`` if set, else :data:`HANG_FACTOR`
        times the slowest evaluation so far and at least :data:`HANG_MIN_S` (:data:`HANG_FIRST_S` before any).
        """
        if self.hang_s is not None:
            return self.hang_s
        return HANG_FIRST_S if self._slowest is None else max(HANG_MIN_S, HANG_FACTOR * self._slowest)

    def accuracies(self, jobs: list[Job]) -> list[Result]:
        """Score every ``(ratios, round_to)`` job, in parallel; results in the jobs' order.

        :raises UserError: an evaluation failed, or its worker died or hung more than :data:`RETRIES` times.
        """
        results: list[Result | None] = [None] * len(jobs)
        queue, busy, tries = deque(range(len(jobs))), {}, [0] * len(jobs)  # busy: worker -> (job, token, start)
        while queue or busy:
            for i in range(self.size):
                if i not in busy and queue:
                    j = queue.popleft()
                    busy[i] = (j, self._submit(i, j, jobs[j]), time.monotonic())
            now = time.monotonic()
            wait_s = max(0.0, min(start + self.hang_limit - now for _, _, start in busy.values()))
            lost = []  # workers that died or hung, and why
            for i, outcome in self._finished({i: token for i, (_, token, _) in busy.items()}, wait_s):
                j, _, start = busy.pop(i)
                if outcome is None:
                    lost.append((i, j, "died"))
                elif isinstance(outcome, str):  # the command ends; the other workers' jobs stay unread
                    raise UserError(f"{self.what} {i} failed: {outcome}")
                else:
                    results[j] = (*outcome, i)
                    self._slowest = max(self._slowest or 0.0, time.monotonic() - start)
            now = time.monotonic()
            lost += [(i, busy.pop(i)[0], f"gave no result in {self.hang_limit:.0f} s")
                     for i in [i for i, (_, _, start) in busy.items() if now - start >= self.hang_limit]]
            for i, j, why in lost:
                tries[j] += 1
                if tries[j] > RETRIES:
                    raise UserError(f"{self.what}s died or hung {tries[j]} times on one allocation")
                log.warning("%s %d (pid %d) %s; starting a new one", self.what, i, self.pids[i], why)
                self._replace(i)
                queue.appendleft(j)
        return results  # type: ignore[return-value]

    def _submit(self, i: int, j: int, job: Job):
        """Send job ``j`` to worker ``i``; returns a token :meth:`_finished` receives back."""
        raise NotImplementedError

    def _finished(self, busy: dict[int, object], timeout: float
                  ) -> Iterator[tuple[int, tuple[float, dict] | str | None]]:
        """Wait up to ``timeout`` seconds for one of the ``busy`` workers (worker -> token); yield ``(worker,
        outcome)`` for each that is done: ``(accuracy, timings)``, an error line, or None if the worker died.
        """
        raise NotImplementedError

    def _replace(self, i: int) -> None:
        """Stop worker ``i`` (dead or hung) and start a new one in its place."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class EvaluationPool(WorkerPool):
    """``workers`` processes that score allocations of ``session`` (:meth:`PruningSession.score_allocation`).

    :param session: the driver's session; it must have been built from specs (:attr:`PruningSession.rebuildable`).
    :param workers: processes to start (at least 1).
    :param threads: torch threads per worker (default: this machine's cores divided among the workers).
    :param hang_s: seconds without a result after which a worker is replaced (default: :attr:`hang_limit`'s rule).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, session, workers: int, threads: int | None = None, hang_s: float | None = None):
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        self.settings = worker_settings(session)
        self.hang_s = hang_s
        self.size = workers
        self.threads = threads or max(1, usable_cores() // workers)
        device = session.device
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        # one GPU each in turn when there are several; the session's own device otherwise
        self.devices = [f"cuda:{i % gpus}" if gpus > 1 else str(device) for i in range(workers)]
        self._ctx = mp.get_context("spawn")  # fork would copy the driver's torch thread pools (and CUDA state)
        self._procs: list = [None] * workers
        self._conns: list[Connection | None] = [None] * workers
        self.pids: list[int] = [0] * workers
        self.restarts = 0
        try:
            for i in range(workers):
                self._start(i, wait_ready=False)
            for i in range(workers):
                self._ready(i)
        except BaseException:
            self.close()
            raise

    def _start(self, i: int, wait_ready: bool = True) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.settings, self.threads, self.devices[i]),
                                 name=f"prunepilot-eval-{i}", daemon=True)
        proc.start()
        child.close()  # the worker holds the only other end: its death reads as EOF here
        self._procs[i], self._conns[i] = proc, parent
        if wait_ready:
            self._ready(i)

    def _ready(self, i: int) -> None:
        try:
            msg = self._conns[i].recv()
        except EOFError:
            raise UserError(f"evaluation worker {i} exited while loading the model "
                            f"(exit code {self._procs[i].exitcode})") from None
        if msg[0] == "error":
            raise UserError(f"evaluation worker {i} could not load the model: {msg[1]}")
        self.pids[i] = msg[1]

    def _replace(self, i: int) -> None:
        self._conns[i].close()
        self._procs[i].kill()  # a hung worker does not exit on its own
        self._procs[i].join(timeout=5)
        self.restarts += 1
        self._start(i)

    def _submit(self, i: int, j: int, job: Job) -> None:
        try:
            self._conns[i].send((j, *job))
        except (BrokenPipeError, OSError):
            pass  # it died; _finished sees EOF

    def _finished(self, busy: dict[int, object], timeout: float
                  ) -> Iterator[tuple[int, tuple[float, dict] | str | None]]:
        for conn in wait([self._conns[i] for i in busy], timeout):
            i = self._conns.index(conn)
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                yield i, None
                continue
            yield i, msg[2] if msg[0] == "fail" else (msg[2], msg[3])

    def close(self) -> None:
        """Stop the workers."""
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
                conn.close()
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
        self._conns = [None] * self.size
        self._procs = [None] * self.size
