"""The ``train``, ``export``, ``apply`` and ``demo`` subcommands: thin layers over the Python API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from agent.cli import ROUND_TO_HELP, add_normalisation_args, check_flops, positive_int, round_to_arg
from agent.config import ALGOS, WARM_STARTS, TrainConfig
from agent.outputs import print_report
from envs import ACTION_CENTERS, FLOOR_METHODS, GRANULARITIES, REWARDS
from pruning_core import UserError
from pruning_core.data import load_data
from pruning_core.latency import BACKENDS

_DEFAULTS = TrainConfig()


def _field_help(name: str) -> str:
    """The TrainConfig field docstring, so --help and the dataclass never disagree (``%`` escaped for argparse)."""
    import ast
    import inspect
    src = inspect.getsource(TrainConfig)
    body = ast.parse(src).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and node.target.id == name and isinstance(nxt, ast.Expr):
            return f"{nxt.value.value} (default: {getattr(_DEFAULTS, name)})".replace("%", "%%")
    return f"(default: {getattr(_DEFAULTS, name)})".replace("%", "%%")


def floor_arg(value: str) -> tuple[str, ...]:
    """``--floor``: comma-separated floor methods, or ``none``."""
    if value == "none":
        return ()
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in methods if m not in FLOOR_METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"use any of {', '.join(FLOOR_METHODS)}, comma-separated, or none")
    return methods


def train_command_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="search a sparsity policy with RL on one model",
        description="Train the GNN-embedded RL agent to pick pruning ratios (per stage, or per channel group) "
                    "under a FLOPs budget. The best episode is saved as it is found; agent, replay buffer, "
                    "counters and random states are checkpointed every --checkpoint-every episodes (and on "
                    "Ctrl-C), and --resume RUN_DIR continues exactly as the run would have. At the end the best "
                    "candidates are re-scored on --select-images more training images, and the one kept is "
                    "evaluated on the test split and exported.")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--redo-finish", action="store_true",
                   help="with --resume on a finished run: re-score and rebuild its kept model")
    p.add_argument("--model", help="zoo name or package.module:factory " + _field_help("model"))
    p.add_argument("--weights", help=_field_help("weights"))
    p.add_argument("--data", help=_field_help("data"))
    p.add_argument("--val-data", metavar="DIR", help=_field_help("val_data"))
    add_normalisation_args(p)
    p.add_argument("--algo", choices=ALGOS, help=_field_help("algo"))
    p.add_argument("--reward", choices=REWARDS, help=_field_help("reward"))
    p.add_argument("--granularity", choices=GRANULARITIES, help=_field_help("granularity"))
    p.add_argument("--action-center", choices=ACTION_CENTERS, help=_field_help("action_center"))
    p.add_argument("--latency-backend", choices=BACKENDS, help=_field_help("latency_backend"))
    p.add_argument("--floor", type=floor_arg, metavar="METHODS",
                   help="comma-separated, or none: " + _field_help("floor"))
    p.add_argument("--warm-start", choices=WARM_STARTS, help=_field_help("warm_start"))
    for name, typ in (("flops", float), ("episodes", int), ("evaluations", int), ("seed", int), ("max_ratio", float),
                      ("round_to", round_to_arg),
                      ("max_latency", float), ("latency_batch", int), ("sensitivity_points", int),
                      ("reward_images", int), ("calib_batches", int), ("rescore_top", int), ("select_images", int),
                      ("warmup_episodes", int),
                      ("noise_sigma", float), ("noise_decay", float), ("init_std", float), ("repeat_penalty", float),
                      ("hidden", int),
                      ("gnn_layers", int),
                      ("learning_rate", float), ("batch_size", int), ("gradient_steps", int),
                      ("checkpoint_every", int), ("max_nodes", int), ("finetune_epochs", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=_field_help(name))
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, help=_field_help("baseline"))
    p.add_argument("--sde", action=argparse.BooleanOptionalAction, help=_field_help("sde"))
    p.add_argument("--clone-warmup", action=argparse.BooleanOptionalAction, help=_field_help("clone_warmup"))
    p.add_argument("--reexplore", action=argparse.BooleanOptionalAction, help=_field_help("reexplore"))
    p.add_argument("--drop-blocks", action=argparse.BooleanOptionalAction, help=_field_help("drop_blocks"))
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, help=_field_help("reconstruct"))
    p.add_argument("--reconstruct-final", action=argparse.BooleanOptionalAction,
                   help=_field_help("reconstruct_final").replace("(default: None)", "(default: on unless fine-tuned)"))
    p.add_argument("--out", help="run folder " + _field_help("out"))
    p.add_argument("--json", action="store_true", help="print the final JSON report on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> dict:
    from agent.train import resume, train
    if args.resume:
        given = [f.name for f in fields(TrainConfig) if f.name not in ("episodes", "evaluations")
                 and getattr(args, f.name, None) is not None]
        if given:
            raise UserError(f"--resume continues a run with its own settings; drop {', '.join('--' + g for g in given)}"
                            " (only --episodes and --evaluations may change)")
        report = resume(args.resume, episodes=args.episodes, progress=not args.no_progress and None,
                        evaluations=args.evaluations, redo_finish=args.redo_finish)
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
    from agent.cli import add_output_args
    p = subparsers.add_parser("apply", help="prune a new model with a learned policy",
                              description="Run a policy deterministically on a new model's layer graph with "
                                          "the FLOPs budget enforced, prune with Taylor scores, recalibrate BN, "
                                          "optionally fine-tune, and export the model with a JSON report. "
                                          "--search-episodes K first fine-tunes the policy on the new model.")
    p.add_argument("policy", metavar="POLICY", help="policy folder or .zip from prunepilot export")
    p.add_argument("--model", required=True, help="zoo name or package.module:factory")
    p.add_argument("--weights", help="checkpoint of the new model")
    p.add_argument("--data", required=True, help="cifar10:DIR, imagefolder:DIR or digits")
    p.add_argument("--val-data", metavar="DIR", help="folder of class folders the model was not trained on, for the "
                   "reward and select images (default: the data's val/, else training images)")
    add_normalisation_args(p)
    p.add_argument("--flops", type=float, help="FLOPs budget (default: the policy's own)")
    p.add_argument("--search-episodes", type=int, default=0,
                   help="episodes of RL fine-tuning on the new model before applying (default: 0, zero-shot)")
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
    p.add_argument("--rescore-top", type=int, default=5, help=_field_help("rescore_top"))
    p.add_argument("--select-images", type=int, default=1000, help=_field_help("select_images"))
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
    data = args.data
    if (args.mean, args.std, args.scale) != (None, None, None):
        data = load_data(data).normalised(args.mean, args.std, args.scale)
    report = apply_policy(args.policy, args.model, args.weights, data, flops=args.flops, out=args.out,
                          val_data=args.val_data,
                          search_episodes=args.search_episodes, finetune_epochs=args.finetune_epochs,
                          seed=args.seed, reward_images=args.reward_images, calib_batches=args.calib_batches,
                          round_to=args.round_to, progress=sys.stderr.isatty(), floor=args.floor,
                          sensitivity_points=args.sensitivity_points,
                          rescore_top=args.rescore_top, select_images=args.select_images,
                          latency=args.latency, latency_batch=args.latency_batch, max_latency=args.max_latency,
                          reconstruct=args.reconstruct, reconstruct_final=args.reconstruct_final)
    print_report(report, args.json)
    return report


def demo_command_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the built-in end-to-end job on scikit-learn's digits",
                              description="Train a small CNN on digits, train the agent at 50%% FLOPs, export "
                                          "the policy, apply it to a differently shaped CNN, and print dense, "
                                          "uniform and RL side by side. Needs no files; a few minutes on 2 cores.")
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")
    p.add_argument("--episodes", type=int, default=60, help="agent episodes (default: 60)")
    p.add_argument("--flops", type=float, default=0.5, help="FLOPs budget (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> list[dict]:
    from agent.demo import run_demo
    return run_demo(args.out, episodes=args.episodes, flops=args.flops, seed=args.seed)
