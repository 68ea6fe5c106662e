"""``train``: search a sparsity policy on one model, then build, evaluate and export its best pruned model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from agent.config import TrainConfig
from agent.outputs import check_out, write_json, write_pruned
from agent.search import Search
from envs import (
    PruneEnv,
    applied_actions,
    evaluation_workers,
    floor_allocations,
    run_episode,
    select_best,
    sensitivity_search,
)
from pruning_core import (
    LatencyBudget,
    LatencyTable,
    PruningSession,
    SessionConfig,
    UserError,
    accuracy,
    kept_counts,
    uniform_ratios,
)
from pruning_core.data import absolute_spec
from pruning_core.session_config import refits_by_default

__all__ = ["build_env", "final_refit", "finish_search", "resume", "train"]

log = logging.getLogger(__name__)

LATENCY_TABLE = "latency_table.json"  # in the run folder, so that --resume budgets with the same table


def build_env(config: TrainConfig, session: PruningSession | None = None,
              latency_table: LatencyTable | None = None) -> PruneEnv:
    """The environment a config describes (loading, tracing and scoring the model unless ``session`` is given).

    With ``config.max_latency``, ``latency_table`` is the table to budget with; it is measured here when not given.
    """
    if session is None:
        session = PruningSession(config.model, config.weights, config.data, SessionConfig(
            reward_images=config.reward_images, calib_batches=config.calib_batches,
            select_images=config.select_images, seed=config.seed, importance=config.importance,
            mean=config.mean, std=config.std, scale=config.scale, image_size=config.image_size,
            loader_workers=config.loader_workers, num_classes=config.num_classes, trust_pickle=config.trust_pickle,
            device=config.device,
            reconstruct=search_refit(config)), config.val_data)
    budget = None
    if config.max_latency is not None:
        table = latency_table or session.latency_table(config.latency_backend, config.latency_batch, config.progress)
        budget = LatencyBudget(table, config.max_latency)
    if config.drop_blocks:
        session.drop_costs(progress=config.progress)  # one evaluation per residual branch, with a progress bar
    return PruneEnv(session=session, flops=config.flops, reward=config.reward, max_ratio=config.max_ratio,
                    round_to=config.round_to, max_nodes=max(config.max_nodes, len(session.trace.nodes)),
                    granularity=config.granularity, action_center=config.action_center,
                    latency_batch=config.latency_batch, latency_budget=budget, drop=config.drop_blocks)


def train(config: TrainConfig | None = None, session: PruningSession | None = None, **overrides) -> dict:
    """Train the agent, keep the best candidate after re-scoring, and write the run folder; return the report.

    ``overrides`` replace fields of ``config`` (``train(model="resnet20", episodes=50, ...)``); without a
    ``config``, ``preset=NAME`` starts from that preset. The run folder records the config with absolute paths at
    once, so ``--resume`` can continue it from any folder, even after a kill before the first checkpoint.

    A given ``session`` is used as it is: its :class:`SessionConfig` sets the reward, calibration and select images
    and whether candidates are refitted while searching (the CLI builds it with ``reconstruct=True``).
    """
    config = replace(config, **overrides) if config else TrainConfig.from_preset(**overrides)
    config.validate()
    if session is not None and session.model_name != config.model:
        raise UserError(f"the session's model is {session.model_name}, not config.model {config.model}: build the "
                        "session from the same model spec, which the run records for --resume")
    if session is not None and session.config.reconstruct != search_refit(config):
        log.warning("the session %s candidates while searching, unlike config.reconstruct: the session's setting "
                    "holds", "refits" if session.config.reconstruct else "does not refit")
    run_dir = Path(config.out)
    check_out(run_dir, overwrite=True)  # writable; a run folder is never written over, which the checks below say
    if (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--out {run_dir} is not empty; train writes a run into a new or empty folder")
    config = replace(config, weights=config.weights and absolute_spec(config.weights), data=absolute_spec(config.data),
                     val_data=absolute_spec(config.val_data), out=str(run_dir.resolve()))
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {**config.to_dict(), "cwd": os.getcwd()})
    try:
        env = build_env(config, session)
    except BaseException:  # nothing to resume: leave the folder as it was
        (run_dir / "config.json").unlink()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if env.latency_budget is not None:
        env.latency_budget.table.save(run_dir / LATENCY_TABLE)
    search = Search(config, env, run_dir)
    return _finish(config, search)


def resume(run_dir: str | Path, episodes: int | None = None, progress: bool | None = None,
           evaluations: int | None = None, redo_finish: bool = False, device: str | None = None,
           loader_workers: int | None = None, workers: int | None = None, ray: str | None = None) -> dict:
    """Continue a killed run from its last checkpoint; from a checkpoint, it repeats what the uninterrupted run
    would have done. A finished run is only extended by a larger ``episodes`` or ``evaluations`` budget.

    :param episodes: a new total episode budget (default: the run's own).
    :param evaluations: a new budget of distinct evaluations (default: the run's own).
    :param redo_finish: re-score and rebuild the kept model of a finished run (else a finished run is returned as
        it is, with a warning).
    :param device: run the rest on this device instead (``SessionConfig.device``); a GPU's arithmetic may differ
        from the CPU's in the last bits, so only the same device repeats the run exactly.
    :param loader_workers: image-folder decoding processes (``SessionConfig.loader_workers``).
    :param workers: evaluation processes (``TrainConfig.workers``), as Ray actors on the cluster ``ray``.
    :raises UserError: no run, or a path the run was started with is gone.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} holds no run to resume (no config.json)")
    recorded = json.loads(cfg_path.read_text())
    config = TrainConfig.from_dict(recorded)
    more = (episodes is not None and episodes > config.episodes) or (
        evaluations is not None and (config.evaluations is None or evaluations > config.evaluations))
    if (run_dir / "report.json").is_file() and not more and not redo_finish:
        log.warning("%s is finished: nothing to do (raise --episodes or --evaluations to search on, or pass "
                    "--redo-finish to re-score and rebuild its kept model)", run_dir)
        return json.loads((run_dir / "report.json").read_text())
    if episodes is not None:
        config.episodes = episodes
    if evaluations is not None:
        config.evaluations = evaluations
    if device is not None:
        config.device = device
    if loader_workers is not None:
        config.loader_workers = loader_workers
    if workers is not None:
        config.workers = workers
    if ray is not None:
        config.ray = ray
    config.validate()
    for what, spec in (("--weights", config.weights), ("--data", config.data), ("--val-data", config.val_data)):
        path = spec.partition(":")[2] if spec and spec.startswith(("cifar10:", "imagefolder:")) else spec
        if path and path != "digits" and not Path(path).exists():
            raise UserError(f"the run's {what} {path} no longer exists; put it back to resume {run_dir}")
    if ":" in config.model and recorded.get("cwd") and recorded["cwd"] not in sys.path:
        sys.path.append(recorded["cwd"])  # the folder the run imported its model factory from
    if progress is not None:
        config.progress = progress
    config.out = str(run_dir)
    table = None
    if config.max_latency is not None and (run_dir / LATENCY_TABLE).is_file():
        table = LatencyTable.load(run_dir / LATENCY_TABLE)  # budget with the table the run started with
    search = Search.resume(config, build_env(config, latency_table=table), run_dir)
    log.info("resuming %s at episode %d of %d", run_dir, search.episodes_done, config.episodes)
    return _finish(config, search)


def search_refit(config: TrainConfig) -> bool:
    """Whether candidates are refitted while searching (``SessionConfig.reconstruct`` of the session it builds)."""
    return config.reconstruct and refits_by_default(config.finetune_epochs)


def final_refit(config: TrainConfig) -> bool:
    """Whether the kept model is refitted by least squares (:meth:`PruningSession.build_final`'s rule)."""
    if config.reconstruct_final is not None:
        return config.reconstruct_final
    return refits_by_default(config.finetune_epochs)


def _finish(config: TrainConfig, search: Search) -> dict:
    run_dir, env = Path(config.out), search.env
    with evaluation_workers(env, config.workers, config.ray) as pool:
        floor_started = time.perf_counter()
        floor = floor_allocations(env, config.floor, config.sensitivity_points, config.progress)
        floor_s = time.perf_counter() - floor_started  # cached on --resume
        if config.warm_start == "sensitivity" and "sensitivity" in floor:
            found = sensitivity_search(env, config.sensitivity_points)  # cached: the floor measured it
            search.start = applied_actions(env, found["step_ratios"]), found["reward"]
        cap = None if config.evaluations is None else config.evaluations - 1  # one left for the policy's episode
        if cap is not None and not search.history and len(env.cache) >= cap:
            raise UserError(f"--evaluations {config.evaluations} leaves the search nothing after the floor's "
                            f"{len(env.cache)}: continue with --resume {run_dir} --evaluations "
                            f"{len(env.cache) + 20} or more, or lower --sensitivity-points")
        best = search.run(config.episodes, cap)
        eval_s = env.evaluation_s  # the search's own share, before the policy episode and the re-scoring
        write_json(run_dir / "history.json", search.history)
        started = time.perf_counter()
        done = finish_search(search, config.rescore_top, floor, final_refit(config), config.uniform_z)
        restarts = pool.restarts if pool is not None else 0
    session = env.session
    kept = done["kept"]
    model, built = session.build_final(kept["ratios"], config.round_to, final_refit(config),
                                       config.finetune_epochs)
    acc_before = None  # the report's acc unless fine-tuned
    if config.finetune_epochs > 0:
        acc_before = accuracy(model, session.splits.test)
        model = session.finetune(model, config.finetune_epochs, progress=config.progress)
    uniform = uniform_ratios(session.trace, config.flops, config.max_ratio, config.round_to, env.latency_budget)
    stats = {"episodes": search.episodes_done, "evaluations": search.evaluations_done,
             "reexplorations": search.reexplorations, "proposals": search.proposals, "workers": config.workers,
             "ray": config.ray,
             "worker_restarts": restarts,
             "search_s": round(search.search_s, 2),
             "episodes_per_min": round(60 * search.episodes_done / max(search.search_s, 1e-9), 2),
             "env_eval_s": round(eval_s, 2), "agent_share": round(max(0.0, 1 - eval_s / max(search.search_s,
                                                                                          1e-9)), 4),
             "best_episode": best["episode"], "best_reward": best["reward"], "algo": config.algo,
             "policy_episode": done["policy_episode"], "rescored": done["rescored"],
             "chosen": kept["source"], "vs_uniform": kept.get("vs_uniform"), "floor": sorted(floor),
             "floor_s": round(floor_s, 2),
             "reconstruct": session.config.reconstruct,
             "rescore_refit": final_refit(config)}
    if env.latency_budget is not None:
        stats["latency_budget"] = env.latency_budget.report(
            session.trace, kept_counts(session.trace, kept["ratios"], config.round_to))
    report = session.report(model, kept["ratios"], "rl", config.seed,
                            floor_s + search.search_s + time.perf_counter() - started,
                            round_to=config.round_to, acc_before_finetune=acc_before,
                            finetune_epochs=config.finetune_epochs, search=stats, **built)
    write_pruned(run_dir / "final", model, report, session.data.input_shape)
    write_json(run_dir / "report.json", report)
    _plots(run_dir, search.history, kept["ratios"], uniform)
    pareto_plot(run_dir / "pareto.png", done["rescored"], search.history)
    return report


def finish_search(search: Search, top: int, floor: dict | None = None, reconstruct: bool = False,
                  uniform_z: float = 0.0) -> dict:
    """After the search episodes: the learned policy's deterministic episode (one more evaluation, cached if
    seen, and a candidate like the others), then :func:`~envs.select_best` over the ``top`` best candidates and the
    ``floor`` allocations, scored as the kept model is built (refitted when ``reconstruct``; uniform kept on a lead
    within ``uniform_z`` standard errors).

    Returns ``kept`` (with its ``source``), ``rescored``, ``policy_episode`` and ``best``: the best reward-split
    episode, the policy's included.
    """
    policy = run_policy_episode(search)
    best = search.best
    if policy["reward"] > best["reward"]:
        best = {**policy, "episode": search.episodes_done + 1}
    kept, rescored = select_best(search.env, top, floor, reconstruct=reconstruct, uniform_z=uniform_z)
    return {"kept": kept, "rescored": rescored, "policy_episode": policy, "best": best}


def run_policy_episode(search: Search) -> dict:
    """One deterministic episode of the current policy; returns its reward, accuracy and FLOPs."""
    reward, info = run_episode(search.env, lambda obs: search.algo.predict(obs, deterministic=True)[0])
    return {"reward": reward, "acc": info["acc"], "flops_ratio": info["flops_ratio"], "ratios": info["ratios"]}


def _plots(run_dir: Path, history: list[dict], best: dict[str, float], uniform: dict[str, float]) -> None:
    """reward.png (reward per episode and best so far) and ratios.png (best policy against uniform)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [h["episode"] for h in history]
    rewards = [h["reward"] for h in history]
    best_so_far = [max(rewards[:i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(eps, rewards, ".", alpha=0.5, label="episode reward")
    ax.plot(eps, best_so_far, "-", label="best so far")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward.png", dpi=110)
    plt.close(fig)

    names = list(best)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [best[n] for n in names], 0.4, label="RL (kept)")
    ax.bar([x + 0.2 for x in xs], [uniform[n] for n in names], 0.4, label="uniform")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("pruning ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "ratios.png", dpi=110)
    plt.close(fig)


def pareto_plot(path: Path, candidates: list[dict], history: list[dict]) -> None:
    """Accuracy against FLOPs speed-up: every search episode (reward split, as searched) and the re-scored
    candidates by source (reward and select splits, built as kept), with the candidates' Pareto front.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([1 / h["flops_ratio"] for h in history], [h["acc"] for h in history], ".", color="0.7",
            label="search episodes (as searched)")
    for source in dict.fromkeys(c["source"] for c in candidates):
        mine = [c for c in candidates if c["source"] == source]
        ax.plot([1 / c["flops_ratio"] for c in mine], [c["acc"] for c in mine], "o", label=f"{source} (as kept)")
    front, best = [], -1.0
    for c in sorted(candidates, key=lambda c: -1 / c["flops_ratio"]):  # fastest first
        if c["acc"] > best:
            front.append(c)
            best = c["acc"]
    ax.step([1 / c["flops_ratio"] for c in front], [c["acc"] for c in front], "k--", where="post", lw=1,
            label="Pareto front")
    ax.set_xlabel("FLOPs speed-up (dense / pruned)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
