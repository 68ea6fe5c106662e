"""The ``prunepilot`` command line: ``prune``, ``train``, ``export`` and ``apply``.

Each subcommand is a pair: ``<name>_command_parser(subparsers)`` declares its flags and
``<name>_command(args)`` runs it through the Python API. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from agent.outputs import add_latency, check_out, print_report, write_pruned
from pruning_core import (
    LatencyBudget,
    PruningSession,
    SessionConfig,
    UserError,
    accuracy,
    global_ratios,
    kept_counts,
    uniform_ratios,
)
from pruning_core.errors import Interrupted
from pruning_core.latency import BACKENDS, check_max_latency, cpu_channel_block
from pruning_core.prune import check_ratios
from pruning_core.session import refits_by_default

log = logging.getLogger("prunepilot")

SEARCH_METHODS = ("centre", "sensitivity", "random")  # found in the agent's action space
PRUNE_METHODS = ("uniform", "global", "l1-uniform", *SEARCH_METHODS)

ROUND_TO_HELP = ("round kept channels up to a multiple of this; auto: this CPU's conv channel block (16 with "
                 "AVX-512, else 8), the widths its kernels run without padding")


def round_to_arg(value: str) -> int:
    """``--round-to``: a whole number >= 1, or ``auto`` for this CPU's channel block (:func:`cpu_channel_block`),
    resolved here so that reports and saved configs record the number.
    """
    if value == "auto":
        return cpu_channel_block()
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {value!r}")
    n = int(value)
    if n & (n - 1):
        log.warning("--round-to %d is not a power of two: CPU conv kernels run channels in blocks of 8 or 16 "
                    "(--round-to auto picks this CPU's), so widths in multiples of %d save no time there", n, n)
    return n


def add_model_args(p: argparse.ArgumentParser, data_default: str | None = None) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", required=True,
                   help="zoo name (resnet20/32/44/56/110, vgg11_bn, vgg16_bn, mobilenetv2, digits_cnn, "
                        "digits_cnn_wide) or package.module:factory")
    p.add_argument("--weights", help="checkpoint: a state_dict or {'state_dict': ...}, loaded with weights_only=True")
    default_note = f" (default: {data_default})" if data_default else ""
    p.add_argument("--data", required=data_default is None, default=data_default,
                   help="cifar10:DIR, imagefolder:DIR or digits" + default_note)
    p.add_argument("--val-data", metavar="DIR",
                   help="folder of class folders the model was not trained on: the reward and select images that "
                        "searches score on (default: the data's val/ folder if it has one, else training images)")
    add_normalisation_args(p)
    p.add_argument("--flops", type=float, default=0.5, help="FLOPs budget as a fraction of dense (default: 0.5)")
    p.add_argument("--max-ratio", type=float, default=0.8,
                   help="largest pruning ratio of any one group (default: 0.8)")
    p.add_argument("--round-to", type=round_to_arg, default=None, help=ROUND_TO_HELP)
    p.add_argument("--reward-images", type=int, default=1000,
                   help="training images in the reward split (default: 1000)")
    p.add_argument("--calib-batches", type=int, default=10,
                   help="batches of 64 training images for adaptive BN (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_output_args(p: argparse.ArgumentParser, out_required: bool = False, adapt_bn: bool = True) -> None:
    if adapt_bn:
        p.add_argument("--adapt-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="recalibrate BN statistics on training images after pruning (default: on)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="epochs of fine-tuning with KD from the dense model after pruning (default: 0)")
    p.add_argument("--out", required=out_required,
                   help="folder for report.json and the exported model (model.pt2, model.onnx)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing only the files this command writes")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--latency", choices=BACKENDS, metavar="BACKEND",
                   help="also time the pruned model against dense on this CPU, in pairs (median of 5), and add "
                        "report['latency']: torch (eager), torch-cl (eager with Conv+BN folded, channels-last: "
                        f"usually the fastest PyTorch form) or onnxruntime. One of: {', '.join(BACKENDS)}")
    p.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for --latency (default: 1)")


def floats_arg(text: str) -> tuple[float, ...]:
    """Argparse type: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers") from None


