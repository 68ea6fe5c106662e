"""The ``train``, ``export``, ``apply`` and ``demo`` subcommands: thin layers over the Python API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from agent.args import (
    DATA_HELP,
    MODEL_HELP,
    RAY_HELP,
    ROUND_TO_HELP,
    WORKERS_HELP,
    add_input_args,
    add_output_args,
    check_flops,
    input_settings,
    positive_int,
    round_to_arg,
)
from agent.config import ALGOS, PRESETS, WARM_STARTS, TrainConfig
from agent.outputs import print_report
from envs import ACTION_CENTERS, FLOOR_METHODS, GRANULARITIES, REWARDS
from pruning_core import UserError
from pruning_core.importance import IMPORTANCES
from pruning_core.latency import BACKENDS

_DEFAULTS = TrainConfig()


def floor_arg(value: str) -> tuple[str, ...]:
    """``--floor``: comma-separated floor methods, or ``none``."""
    if value == "none":
        return ()
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in methods if m not in FLOOR_METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"use any of {', '.join(FLOOR_METHODS)}, comma-separated, or none")
    return methods


def _preset_help() -> str:
    def flags(settings: dict) -> str:
        return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()) or "the defaults"
    return "named budget; flags given beside it win. " + "; ".join(f"{n}: {flags(s)}" for n, s in PRESETS.items())


# train's flags beyond the main ones: (field, type or choices, one-line help); shown by --help-all
EXPERT_FLAGS = (
    ("algo", ALGOS, "SB3 algorithm"),
    ("granularity", GRANULARITIES, "one decision per stage, per stage and downsampling block, or per channel group"),
    ("action_center", ACTION_CENTERS, "the ratio action 0 means"),
    ("reward", REWARDS, "what an episode's reward measures"),
    ("max_ratio", float, "largest pruning ratio of any one group"),
    ("floor", "methods", "cheap allocations re-scored beside the search's best: comma-separated, or none"),
    ("warm_start", WARM_STARTS, "where PPO starts its search"),
    ("sensitivity_points", int, "ratios per decision unit in the sensitivity table"),
    ("latency_backend", BACKENDS, "backend the latency table (--max-latency) is measured in"),
    ("latency_batch", int, "batch size of that latency table"),
    ("importance", IMPORTANCES, "channel ranking: first- or second-order Taylor, L1 or DRIVE's dual-gradient metric"),
    ("reward_images", int, "images in the reward split"),
    ("select_images", int, "more images on which the best candidates are re-scored"),
    ("rescore_top", int, "best distinct candidates re-scored at the end"),
    ("uniform_z", float, "keep uniform unless the best candidate leads it by this many standard errors"),
    ("calib_batches", int, "batches of 64 training images for adaptive BN"),
    ("reconstruct", bool, "score every candidate with the least-squares refit"),
    ("reconstruct_final", bool, "refit the kept model (default: unless fine-tuned)"),
    ("warmup_episodes", int, "random episodes before learning"),
    ("init_std", float, "PPO's initial action std"),
    ("sde", bool, "PPO explores with state-dependent noise"),
    ("reexplore", bool, "PPO widens again after rollouts that only repeat evaluated allocations"),
    ("clone_warmup", bool, "PPO starts from its best warm-up episode even without a warm start"),
    ("repeat_penalty", float, "taken off the reward of an episode that repeats an evaluated allocation"),
    ("baseline", bool, "subtract a moving average from final rewards"),
    ("noise_sigma", float, "DDPG/TD3 exploration noise std"),
    ("noise_decay", float, "its decay per episode"),
    ("hidden", int, "GNN hidden channels"),
    ("gnn_layers", int, "GNN layers"),
    ("learning_rate", float, "learning rate"),
    ("batch_size", int, "DDPG/TD3/SAC minibatch size"),
    ("gradient_steps", int, "DDPG/TD3/SAC updates per episode"),
    ("rollout_episodes", int, "PPO episodes per update, evaluated together by the --workers"),
    ("screen", int, "PPO proposals per evaluation, screened by a reward model (1: evaluate all)"),
    ("table_prior", bool, "the screen's reward model starts from the sensitivity table's additive prediction"),
    ("checkpoint_every", int, "episodes between checkpoints"),
    ("max_nodes", int, "observation padding (grown to fit the model)"),
)


class _HelpAll(argparse.Action):
    """``--help-all``: show the expert flags too, then exit."""

    def __init__(self, option_strings, dest, hidden: dict | None = None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.hidden = hidden if hidden is not None else {}

    def __call__(self, parser, namespace, values, option_string=None):
        for action, text in self.hidden.items():
            action.help = text
        parser.print_help()
        parser.exit()


def _default(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    value = ",".join(value) if isinstance(value, tuple) else value
    return "" if value is None else f" (default: {value})".replace("%", "%%")


def train_command_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="search a sparsity policy with RL on one model", usage="prunepilot train [options]",
        description="Search per-stage pruning ratios with the GNN agent under a FLOPs (and latency) budget, keep the "
                    "best candidate beside uniform, global and sensitivity allocations, and export it. The run is "
                    "checkpointed as it goes; --resume continues it exactly.")
    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="RUN_DIR", help="new or empty folder for the run" + _default("out"))
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--redo-finish", action="store_true", help="with --resume: rebuild a finished run's kept model")
    run.add_argument("--json", action="store_true", help="print the final JSON report on stdout")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    problem = p.add_argument_group("model, data and budget")
    problem.add_argument("--model", help=MODEL_HELP + " (required unless --resume)")
    problem.add_argument("--weights", help="state_dict file of the trained model (read with weights_only)")
    problem.add_argument("--data", help=DATA_HELP + _default("data"))
    problem.add_argument("--val-data", metavar="DIR",
                         help="class folders the model was not trained on, to score candidates (default: the "
                              "data's val/, else training images)")
    add_input_args(problem)
    problem.add_argument("--flops", type=float, help="FLOPs budget as a fraction of dense" + _default("flops"))
    problem.add_argument("--max-latency", type=float, metavar="F",
                         help="also keep latency within F of dense, as a table measured on this machine predicts")
    search = p.add_argument_group("search")
    search.add_argument("--preset", choices=PRESETS, help=_preset_help())
    search.add_argument("--episodes", type=int, help="episodes to run" + _default("episodes"))
    search.add_argument("--evaluations", type=int,
                        help="evaluate at most this many distinct pruned models, the floor's included")
    search.add_argument("--workers", type=positive_int, metavar="N", help=WORKERS_HELP)
    search.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    search.add_argument("--seed", type=int, help="random seed (also draws the image splits)" + _default("seed"))
    search.add_argument("--round-to", type=round_to_arg, metavar="N|auto", help=ROUND_TO_HELP)
    search.add_argument("--drop-blocks", action=argparse.BooleanOptionalAction,
                        help="let the agent remove whole residual blocks, cheapest first")
    search.add_argument("--finetune-epochs", type=int, help="fine-tune the kept model with KD from dense (default: 0)")
    expert = p.add_argument_group("expert (shown by --help-all)")
    hidden = {}
    for name, kind, text in EXPERT_FLAGS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            action = expert.add_argument(flag, action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
        elif kind == "methods":
            action = expert.add_argument(flag, type=floor_arg, metavar="METHODS", help=argparse.SUPPRESS)
        elif isinstance(kind, tuple):
            action = expert.add_argument(flag, choices=kind, help=argparse.SUPPRESS)
        else:
            action = expert.add_argument(flag, type=kind, help=argparse.SUPPRESS)
        hidden[action] = text + _default(name)
    p.add_argument("--help-all", action=_HelpAll, hidden=hidden, help="show the expert flags too")
    p.set_defaults(func=train_command)


RESUME_MAY_CHANGE = ("episodes", "evaluations", "device", "loader_workers", "workers", "ray")


def train_command(args: argparse.Namespace) -> dict:
    from agent.train import resume, train
    if args.resume:
        given = [f.name for f in fields(TrainConfig) if f.name not in RESUME_MAY_CHANGE
                 and getattr(args, f.name, None) is not None]
        if given:
            raise UserError(f"--resume continues a run with its own settings; drop "
                            f"{', '.join('--' + g.replace('_', '-') for g in given)} (only "
                            f"{', '.join('--' + g.replace('_', '-') for g in RESUME_MAY_CHANGE)} may change)")
        report = resume(args.resume, episodes=args.episodes, progress=not args.no_progress and None,
                        evaluations=args.evaluations, redo_finish=args.redo_finish, device=args.device,
                        loader_workers=args.loader_workers, workers=args.workers, ray=args.ray)
    else:
        if args.redo_finish:
            raise UserError("--redo-finish goes with --resume RUN_DIR")
        if not args.model:
            raise UserError("--model is required (or --resume RUN_DIR)")
        overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                     if getattr(args, f.name, None) is not None}
        overrides["progress"] = not args.no_progress
        report = train(**overrides)
    print_report(report, args.json)
    return report


def export_command_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a training run's policy as a portable file",
                              description="Export the learned policy of RUN_DIR as safetensors weights plus a "
                                          "JSON config (a folder, or a .zip if OUT ends in .zip). Loading it "
                                          "never unpickles; a corrupted or foreign file fails with a clear message.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by prunepilot train")
    p.add_argument("--out", required=True, metavar="POLICY", help="policy folder or .zip to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing policy at --out")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> Path:
    from agent.outputs import check_out
    from agent.policy import export_policy, load_policy
    check_out(args.out, args.overwrite, file=args.out.endswith(".zip"))
    path = export_policy(args.run_dir, args.out)
    load_policy(path)  # prove it loads before saying so
    print(f"wrote policy {path}")
    return path


def apply_command_parser(subparsers) -> None:
    p = subparsers.add_parser("apply", help="prune a new model with a learned policy",
                              description="Run a policy deterministically on a new model's layer graph with "
                                          "the FLOPs budget enforced, prune with Taylor scores, recalibrate BN, "
                                          "optionally fine-tune, and export the model with a JSON report. "
                                          "--search-episodes K first fine-tunes the policy on the new model.")
    p.add_argument("policy", metavar="POLICY", help="policy folder or .zip from prunepilot export")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", help="checkpoint of the new model")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--val-data", metavar="DIR", help="folder of class folders the model was not trained on, for the "
                   "reward and select images (default: the data's val/, else training images)")
    add_input_args(p)
    p.add_argument("--flops", type=float, help="FLOPs budget (default: the policy's own)")
    p.add_argument("--search-episodes", type=int, default=0,
                   help="episodes of RL fine-tuning on the new model before applying (default: 0, zero-shot)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N", help=WORKERS_HELP)
    p.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    p.add_argument("--round-to", type=round_to_arg, default=None,
                   help=ROUND_TO_HELP + " (default: the policy's own; 1: none)")
    p.add_argument("--reward-images", type=int, default=1000, help="training images in the reward split")
    p.add_argument("--calib-batches", type=int, default=10, help="batches of 64 images for adaptive BN")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--floor", type=floor_arg, default=FLOOR_METHODS, metavar="METHODS",
                   help="cheap allocations scored beside the policy's, comma-separated or none; the best is kept "
                        f"and the report's transfer.chosen names it (default: {','.join(FLOOR_METHODS)})")
    p.add_argument("--sensitivity-points", type=positive_int, default=10,
                   help="ratios per decision unit for the sensitivity floor method (default: 10)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the pruned model's layers to the dense model by least squares before adaptive BN, "
                        "in every candidate it scores (default: as the policy was trained)")
    p.add_argument("--reconstruct-final", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the kept model that way before it is evaluated and exported (default: on unless "
                        "--finetune-epochs fine-tunes it; the report's acc_before_reconstruct is the same "
                        "allocation without the refit)")
    p.add_argument("--importance", choices=IMPORTANCES,
                   help="channel ranking: taylor, taylor2, l1 or drive (default: the policy's own)")
    p.add_argument("--rescore-top", type=int, default=5,
                   help="best distinct candidates re-scored beside the floor (default: 5)")
    p.add_argument("--select-images", type=int, default=1000,
                   help="more images on which the candidates are re-scored (default: 1000)")
    p.add_argument("--uniform-z", type=float, default=TrainConfig.uniform_z, metavar="Z",
                   help="keep uniform unless the best candidate leads it on those images by more than Z standard "
                        f"errors of the paired difference (default: {TrainConfig.uniform_z:g}; 0: the best score)")
    p.add_argument("--max-latency", type=float, default=None,
                   help="cap on predicted latency as a fraction of dense, from a latency table measured for the new "
                        "model on this machine with the policy's backend and batch size (default: the policy's "
                        "own --max-latency, if it was trained with one; 1: none)")
    add_output_args(p, out_required=True, adapt_bn=False)  # the policy's reward always recalibrated BN
    p.set_defaults(func=apply_command)


def apply_command(args: argparse.Namespace) -> dict:
    from agent.apply import apply_policy
    from agent.outputs import check_out
    check_flops(args.flops)
    check_out(args.out, args.overwrite)
    report = apply_policy(args.policy, args.model, args.weights, args.data, flops=args.flops, out=args.out,
                          inputs=input_settings(args),
                          val_data=args.val_data,
                          search_episodes=args.search_episodes, finetune_epochs=args.finetune_epochs,
                          seed=args.seed, reward_images=args.reward_images, calib_batches=args.calib_batches,
                          round_to=args.round_to, progress=sys.stderr.isatty(), floor=args.floor,
                          sensitivity_points=args.sensitivity_points,
                          rescore_top=args.rescore_top, select_images=args.select_images,
                          uniform_z=args.uniform_z,
                          latency=args.latency, latency_batch=args.latency_batch, max_latency=args.max_latency,
                          reconstruct=args.reconstruct, reconstruct_final=args.reconstruct_final,
                          importance=args.importance, workers=args.workers, ray=args.ray)
    print_report(report, args.json)
    return report


def demo_command_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the built-in end-to-end job on scikit-learn's digits",
                              description="Train a digits CNN with an 8-channel layer between wide ones, train the "
                                          "agent at 25%% FLOPs, export the policy, apply it to a deeper CNN of the "
                                          "same kind, and print dense, uniform and the search side by side with "
                                          "measured speed-ups. Needs no files; about a minute on 2 cores.")
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")
    p.add_argument("--episodes", type=int, default=60, help="agent episodes (default: 60)")
    p.add_argument("--flops", type=float, default=0.25, help="FLOPs budget (default: 0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> list[dict]:
    from agent.demo import run_demo
    return run_demo(args.out, episodes=args.episodes, flops=args.flops, seed=args.seed)
