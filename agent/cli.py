"""The ``prunepilot`` command line: ``prune``, ``train``, ``export``, ``apply``, ``finetune`` and ``demo``.

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

from agent.args import (
    RAY_HELP,
    WORKERS_HELP,
    add_model_args,
    add_output_args,
    check_flops,
    input_settings,
    positive_int,
)
from agent.commands import apply_command_parser, demo_command_parser, export_command_parser, train_command_parser
from agent.finetune import finetune_command_parser
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
from pruning_core.importance import IMPORTANCES
from pruning_core.latency_table import check_max_latency
from pruning_core.prune import check_ratios
from pruning_core.session_config import refits_by_default

log = logging.getLogger("prunepilot")

SEARCH_METHODS = ("centre", "sensitivity", "random")  # found in the agent's action space
PRUNE_METHODS = ("uniform", "global", "l1-uniform", *SEARCH_METHODS)

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
                         importance=importance, **input_settings(args))


def finish(session: PruningSession, model, ratios: dict[str, float], method: str, args: argparse.Namespace,
           started: float, **extra: object) -> dict:
    """Fine-tune if asked, evaluate, write ``--out`` and print the report: the last steps every command shares."""
    acc_before = None
    if args.finetune_epochs > 0:
        acc_before = accuracy(model, session.splits.test)
        log.info("fine-tuning %d epochs with KD from the dense model", args.finetune_epochs)
        model = session.finetune(model, args.finetune_epochs, progress=sys.stderr.isatty())
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
    p.add_argument("--importance", choices=IMPORTANCES, default="taylor",
                   help="channel ranking: first-order Taylor, second-order Taylor (several times slower), L1 or "
                        "DRIVE's dual-gradient metric (default: taylor; --method l1-uniform implies l1)")
    p.add_argument("--sensitivity-points", type=positive_int, default=10,
                   help="--method sensitivity: ratios measured per stage (one evaluation each; default: 10)")
    p.add_argument("--evaluations", type=positive_int, default=120,
                   help="--method random: distinct allocations to evaluate (default: 120)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="--method sensitivity|random: " + WORKERS_HELP)
    p.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    p.add_argument("--ratios", help="JSON file {group: ratio} to use instead of --method")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="before adaptive BN, refit every conv and linear layer by least squares to the dense "
                        "model's outputs on 256 calibration images (He et al. 2017; default: on unless "
                        "--finetune-epochs fine-tunes the model or --no-adapt-bn)")
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
    config = session_config(args, "l1" if args.method == "l1-uniform" else args.importance)
    # a search scores its candidates as the kept model is built: refitted unless it will be fine-tuned
    config.reconstruct = args.method in SEARCH_METHODS and args.reconstruct is not False and \
        refits_by_default(args.finetune_epochs, args.adapt_bn)
    session = PruningSession(args.model, args.weights, args.data, config, args.val_data)
    budget, extra = None, {}
    if args.max_latency is not None:
        table = session.latency_table(args.latency or "onnxruntime", args.latency_batch, sys.stderr.isatty())
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
    from envs import PruneEnv, centre_allocation, evaluation_workers, random_search, select_best, sensitivity_search
    env = PruneEnv(session=session, flops=args.flops, max_ratio=args.max_ratio, round_to=args.round_to,
                   latency_budget=budget, max_nodes=len(session.trace.nodes))
    progress = sys.stderr.isatty()
    t = time.perf_counter()
    report: dict[str, object] = {"workers": args.workers, "ray": args.ray}
    parallel = args.method != "centre"  # one evaluation
    with evaluation_workers(env, args.workers if parallel else 1, args.ray if parallel else None):
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
    train_command_parser(sub)
    export_command_parser(sub)
    apply_command_parser(sub)
    finetune_command_parser(sub)
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
        if args.command == "finetune":
            from agent.finetune import CHECKPOINT
            out = Path(args.out or Path(args.run_dir) / "finetuned")
            hint = (f"; continue from its last epoch with: prunepilot finetune {args.run_dir} --resume"
                    f"{f' --out {args.out}' if args.out else ''} (and the same settings)"
                    if (out / CHECKPOINT).is_file() else "")
        print(f"prunepilot {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unsupported model: one line, the traceback with -v
        if args.verbose:
            raise
        first = "".join(str(e).splitlines()[:1])[:300]
        print(f"prunepilot {args.command}: error: {type(e).__name__}: {first} (prunepilot -v {args.command} ... "
              "shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
