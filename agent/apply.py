"""``apply``: run a portable policy on a new model, with the budget enforced, and build the pruned model."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from agent.config import TrainConfig
from agent.outputs import add_latency, write_pruned
from agent.policy import PortablePolicy, load_policy
from agent.search import Search
from envs import FLOOR_METHODS, PruneEnv, evaluation_workers, floor_allocations, run_episode, select_best
from pruning_core import ImageData, LatencyBudget, PruningSession, SessionConfig, UserError, accuracy, kept_counts
from pruning_core.latency_table import check_max_latency
from pruning_core.session_config import refits_by_default

__all__ = ["apply_policy", "policy_ratios", "run_episode"]  # run_episode: from envs


def policy_ratios(policy: PortablePolicy | None, env: PruneEnv) -> tuple[dict[str, float], float, dict]:
    """Run one deterministic episode of ``policy`` on ``env``; return (ratios, reward, final info).

    With ``policy=None`` every action is 0, which the env maps to the uniform allocation.
    """
    reward, info = run_episode(env, policy.act if policy is not None else lambda _: np.zeros(1, np.float32))
    return dict(info["ratios"]), reward, info


def apply_policy(policy: str | Path | PortablePolicy, model: str | nn.Module, weights: str | None = None,
                 data: str | ImageData = "digits", flops: float | None = None, out: str | Path | None = None,
                 search_episodes: int = 0, finetune_epochs: int = 0, seed: int = 0, reward_images: int = 1000,
                 calib_batches: int = 10, round_to: int | None = None, progress: bool = False,
                 session: PruningSession | None = None, floor: tuple[str, ...] = FLOOR_METHODS,
                 sensitivity_points: int = 10, rescore_top: int = 5, select_images: int = 1000,
                 uniform_z: float = TrainConfig.uniform_z, latency: str | None = None, latency_batch: int = 1,
                 max_latency: float | None = None, reconstruct: bool | None = None,
                 reconstruct_final: bool | None = None, val_data: str | None = None,
                 inputs: dict | None = None, importance: str | None = None, workers: int = 1,
                 ray: str | None = None) -> dict:
    """Prune a new model with a learned policy and return the JSON report (``method: "rl-transfer"``).

    :param flops: FLOPs budget (default: the one the policy was trained for).
    :param search_episodes: fine-tune the policy on this model for K episodes first (a warm start); its
        episodes are candidates next to the policy's own episode.
    :param out: folder for the exported model and ``report.json``.
    :param round_to: round kept channels up to a multiple of this (default: the policy's own, as it was
        trained; 1 for no rounding).
    :param floor: cheap allocations scored beside the policy's (``envs.floor_allocations``); the best of all,
        built as the kept model is, is kept, and ``report["transfer"]["chosen"]`` names it.
    :param sensitivity_points: ratios per decision unit for the ``sensitivity`` floor method.
    :param rescore_top: re-score this many of the best candidates (policy, search episodes) with the floor on
        ``select_images`` more training images and keep the best over both splits, as ``train`` does.
    :param uniform_z: keep uniform unless the best candidate leads it there by more than this many standard errors of
        the paired difference (0: the best score); ``report["transfer"]["vs_uniform"]`` gives the lead.
    :param latency: a latency backend (:data:`pruning_core.latency.BACKENDS`): also time the pruned model
        against dense at ``latency_batch`` into ``report["latency"]``.
    :param max_latency: cap on predicted latency as a fraction of dense (default: the policy's own, with its
        backend and batch size; a latency table for the new model is measured on this machine first; 1: none).
    :param reconstruct: refit each candidate's layers to the dense model before adaptive BN
        (``SessionConfig.reconstruct``; default: as the policy was trained). Ignored when ``session`` is given.
    :param val_data: images the model was not trained on for the reward and select splits (a folder of class
        folders; default: the data's ``val/``, else training images). Ignored when ``session`` is given.
    :param inputs: more :class:`SessionConfig` fields for loading the model and data (device, image size,
        normalisation, head; ``agent.args.INPUT_SETTINGS``). Ignored when ``session`` is given.
    :param importance: channel criterion (:data:`pruning_core.importance.IMPORTANCES`; default: the one the policy
        was trained with). Ignored when ``session`` is given.
    :param reconstruct_final: refit the kept model that way before it is evaluated and exported (default: unless
        ``finetune_epochs`` fine-tunes it; :meth:`PruningSession.build_final`).
    :param workers: processes evaluating candidates in parallel (:func:`envs.evaluation_workers`), as Ray actors on
        the cluster ``ray`` names if given.
    """
    started = time.perf_counter()
    policy = load_policy(policy) if not isinstance(policy, PortablePolicy) else policy
    trained = policy.train_config
    flops, round_to, max_latency = _targets(trained, flops, round_to, max_latency, uniform_z)
    if session is None:
        session = _new_session(trained, model, weights, data, val_data, reconstruct, importance, inputs,
                               reward_images=reward_images, calib_batches=calib_batches, select_images=select_images,
                               seed=seed)
    env, budget = _transfer_env(policy, session, flops, round_to, max_latency, progress)
    refit = reconstruct_final if reconstruct_final is not None else refits_by_default(finetune_epochs)
    ratios, transfer = _choose(policy, env, flops, seed, search_episodes, refit, floor, sensitivity_points,
                               rescore_top, uniform_z, workers, ray, progress)
    pruned, report = _keep(session, ratios, round_to, refit, finetune_epochs, budget, seed, started, transfer,
                           progress)
    if latency:
        add_latency(report, session, pruned, latency, latency_batch)
    return write_pruned(out, pruned, report, session.data.input_shape) if out is not None else report


def _targets(trained: dict, flops: float | None, round_to: int | None, max_latency: float | None,
             uniform_z: float) -> tuple[float, int | None, float | None]:
    """The FLOPs budget, channel rounding and latency cap asked for, else the ones the policy was trained with (and
    a check of ``uniform_z``).
    """
    if uniform_z < 0:
        raise UserError(f"--uniform-z must be >= 0, got {uniform_z}")
    flops = flops if flops is not None else trained["flops"]
    round_to = round_to if round_to is not None else trained.get("round_to")
    max_latency = max_latency if max_latency is not None else trained.get("max_latency")
    if max_latency is not None:
        check_max_latency(max_latency)
    return flops, round_to, max_latency


def _new_session(trained: dict, model: str | nn.Module, weights: str | None, data: str | ImageData,
                 val_data: str | None, reconstruct: bool | None, importance: str | None, inputs: dict | None,
                 **settings: object) -> PruningSession:
    """Load the new model and its data, refitting and scoring as the policy was trained unless told otherwise."""
    reconstruct = reconstruct if reconstruct is not None else trained.get("reconstruct", False)
    return PruningSession(model, weights, data, SessionConfig(
        **settings, reconstruct=reconstruct, importance=importance or trained.get("importance", "taylor"),
        **(inputs or {})), val_data)


def _transfer_env(policy: PortablePolicy, session: PruningSession, flops: float, round_to: int | None,
                  max_latency: float | None, progress: bool) -> tuple[PruneEnv, LatencyBudget | None]:
    """The env the policy acts in on the new model (as it was trained), and its latency budget if it has one."""
    trained = policy.train_config
    budget = None
    if max_latency is not None and max_latency < 1.0:
        table = session.latency_table(trained.get("latency_backend", "onnxruntime"),
                                      trained.get("latency_batch", 1), progress)
        budget = LatencyBudget(table, max_latency)
    if trained.get("drop_blocks", False):
        session.drop_costs(progress=progress)
    env = PruneEnv(session=session, flops=flops, reward=trained["reward"], max_ratio=trained["max_ratio"],
                   round_to=round_to, max_nodes=max(policy.config["observation"]["max_nodes"],
                                                    len(session.trace.nodes)),
                   granularity=trained["granularity"], action_center=trained["action_center"], latency_budget=budget,
                   drop=trained.get("drop_blocks", False))
    return env, budget


def _choose(policy: PortablePolicy, env: PruneEnv, flops: float, seed: int, search_episodes: int, refit: bool,
            floor: tuple[str, ...], sensitivity_points: int, rescore_top: int, uniform_z: float, workers: int,
            ray: str | None, progress: bool) -> tuple[dict[str, float], dict]:
    """The policy's own allocation, a warm-started search's and the floor's, the best of them chosen as ``train``
    chooses; returns its ratios and the report's ``transfer`` fields.
    """
    zero_shot, reward, info = policy_ratios(policy, env)
    transfer = {"policy_model": policy.train_config["model"], "policy_algo": policy.config["algorithm"],
                "zero_shot_reward": reward, "zero_shot_acc_reward": info["acc"], "search_episodes": search_episodes,
                "reconstruct": env.session.config.reconstruct, "workers": workers, "ray": ray}
    with evaluation_workers(env, workers, ray):
        if search_episodes > 0:
            transfer.update(_warm_search(policy, env, flops, seed, search_episodes, workers, ray, progress))
        floor_kept = floor_allocations(env, floor, sensitivity_points, progress)
        kept, transfer["rescored"] = select_best(env, rescore_top, floor_kept, reconstruct=refit, uniform_z=uniform_z)
    transfer["floor"] = sorted(floor_kept)
    transfer["vs_uniform"] = kept.get("vs_uniform")
    ratios = kept["ratios"]
    transfer["chosen"] = kept["source"] if kept["source"] != "search" else "policy" if ratios == zero_shot else "search"
    return ratios, transfer


def _warm_search(policy: PortablePolicy, env: PruneEnv, flops: float, seed: int, search_episodes: int, workers: int,
                 ray: str | None, progress: bool) -> dict:
    """Search ``search_episodes`` episodes on the new model from the policy's weights; its ``transfer`` fields."""
    trained = policy.train_config
    config = replace(TrainConfig(), algo=policy.config["algorithm"], flops=flops, seed=seed,
                     max_ratio=trained["max_ratio"], reward=trained["reward"], warmup_episodes=0,
                     granularity=env.granularity, action_center=env.action_center,
                     noise_sigma=0.3, hidden=policy.config["network"]["extractor"]["hidden_channels"],
                     gnn_layers=policy.config["network"]["extractor"]["num_layers"],
                     net_arch=tuple(policy.config["network"]["hidden"]), progress=progress,
                     episodes=search_episodes, checkpoint_every=max(1, search_episodes), workers=workers,
                     ray=ray)
    search = Search(config, env)
    search.load_policy_weights(policy.state_dict())
    best = search.run(search_episodes)
    return {"search_best_reward": best["reward"], "search_s": round(search.search_s, 2)}


def _keep(session: PruningSession, ratios: dict[str, float], round_to: int | None, refit: bool,
          finetune_epochs: int, budget: LatencyBudget | None, seed: int, started: float, transfer: dict,
          progress: bool) -> tuple[nn.Module, dict]:
    """Build (and fine-tune) the kept model; return it with its ``rl-transfer`` report."""
    pruned, built = session.build_final(ratios, round_to, refit, finetune_epochs)
    acc_before = None  # the report's acc unless fine-tuned
    if finetune_epochs > 0:
        acc_before = accuracy(pruned, session.splits.test)
        pruned = session.finetune(pruned, finetune_epochs, progress=progress)
    if budget is not None:
        transfer["latency_budget"] = budget.report(session.trace, kept_counts(session.trace, ratios, round_to))
    report = session.report(pruned, ratios, "rl-transfer", seed, time.perf_counter() - started, round_to=round_to,
                            acc_before_finetune=acc_before, finetune_epochs=finetune_epochs, transfer=transfer,
                            **built)
    return pruned, report
