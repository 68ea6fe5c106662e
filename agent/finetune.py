"""``prunepilot finetune RUN_DIR``: fine-tune the model a ``prune``, ``train`` or ``apply`` run kept, or prune it again
during training with SPP or DRIVE, and export the result to ``RUN_DIR/finetuned/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from agent.args import positive_int
from agent.outputs import add_latency, check_out, print_report, write_pruned
from pruning_core import FinetuneConfig, PruningSession, SessionConfig, UserError, accuracy
from pruning_core.augment import AUGMENTS
from pruning_core.data import absolute_spec
from pruning_core.latency import BACKENDS
from pruning_core.schedules import SCHEDULES, make_schedule

__all__ = ["CHECKPOINT", "finetune_command", "finetune_command_parser", "finetune_run"]

log = logging.getLogger("prunepilot")

CHECKPOINT = ".finetune-checkpoint.pt"  # in the output folder while a fine-tune runs; gone when it ends
_D = FinetuneConfig()


def finetune_command_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune the model a prune, train or apply run kept",
        description="Rebuild the run's dense model and kept allocation, fine-tune with SGD (Nesterov, warm-up, "
                    "cosine), "
                    "label smoothing, crop-and-flip and KD from the dense model, keep the epoch that scores best on "
                    "held-out training images, and export it with a report. --schedule spp or drive prunes during "
                    "training instead of before it. Checkpoints every epoch; --resume continues after a kill.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder with the report.json of prunepilot prune, train or apply")
    p.add_argument("--out", help="folder for the fine-tuned model and report (default: RUN_DIR/finetuned)")
    p.add_argument("--epochs", type=positive_int, default=_D.epochs, help=f"epochs (default: {_D.epochs})")
    p.add_argument("--minutes", type=float, help="wall-clock budget: as many of --epochs as fit, planned from the "
                                                 "first steps' speed (default: none)")
    p.add_argument("--finetune-data", action="append", default=[], metavar="SPEC",
                   help="more training images beside the run's own: a data spec's training split, or a folder of "
                        "class folders taken whole (repeatable; no test split is read)")
    p.add_argument("--schedule", choices=SCHEDULES, default="oneshot",
                   help="oneshot: prune, then fine-tune; spp: probabilistic masks converging to the allocation in "
                        "the first half of the budget; drive: DRIVE-ranked pruning in 5 rounds after a dense phase "
                        "(default: oneshot)")
    p.add_argument("--lr", type=float, default=_D.lr, help=f"peak learning rate (default: {_D.lr})")
    p.add_argument("--batch-size", type=positive_int, default=_D.batch_size,
                   help=f"batch size (default: {_D.batch_size})")
    p.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the dense model (default: on)")
    p.add_argument("--augment", choices=AUGMENTS, default=_D.augment,
                   help=f"training augmentation; randaugment needs torchvision (default: {_D.augment})")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="evaluate and export an exponential moving average of the weights (e.g. 0.999; default: off)")
    p.add_argument("--holdout-images", type=int, default=_D.holdout_images,
                   help=f"training images never trained on, which pick the epoch kept (default: {_D.holdout_images})")
    p.add_argument("--prune-act-grads", type=float, default=0.0, metavar="RATE",
                   help="prune this fraction of the conv output gradients in each backward pass (Ye et al.; the "
                        "report gives the sparsity reached; default: off)")
    p.add_argument("--seed", type=int, help="random seed (default: the run's)")
    p.add_argument("--device", metavar="auto|cpu|cuda|cuda:N", help="where to train (default: the run's)")
    p.add_argument("--loader-workers", type=int, metavar="N",
                   help="processes decoding an image folder (default: the run's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune from its last epoch")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier fine-tune's files in the output folder")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--latency", choices=BACKENDS, metavar="BACKEND",
                   help=f"also time the model against dense on this CPU: {', '.join(BACKENDS)}")
    p.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for --latency (default: 1)")
    p.set_defaults(func=finetune_command)


def finetune_command(args: argparse.Namespace) -> dict:
    config = FinetuneConfig(epochs=args.epochs, minutes=args.minutes, lr=args.lr, batch_size=args.batch_size,
                            augment=args.augment, ema_decay=args.ema, holdout_images=args.holdout_images,
                            act_grad_sparsity=args.prune_act_grads)
    report = finetune_run(args.run_dir, config, out=args.out, schedule=args.schedule, kd=args.kd,
                          extra_data=args.finetune_data, seed=args.seed, device=args.device,
                          loader_workers=args.loader_workers, resume=args.resume, overwrite=args.overwrite,
                          progress=sys.stderr.isatty(), latency=args.latency, latency_batch=args.latency_batch)
    print_report(report, args.json)
    if not args.json:
        ft = report["finetune"]
        print(f"fine-tuned {ft['epochs_run']} epochs ({ft['schedule']}, {ft['time_s'] / 60:.1f} min); kept epoch "
              f"{ft['best_epoch']}, chosen on {ft['holdout_images']} held-out training images")
        print(f"wrote {Path(report['files']['onnx']).parent / 'report.json'} and the exported model")
    return report


def finetune_run(run_dir: str | Path, config: FinetuneConfig, out: str | Path | None = None,
                 schedule: str = "oneshot", kd: bool = True, extra_data: list[str] = (), seed: int | None = None,
                 device: str | None = None, loader_workers: int | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = False, latency: str | None = None,
                 latency_batch: int = 1) -> dict:
    """Fine-tune the model of ``run_dir`` and write it, ONNX, ``.pt2`` and ``report.json`` to ``out`` (default:
    ``run_dir/finetuned``); return the report. The dense model, data and allocation are rebuilt from the run's
    ``report.json``; ``oneshot`` starts from the allocation pruned with adaptive BN (not refitted: the fine-tune
    replaces the refit), ``spp`` and ``drive`` from the dense model.

    :raises UserError: no usable report in ``run_dir``, an output folder in the way, or bad settings.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    kept = _read_report(run_dir)
    src = kept["source"]
    out = Path(out) if out is not None else run_dir / "finetuned"
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise UserError(f"{out} holds no interrupted fine-tune to resume")
    if not resume:
        if ckpt.is_file() and not overwrite:
            raise UserError(f"{out} holds an interrupted fine-tune: continue it with --resume or start again with "
                            "--overwrite")
        check_out(out, overwrite)
        ckpt.unlink(missing_ok=True)
    config = replace(config, seed=kept["seed"] if seed is None else seed)
    config.check()
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in src["config"].items()}
    settings.update({k: v for k, v in (("device", device), ("loader_workers", loader_workers)) if v is not None})
    try:
        session_config = SessionConfig(**settings)
    except TypeError as e:
        raise UserError(f"{run_dir}/report.json has settings this prunepilot does not know: {e}") from e
    session = PruningSession(src["model"], src["weights"], src["data"], session_config, src["val_data"])
    ratios, round_to = kept["ratios"], kept.get("round_to")
    sched = make_schedule(schedule, session, ratios, round_to, config.seed)
    model = session.finetune_start(ratios, round_to, sched)
    acc_start = accuracy(model, session.splits.test) if sched is None else None
    log.info("fine-tuning %s (%s) for %d epochs%s", session.model_name, schedule, config.epochs,
             f" or {config.minutes} minutes" if config.minutes else "")
    stats: dict = {}
    model = session.finetune(model, config, kd=kd, progress=progress, extra_data=list(extra_data), schedule=sched,
                             checkpoint=ckpt, report=stats)
    finetune = {"schedule": schedule, "kd": kd, "data": [absolute_spec(s) for s in extra_data], **stats,
                "config": asdict(config)}
    report = session.report(model, ratios, kept["method"], config.seed, time.perf_counter() - started,
                            round_to=round_to, acc_before_finetune=acc_start, finetune=finetune,
                            run=str(run_dir.resolve()))
    if latency:
        add_latency(report, session, model, latency, latency_batch)
    return write_pruned(out, model, report, session.data.input_shape)


def _read_report(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no report.json: pass the --out folder of prunepilot prune, train or apply")
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    missing = [k for k in ("ratios", "seed", "method") if k not in report]
    if missing:
        raise UserError(f"{path} is not a prunepilot report (no {', '.join(missing)})")
    src = report.get("source")
    if not src or not src.get("model") or not src.get("data"):
        raise UserError(f"{path} does not record how to rebuild the model (written by an older prunepilot, or from "
                        "Python objects): fine-tune it in Python with PruningSession.finetune")
    return report
