"""Score pruned allocations on a Ray cluster: :class:`RayPool`, the Ray counterpart of
:class:`~pruning_core.parallel.EvaluationPool` (``pip install prunepilot[ray]``; ``--ray``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from pruning_core.errors import UserError
from pruning_core.parallel import Job, WorkerPool, build_worker_session, worker_settings

__all__ = ["RayPool"]


class RayPool(WorkerPool):
    """``workers`` Ray actors that score allocations of ``session``, as :class:`~pruning_core.parallel.EvaluationPool`
    does.

    :param address: the cluster to join: ``auto`` (the one ``ray start`` runs on this machine), ``local`` (start one
        inside this process), or ``HOST:PORT``. A Ray already initialised in this process is used as it is.
    :param threads: torch threads (and Ray CPUs) per actor (default: the cluster's CPUs divided among the actors);
        on a CUDA session each actor takes one GPU instead.

    The actors rebuild the session from its paths; its scores reach them through Ray's object store. An actor that
    dies or hangs is replaced and its evaluation retried, so the search loses no finished evaluation and counts none
    twice.
    """

    what = "Ray evaluation actor"

    def __init__(self, session, workers: int, address: str = "auto", threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'prunepilot[ray]'") from None
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        settings = worker_settings(session)
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot join the Ray cluster at {address!r} ({e}); start one with "
                                "`ray start --head`, or pass --ray local") from None
        self._ray = ray
        self.size = workers
        gpu = session.device.type == "cuda"
        cluster = ray.cluster_resources()
        cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
        self.threads = threads or max(1, int(cpus) // workers)
        # more actors than the cluster holds share it (fractional resources) instead of waiting forever
        if gpu:
            resources = {"num_gpus": min(1.0, gpus / workers), "num_cpus": min(1.0, cpus / workers)}
        else:
            resources = {"num_cpus": min(float(self.threads), cpus / workers)}
        self._device = "cuda" if gpu else "cpu"
        self._actor_class = ray.remote(max_restarts=0, **resources)(_EvaluationActor)
        self._settings = ray.put(settings)
        self.restarts = 0
        self._actors = [self._actor_class.remote(self._settings, self._device, self.threads) for _ in range(workers)]
        try:
            self.pids = ray.get([a.pid.remote() for a in self._actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise UserError(f"a Ray evaluation actor could not load the model: {_cause(e)}") from None

    def _submit(self, i: int, j: int, job: Job):
        return self._actors[i].score.remote(*job)

    def _finished(self, busy: dict[int, object], timeout: float
                  ) -> Iterator[tuple[int, tuple[float, dict] | str | None]]:
        ray = self._ray
        worker_of = {ref: i for i, ref in busy.items()}
        done, _ = ray.wait(list(worker_of), num_returns=1, timeout=timeout)
        for ref in done:
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError:
                outcome = None
            except ray.exceptions.RayTaskError as e:
                outcome = _cause(e)
            yield worker_of[ref], outcome

    def _replace(self, i: int) -> None:
        self._ray.kill(self._actors[i], no_restart=True)
        self._actors[i] = self._actor_class.remote(self._settings, self._device, self.threads)
        self.pids[i] = self._ray.get(self._actors[i].pid.remote())
        self.restarts += 1

    def close(self) -> None:
        """Stop the actors (the cluster keeps running)."""
        for actor in getattr(self, "_actors", []):
            self._ray.kill(actor, no_restart=True)
        self._actors = []

class _EvaluationActor:
    """A Ray actor holding one worker session (:func:`build_worker_session`)."""

    def __init__(self, settings: dict, device: str, threads: int):
        torch.set_num_threads(threads)
        logging.disable(logging.WARNING)
        self.session = build_worker_session(settings, device)

    def pid(self) -> int:
        return os.getpid()

    def score(self, ratios: dict[str, float], round_to: int | None) -> tuple[float, dict[str, float]]:
        return self.session.score_allocation(ratios, round_to)


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0]
