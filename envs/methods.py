"""Search methods over a :class:`PruneEnv`'s action space besides the agent, and the selection every search ends with.

Each method evaluates allocations through the env's cached evaluator (:meth:`PruneEnv.evaluate`), so they share its
reward split, its cache and its evaluation count with the agent:

- :func:`centre_allocation`: action 0 on every step (the allocation an untrained agent starts from);
- :func:`random_search`: EagleEye-style best of N random episodes;
- :func:`sensitivity_search`: AIMET/ModelOpt greedy selection over the env's decision units;
- :func:`floor_allocations`: the cheap allocations a search must beat (uniform, centre, global, sensitivity);
- :func:`select_best`: re-score candidates as the kept model is built and keep the best (uniform on a near-tie).

With :func:`evaluation_workers`, the evaluations of random search, the sensitivity table and the agent's episodes run
in parallel worker processes; the allocations found are the same as with one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from envs.prune_env import PruneEnv
from pruning_core.allocate import global_ratios, threshold_allocation, uniform_ratios
from pruning_core.errors import UserError
from pruning_core.evaluate import correct, paired_lead
from pruning_core.parallel import EvaluationPool, WorkerPool
from pruning_core.prune import kept_counts

__all__ = ["FLOOR_METHODS", "applied_actions", "centre_allocation", "evaluation_workers", "floor_allocations",
           "random_search", "resolve_episode", "run_episode", "run_episodes", "select_best", "sensitivity_search",
           "sensitivity_table", "uniform_test"]

FLOOR_METHODS = ("uniform", "centre", "global", "sensitivity")

log = logging.getLogger(__name__)

Kept = dict[str, int]


def run_episode(env: PruneEnv, act: Callable[[dict], np.ndarray]) -> tuple[float, dict]:
    """Run one episode of ``env`` with ``act(observation) -> action``; return (final reward, final info)."""
    obs, _ = env.reset()
    done = False
    while not done:
        obs, reward, done, _, info = env.step(act(obs))
    return float(reward), info


@contextmanager
def evaluation_workers(env: PruneEnv, workers: int, ray: str | None = None) -> Iterator[WorkerPool | None]:
    """Within this block ``env`` evaluates on ``workers`` processes (:class:`~pruning_core.parallel.EvaluationPool`),
    or Ray actors on the cluster ``ray`` names (``auto``, ``local`` or ``HOST:PORT``;
    :class:`~pruning_core.ray_pool.RayPool`), each holding its own copy of the session; with 1 and no Ray, in this
    process as always.
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if workers == 1 and not ray:
        yield None
        return
    env.evaluator.check_parallel()  # before any worker starts
    if ray:
        from pruning_core.ray_pool import RayPool  # Ray is an optional extra
        pool = RayPool(env.session, workers, ray)
    else:
        pool = EvaluationPool(env.session, workers)
    with pool:
        env.evaluator.use_pool(pool)
        try:
            yield pool
        finally:
            env.evaluator.use_pool(None)


def resolve_episode(env: PruneEnv, info: dict) -> tuple[float, dict]:
    """The (reward, info) of an episode that ended deferred (``info["pending"]``), as if it had been evaluated then."""
    reward, result = env.evaluate(info["kept"])
    return reward, {**result, "kept": info["kept"], "episode": info["episode"],
                    "action_applied": info["action_applied"]}


def run_episodes(env: PruneEnv, act: Callable[[dict], np.ndarray], count: int,
                 more: Callable[[], bool] = lambda: True) -> list[tuple[float, dict]]:
    """Up to ``count`` episodes of ``act`` while ``more()`` holds, their evaluations deferred and then run together
    (in parallel on the env's pool); (reward, info) per episode, in order. The actions never depend on the rewards,
    so the episodes are those that one-by-one evaluation would give.
    """
    ends = []
    env.defer = True
    try:
        while len(ends) < count and more():
            ends.append(run_episode(env, act)[1])
    finally:
        env.defer = False
    env.evaluator.prefetch(info["kept"] for info in ends)
    return [resolve_episode(env, info) for info in ends]


def centre_allocation(env: PruneEnv) -> Kept:
    """The allocation of action 0 on every step: uniform pruning in the env's action space (evaluated)."""
    run_episode(env, lambda _: np.zeros(1, np.float32))
    return dict(env.kept)