def add_normalisation_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--mean, --std, --scale: how pixels (0-255) become the model's input, as (pixel * scale - mean) / std."""
    note = " (default: the data set's; ImageNet's for cifar10 and image folders)" if defaults else ""
    p.add_argument("--mean", type=floats_arg, metavar="M[,M,M]", help="per-channel mean" + note)
    p.add_argument("--std", type=floats_arg, metavar="S[,S,S]", help="per-channel std" + note)
    p.add_argument("--scale", type=float, help="factor from 0-255 pixels to the model's range (default: 1/255)")


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_flops(flops: float | None) -> None:
    """``--flops``, when given, must be a fraction of dense in (0, 1]."""
    if flops is not None and not 0.0 < flops <= 1.0:
        raise UserError(f"--flops {flops} must be in (0, 1]")


def session_config(args: argparse.Namespace, importance: str = "taylor") -> SessionConfig:
    """The session settings of a command's flags, checked (with ``--flops`` and ``--out``) before anything loads."""
    check_flops(args.flops)
    if args.out:
        check_out(args.out, args.overwrite)
    if not 0.0 <= args.max_ratio < 1.0:
        raise UserError(f"--max-ratio {args.max_ratio} must be in [0, 1)")
    if args.reconstruct and not args.adapt_bn:
        raise UserError("--reconstruct fits each layer to the inputs that adaptive BN gives it; drop --no-adapt-bn")
    return SessionConfig(reward_images=args.reward_images, calib_batches=args.calib_batches, seed=args.seed,
                         importance=importance, mean=args.mean, std=args.std, scale=args.scale)


def finish(session: PruningSession, model, ratios: dict[str, float], method: str, args: argparse.Namespace,
           started: float, **extra: object) -> dict:
    """Fine-tune if asked, evaluate, write ``--out`` and print the report: the last steps every command shares."""
    acc_before = None
    if args.finetune_epochs > 0:
        acc_before = accuracy(model, session.splits.test)
        log.info("fine-tuning %d epochs with KD from the dense model", args.finetune_epochs)
        session.finetune(model, args.finetune_epochs, progress=sys.stderr.isatty())
    t = time.perf_counter()
    report = session.report(model, ratios, method, args.seed, time.perf_counter() - started,
                            round_to=args.round_to, acc_before_finetune=acc_before,
                            finetune_epochs=args.finetune_epochs, adapt_bn=args.adapt_bn, **extra)
    if "timings" in report:  # evaluation of the test and reward splits
        report["timings"]["eval_s"] = time.perf_counter() - t
    if args.latency:
        add_latency(report, session, model, args.latency, args.latency_batch)
    if args.out:
        write_pruned(args.out, model, report, session.data.input_shape)
    print_report(report, args.json)
    if args.out and not args.json:
        print(f"wrote {args.out}/report.json and the exported model")
    return report


def prune_command_parser(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune once with a fixed allocation (no search)",
                              description="Prune a trained CNN to a FLOPs budget with uniform ratios, Taylor "
                                          "global ranking, L1-uniform, or a ratios JSON file; recalibrate BN; "
                                          "evaluate on the test split; optionally fine-tune and export.")
    add_model_args(p)
    p.add_argument("--method", choices=PRUNE_METHODS, default="uniform",
                   help="allocation: uniform Taylor ratios, Taylor global ranking, uniform with L1 ranking, the "
                        "per-stage centre, AIMET-style greedy sensitivity selection, or random search "
                        "(default: uniform)")
    p.add_argument("--sensitivity-points", type=positive_int, default=10,
                   help="--method sensitivity: ratios measured per stage (one evaluation each; default: 10)")
    p.add_argument("--evaluations", type=positive_int, default=120,
                   help="--method random: distinct allocations to evaluate (default: 120)")
    p.add_argument("--ratios", help="JSON file {group: ratio} to use instead of --method")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="before adaptive BN, refit every conv and linear layer by least squares to the dense "
                        "model's outputs on 256 calibration images (He et al. 2017): a second or two, no labels; "
                        "ResNet-56 at 50%% FLOPs, uniform: 79.15%% -> 88.20%% test accuracy before fine-tuning "
                        "(default: on unless --finetune-epochs fine-tunes the model or --no-adapt-bn; the "
                        "report's acc_before_reconstruct is the same allocation without the refit)")
    p.add_argument("--max-latency", type=float, default=None,
                   help="also keep the latency predicted by a table of this machine's per-layer timings within "
                        "this fraction of dense; the table times the --latency backend (default: onnxruntime) at "
                        "--latency-batch (pair it with --round-to auto: 8, or 16 on an AVX-512 CPU)")
    add_output_args(p)
    p.set_defaults(func=prune_command)


