"""The built-in demo: a digits CNN with unequal layers -> agent search -> export -> apply to another CNN -> a
side-by-side table of dense, uniform and the search, with measured speed-ups.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from agent.apply import apply_policy
from agent.outputs import write_json
from agent.policy import export_policy
from agent.train import train
from pruning_core import (
    FinetuneConfig,
    PruningSession,
    SessionConfig,
    UserError,
    accuracy,
    build_model,
    compare_latency,
    finetune,
    load_data,
    uniform_ratios,
)

__all__ = ["run_demo"]

# an 8-channel layer between wide ones: a uniform ratio cuts it as deep as the rest, a per-layer search need not
SOURCE, TARGET = "digits_bottleneck", "digits_bottleneck_deep"
# backend and batch the speed-ups are timed at (one 8x8 digit is too little work); eager torch without the export extra
LATENCY = ("onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch", 64)
MARKER = ".prunepilot-demo"
WRITTEN = (MARKER, f"{SOURCE}.pt", f"{TARGET}.pt", "train", "policy", "apply", "summary.json")  # all the demo writes


def _clear_earlier_demo(out: Path) -> None:
    """Remove what an earlier demo wrote in ``out``, and nothing else; refuse a folder that holds other files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    if not (out / MARKER).is_file() or others:
        found = ", ".join(others[:3]) or f"no {MARKER}"
        raise UserError(f"--out {out} is not empty and holds files no demo wrote ({found}); pick an empty or new "
                        "folder")
    for name in WRITTEN:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(out: str | Path = "runs/demo", episodes: int = 60, flops: float = 0.25, seed: int = 0) -> list[dict]:
    """Run the whole job on scikit-learn's digits and print dense, uniform, the search and its transfer side by side.

    Everything goes under ``out``: the two trained CNNs, the training run, the exported policy, the pruned models
    and ``summary.json``. An earlier demo's files there are replaced; a folder holding anything else is refused.
    """
    out = Path(out)
    _clear_earlier_demo(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by prunepilot demo\n")
    data = load_data("digits")
    cfg = SessionConfig(reward_images=500, calib_batches=4, seed=seed, reconstruct=True)  # as train's CLI
    sessions = {name: _trained_session(name, i, data, cfg, out) for i, name in enumerate((SOURCE, TARGET))}
    print(f"[demo] searching a policy on {SOURCE} at {flops:.0%} FLOPs ({episodes} episodes) ...", flush=True)
    rl = train(session=sessions[SOURCE], model=SOURCE, weights=str(out / f"{SOURCE}.pt"), data="digits", flops=flops,
               episodes=episodes, warmup_episodes=max(1, episodes // 4), out=str(out / "train"),
               reward_images=cfg.reward_images, calib_batches=cfg.calib_batches, seed=seed, checkpoint_every=20)
    export_policy(out / "train", out / "policy")
    print(f"[demo] applying the policy to {TARGET} (zero-shot) ...", flush=True)
    transfer = apply_policy(out / "policy", TARGET, data=data, out=out / "apply", seed=seed, session=sessions[TARGET])
    print(f"[demo] timing the pruned models against dense ({LATENCY[0]}, batch {LATENCY[1]}) ...", flush=True)
    rows = _rows(sessions[SOURCE], rl, flops) + _rows(sessions[TARGET], transfer, flops)
    write_json(out / "summary.json", rows)
    _print_table(rows)
    print(f"\n[demo] everything is under {out}/ (policy: {out / 'policy'}, plots: {out / 'train'}/*.png)")
    return rows


def _trained_session(name: str, index: int, data, cfg: SessionConfig, out: Path) -> PruningSession:
    """Train zoo model ``name`` on digits, save its weights in ``out`` and open a pruning session on them."""
    print(f"[demo] training {name} on digits ...", flush=True)
    torch.manual_seed(cfg.seed + index)
    model = finetune(build_model(name), data.train, FinetuneConfig.plain(10, seed=cfg.seed))
    torch.save(model.state_dict(), out / f"{name}.pt")
    return PruningSession(name, str(out / f"{name}.pt"), data, cfg)


def _rows(s: PruningSession, report: dict, flops: float) -> list[dict]:
    """Dense, uniform and ``report``'s kept model for one session: test accuracy, FLOPs and measured speed-up.

    Both pruned models are built by :meth:`PruningSession.build_final` (refitted), as the commands keep them.
    """
    uniform = uniform_ratios(s.trace, flops, 0.8)
    found = (report.get("transfer") or report["search"])["chosen"]
    rows = [{"model": s.model_name, "method": "dense", "flops_ratio": 1.0, "acc": s.dense_accuracy("test"),
             "speedup": 1.0}]
    for method, ratios, round_to in (("uniform", uniform, None), (f"{report['method']} ({found})",
                                                                   report["ratios"], report["round_to"])):
        model, built = s.build_final(ratios, round_to)
        timed = compare_latency(s.model, model, s.data.input_shape, LATENCY[1], LATENCY[0])
        rows.append({"model": s.model_name, "method": method, "flops_ratio": s.measure(ratios, round_to)["flops_ratio"],
                     "acc": accuracy(model, s.splits.test), "speedup": timed["speedup"],
                     "acc_before_reconstruct": built.get("acc_before_reconstruct")})
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<24} {'method':<26} {'FLOPs':>6} {'speed-up':>9} {'test acc':>9} {'not refitted':>13}")
    for r in rows:
        plain = r.get("acc_before_reconstruct")
        plain = f"{plain:>12.2f}%" if plain is not None else f"{'':>13}"
        print(f"{r['model']:<24} {r['method']:<26} {r['flops_ratio']:>6.3f} {r['speedup']:>8.2f}x {r['acc']:>8.2f}% "
              f"{plain}")
    print(f"(speed-ups measured with {LATENCY[0]} at batch {LATENCY[1]} on this machine. Pruned models are refitted "
          "to the dense model by least squares after adaptive BN; 'not refitted' is the same model without it. rl "
          "and rl-transfer keep the best of their own candidates and the floor allocations (uniform, centre, global, "
          "sensitivity) on training images; the brackets name the winner)")