def random_search(env: PruneEnv, episodes: int, seed: int, evaluations: int | None = None,
                  progress: bool = False) -> dict:
    """EagleEye-style random search: episodes of actions uniform in [-1, 1] (clamped into the budget by the env)
    until ``episodes`` are done or ``evaluations`` distinct allocations have been evaluated. Returns the best:
    ``reward``, ``kept``, ``ratios``, and ``episodes`` run.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    best, done = None, 0
    batch = env.pool.size if env.pool is not None else 1
    bar = tqdm(total=episodes, desc="random search", unit="ep", leave=False, disable=None if progress else True)
    while done < episodes and (evaluations is None or env.evaluations < evaluations):
        ended = run_episodes(env, lambda _: rng.uniform(-1, 1, 1).astype(np.float32), min(batch, episodes - done),
                             lambda: evaluations is None or env.evaluations < evaluations)
        for reward, info in ended:
            if best is None or reward > best["reward"]:
                best = {"reward": reward, "kept": info["kept"], "ratios": dict(info["ratios"])}
        done += len(ended)
        bar.update(len(ended))
    bar.close()
    return {**best, "episodes": done}


def _spread(values: list[float], points: int) -> list[float]:
    """Up to ``points`` of ``values`` (sorted), evenly spaced by index, the largest always included."""
    if len(values) <= points:
        return list(values)
    idx = np.linspace(0, len(values) - 1, points).round().astype(int)
    return [values[i] for i in sorted(set(idx.tolist()))]


def sensitivity_table(env: PruneEnv, points: int = 10, progress: bool = False) -> list[list[tuple[float, float]]]:
    """Per decision unit of ``env`` (a width or drop step), ``(ratio, reward-split accuracy)`` with that unit alone
    pruned at each of up to ``points`` ratios of its grid (one cached evaluation each).
    """
    from tqdm.auto import tqdm

    if points < 1:
        raise UserError(f"sensitivity points must be at least 1, got {points}")
    jobs = [(t, r) for t, grid in enumerate(env.ratio_grid) for r in _spread([g for g in grid if g > 0], points)]
    tables: list[list[tuple[float, float]]] = [[] for _ in env.ratio_grid]
    if env.pool is not None:  # all at once on the workers; the loop below reads them from the cache
        env.evaluator.prefetch(env.allocation([r if i == t else 0.0 for i in range(env.num_steps)]) for t, r in jobs)
    for t, r in tqdm(jobs, desc="sensitivity", unit="eval", leave=False, disable=None if progress else True):
        ratios = [0.0] * env.num_steps
        ratios[t] = r
        _, info = env.evaluate(env.allocation(ratios))
        tables[t].append((r, info["acc"]))
    return tables


def sensitivity_search(env: PruneEnv, points: int = 10, progress: bool = False) -> dict:
    """AIMET's greedy compression-ratio selection (and ModelOpt's ``fastnas``) over the env's decision units: measure
    :func:`sensitivity_table`, then find the highest accuracy threshold at which every unit takes its largest ratio
    whose accuracy stays above it and the allocation meets the env's budgets. Deterministic.

    Returns ``reward``, ``kept``, ``ratios`` (per group), ``step_ratios``, ``threshold`` and ``table``.
    """
    tables = sensitivity_table(env, points, progress)
    step_ratios, threshold = threshold_allocation(tables, lambda rs: env.fits(env.allocation(rs)))
    kept = env.allocation(step_ratios)
    reward, info = env.evaluate(kept)
    return {"reward": reward, "kept": kept, "ratios": dict(info["ratios"]), "step_ratios": step_ratios,
            "threshold": threshold, "table": tables}


def floor_allocations(env: PruneEnv, methods: Iterable[str] = FLOOR_METHODS, points: int = 10,
                      progress: bool = False) -> dict[str, Kept]:
    """The cheap allocations a search must beat, evaluated in ``env`` (its cache), by name:

    - ``uniform``: one ratio for every group, rounded as the env rounds (:func:`uniform_ratios`);
    - ``centre``: action 0 on every step (:func:`centre_allocation`);
    - ``global``: Taylor global ranking (:func:`global_ratios`);
    - ``sensitivity``: :func:`sensitivity_search` with ``points`` ratios per unit.

    One that cannot meet the budget in this space (uniform at a low budget in whole channel blocks) is left out.
    """
    s, out = env.session, {}
    for name in methods:
        if name not in FLOOR_METHODS:
            raise UserError(f"unknown floor method {name!r}; use any of {', '.join(FLOOR_METHODS)}")
        try:
            if name == "centre":
                kept = centre_allocation(env)
            elif name == "sensitivity":
                kept = sensitivity_search(env, points, progress)["kept"]
            else:
                fn = uniform_ratios if name == "uniform" else lambda *a: global_ratios(a[0], s.scores, *a[1:])
                ratios = fn(s.trace, env.target, env.max_ratio, env.round_to, env.latency_budget)
                kept = kept_counts(s.trace, ratios, env.round_to)
        except (UserError, ValueError) as e:
            log.info("floor: %s left out: %s", name, e)
            continue
        if env.fits(kept):
            env.evaluate(kept)
            out[name] = kept
    return out


def select_best(env: PruneEnv, top: int, floor: dict[str, Kept] | None = None,
                among: Iterable[tuple[int, ...]] | None = None,
                reconstruct: bool | None = None, uniform_z: float = 0.0) -> tuple[dict, list[dict]]:
    """Keep one allocation: the ``top`` best distinct allocations evaluated so far (of ``among``, keys of the env's
    cache, if given) and every ``floor`` allocation, re-scored as the kept model is built (refitted by least squares
    when ``reconstruct``; default: as the search scored) on the reward and select splits together; the best score is
    kept, whatever produced it.

    The reward split alone favours a lucky candidate among near-ties (the winner's curse), and the refit reorders
    candidates, so the re-scoring uses more images and the kept model's own build.

    With ``uniform_z`` > 0 and ``uniform`` among the floor, uniform is kept unless the best candidate leads it on both
    splits by more than ``uniform_z`` standard errors of the paired difference (:func:`uniform_test`): near-ties go
    to the one-line baseline, not to the luckier score.

    Returns (kept, the scored candidates without their ratios, best first). Each entry holds ``source`` (``search``
    or the floor method), ``ratios``, ``reward``, ``acc`` (both splits), ``acc_reward``, ``acc_select`` (None
    without a select split), ``reward_search`` (the reward the search saw), ``flops_ratio`` and ``params_ratio``;
    ``kept`` also holds ``vs_uniform`` when that test was made.
    """
    s = env.session
    select = s.splits.select
    reconstruct = s.config.reconstruct if reconstruct is None else reconstruct
    if among is None:  # the cache also holds allocations off the budget (a sensitivity table's single units)
        among = [key for key in env.cache if env.fits(env.evaluator.allocation(key))]
    ranked = sorted(among, key=lambda key: env.cache[key][0], reverse=True)[:max(top, 1)]
    sources = dict.fromkeys(ranked, "search")
    for name, kept in (floor or {}).items():
        env.evaluate(kept)  # cached when the floor was evaluated already
        sources[env.evaluator.key(kept)] = name
    out, hits, n_r = [], {}, len(s.splits.reward)
    for key, source in sources.items():
        reward_search, info = env.cache[key]
        hits[key] = _built_hits(env, info["ratios"], reconstruct)
        acc_reward = 100.0 * float(hits[key][:n_r].mean())
        acc_select = 100.0 * float(hits[key][n_r:].mean()) if select is not None else None
        acc = 100.0 * float(hits[key].mean())
        out.append({"key": key, "source": source, "ratios": dict(info["ratios"]),
                    "reward": env.evaluator.reward_of(acc, info), "reward_search": reward_search, "acc": acc,
                    "acc_reward": acc_reward, "acc_select": acc_select, "flops_ratio": info["flops_ratio"],
                    "params_ratio": info["params_ratio"]})
    out.sort(key=lambda c: c["reward"], reverse=True)
    kept = out[0]
    uniform = next((c for c in out if c["source"] == "uniform"), None)
    if uniform_z > 0 and uniform is not None and kept is not uniform:
        test = _verdict(hits[kept["key"]], hits[uniform["key"]], uniform_z)
        kept = {**(uniform if test["kept"] == "uniform" else kept), "vs_uniform": {**test, "best": kept["source"]}}
    kept = {k: v for k, v in kept.items() if k != "key"}
    return kept, [{k: v for k, v in c.items() if k not in ("key", "ratios")} for c in out]


def _built_hits(env: PruneEnv, ratios: dict[str, float], reconstruct: bool) -> torch.Tensor:
    """Per image of the reward and select splits, whether ``ratios`` built as the kept model is (refitted when
    ``reconstruct``) classifies it right (:func:`correct`); the build and scoring count as evaluation time.
    """
    s = env.session
    timings: dict[str, float] = {}
    model = s.build(ratios, env.round_to, timings=timings, reconstruct=reconstruct)
    t = time.perf_counter()
    hits = torch.cat([correct(model, split) for split in (s.splits.reward, s.splits.select) if split is not None])
    timings["eval_s"] = time.perf_counter() - t
    env.evaluator.add_timings(timings)
    return hits


def _verdict(best: torch.Tensor, uniform: torch.Tensor, z: float) -> dict:
    """The uniform test on per-image hits of the best candidate and of uniform (see :func:`uniform_test`)."""
    lead, se = paired_lead(best, uniform)
    return {"lead": lead, "se": se, "z": z, "kept": "best" if lead > z * se else "uniform"}


def uniform_test(env: PruneEnv, best: dict[str, float], uniform: dict[str, float], z: float,
                 reconstruct: bool) -> dict:
    """Whether ``best`` leads ``uniform`` by more than ``z`` standard errors on the reward and select images, both
    built as the kept model is. Returns ``lead`` and ``se`` (accuracy points), ``z`` and ``kept`` (``best`` or
    ``uniform``; an exact tie keeps uniform).
    """
    return _verdict(_built_hits(env, best, reconstruct), _built_hits(env, uniform, reconstruct), z)


def applied_actions(env: PruneEnv, step_ratios: list[float]) -> list[float]:
    """The actions, after the env's clamp, of the episode that reproduces ``step_ratios`` (its final evaluation is
    cached if seen; the env's episode count is left as it was). An agent fitted to them starts from that allocation.
    """
    episodes, actions = env.episodes, []
    env.reset()
    for t, r in enumerate(step_ratios):
        *_, info = env.step(np.array([env.ratio_to_action(t, r)], np.float32))
        actions.append(float(info["action_applied"][0]))
    env.episodes = episodes
    env.reset()
    return actions