def prune_command(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.max_latency is not None:
        if args.ratios:
            raise UserError("--max-latency shapes a --method allocation; a --ratios file is used as it is")
        check_max_latency(args.max_latency)
    config = session_config(args, "l1" if args.method == "l1-uniform" else "taylor")
    # a search scores its candidates as the kept model is built: refitted unless it will be fine-tuned
    config.reconstruct = args.method in SEARCH_METHODS and args.reconstruct is not False and \
        refits_by_default(args.finetune_epochs, args.adapt_bn)
    session = PruningSession(args.model, args.weights, args.data, config, args.val_data)
    budget, extra = None, {}
    if args.max_latency is not None:
        from agent.train import measure_latency_table
        table = measure_latency_table(session, args.latency or "onnxruntime", args.latency_batch,
                                      sys.stderr.isatty())
        budget = LatencyBudget(table, args.max_latency)
    if args.ratios:
        path = Path(args.ratios)
        try:
            ratios = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read ratios file {path}: {e}") from e
        if not isinstance(ratios, dict):
            raise UserError(f"{path} must hold a JSON object {{group: ratio}}")
        ratios = ratios.get("ratios", ratios)
        check_ratios(session.trace, ratios)
        method = "ratios-file"
    elif args.method in SEARCH_METHODS:
        ratios, method, extra["search"] = search_allocation(session, args, budget)
    elif args.method == "global":
        ratios, method = global_ratios(session.trace, session.scores, args.flops, args.max_ratio,
                                       args.round_to, budget), "global"
    else:
        ratios, method = uniform_ratios(session.trace, args.flops, args.max_ratio, args.round_to,
                                        budget), args.method
    if budget is not None:
        extra["latency_budget"] = budget.report(session.trace, kept_counts(session.trace, ratios, args.round_to))
    timings = dict(session.timings)
    model, built = session.build_final(ratios, args.round_to, args.reconstruct, args.finetune_epochs,
                                       adapt=args.adapt_bn, timings=timings)
    return finish(session, model, ratios, method, args, started, timings=timings, **built, **extra)


def search_allocation(session: PruningSession, args: argparse.Namespace,
                      budget: LatencyBudget | None) -> tuple[dict[str, float], str, dict]:
    """The allocation of ``--method`` centre, sensitivity or random, found in the agent's action space (one step per
    stage, its downsampling group apart) with the same reward split; returns (ratios, method, search report).
    """
    from envs import PruneEnv, centre_allocation, random_search, select_best, sensitivity_search
    env = PruneEnv(session=session, flops=args.flops, max_ratio=args.max_ratio, round_to=args.round_to,
                   latency_budget=budget, max_nodes=len(session.trace.nodes))
    progress = sys.stderr.isatty()
    t = time.perf_counter()
    report: dict[str, object] = {}
    if args.method == "centre":
        ratios = env.evaluate(centre_allocation(env))[1]["ratios"]
    elif args.method == "sensitivity":
        found = sensitivity_search(env, args.sensitivity_points, progress)
        ratios = found["ratios"]
        report.update(threshold=found["threshold"], table=found["table"])
    else:  # the best of its top 5 re-scored as the kept model is built, as train keeps its own
        random_search(env, 100 * args.evaluations, args.seed, args.evaluations, progress)
        best, report["rescored"] = select_best(env, 5)  # scored as the session builds: as the kept model is
        ratios = best["ratios"]
    report.update(evaluations=len(env.cache), search_s=round(time.perf_counter() - t, 2))
    return dict(ratios), args.method, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunepilot",
        description="AutoML channel pruning: learn per-layer pruning ratios with a graph-embedded RL agent, "
                    "remove channels for real, and transfer the learned policy to new models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prune_command_parser(sub)
    from agent.commands import apply_command_parser, demo_command_parser, export_command_parser, train_command_parser
    train_command_parser(sub)
    export_command_parser(sub)
    apply_command_parser(sub)
    demo_command_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except UserError as e:
        print(f"prunepilot {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"prunepilot {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        hint = (f"; continue from its last checkpoint with: prunepilot train --resume {out}"
                if args.command == "train" and out and (Path(out) / "config.json").is_file() else "")
        print(f"prunepilot {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
