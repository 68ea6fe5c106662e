"""The built-in demo: digits CNN -> agent search -> export -> apply to another CNN -> a side-by-side table."""

from __future__ import annotations

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
    finetune,
    load_data,
    uniform_ratios,
)

__all__ = ["run_demo"]

SOURCE, TARGET = "digits_cnn", "digits_cnn_wide"
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


def run_demo(out: str | Path = "runs/demo", episodes: int = 60, flops: float = 0.5, seed: int = 0) -> list[dict]:
    """Run the whole job on scikit-learn's digits and print dense, uniform and RL side by side.

    Everything goes under ``out``: the two trained CNNs, the training run, the exported policy, the pruned models
    and ``summary.json``. An earlier demo's files there are replaced; a folder holding anything else is refused.
    """
    out = Path(out)
    _clear_earlier_demo(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by prunepilot demo\n")
    data = load_data("digits")
    cfg = SessionConfig(reward_images=500, calib_batches=4, seed=seed)
    sessions = {}
    for i, name in enumerate((SOURCE, TARGET)):
        print(f"[demo] training {name} on digits ...", flush=True)
        torch.manual_seed(seed + i)
        model = finetune(build_model(name), data.train, FinetuneConfig.plain(10, seed=seed))
        torch.save(model.state_dict(), out / f"{name}.pt")
        sessions[name] = PruningSession(name, str(out / f"{name}.pt"), data, cfg)
    print(f"[demo] searching a policy on {SOURCE} at {flops:.0%} FLOPs ({episodes} episodes) ...", flush=True)
    rl = train(session=sessions[SOURCE], model=SOURCE, weights=str(out / f"{SOURCE}.pt"), data="digits", flops=flops,
               episodes=episodes, warmup_episodes=max(1, episodes // 4), out=str(out / "train"),
               reward_images=cfg.reward_images, calib_batches=cfg.calib_batches, seed=seed, checkpoint_every=20)
    export_policy(out / "train", out / "policy")
    print(f"[demo] applying the policy to {TARGET} (zero-shot) ...", flush=True)
    transfer = apply_policy(out / "policy", TARGET, data=data, out=out / "apply", seed=seed, session=sessions[TARGET])
    rows = []
    for name, report in ((SOURCE, rl), (TARGET, transfer)):
        s = sessions[name]
        ratios = uniform_ratios(s.trace, flops, 0.8)
        uniform, built = s.build_final(ratios)  # refitted like the kept models, so the rows compare
        rows += [
            {"model": name, "method": "dense", "flops_ratio": 1.0, "acc": s.dense_accuracy("test")},
            {"model": name, "method": "uniform", "flops_ratio": s.measure(ratios)["flops_ratio"],
             "acc": accuracy(uniform, s.splits.test), "acc_before_reconstruct": built["acc_before_reconstruct"]},
            {"model": name, "method": f"{report['method']} ({(report.get('transfer') or report['search'])['chosen']})",
             "flops_ratio": report["flops_ratio"], "acc": report["acc"],
             "acc_before_reconstruct": report["acc_before_reconstruct"]},
        ]
    write_json(out / "summary.json", rows)
    print(f"\n{'model':<16} {'method':<26} {'FLOPs':>6} {'test acc':>9} {'not refitted':>13}")
    for r in rows:
        plain = f"{r['acc_before_reconstruct']:>12.2f}%" if "acc_before_reconstruct" in r else f"{'':>13}"
        print(f"{r['model']:<16} {r['method']:<26} {r['flops_ratio']:>6.3f} {r['acc']:>8.2f}% {plain}")
    print("(pruned models are refitted to the dense model by least squares before adaptive BN; 'not refitted' is the "
          "same model without it. rl and rl-transfer keep the best of their own candidates and the floor allocations "
          "(uniform, centre, global, sensitivity) on the reward and select images; the brackets name the winner)")
    print(f"\n[demo] everything is under {out}/ (policy: {out / 'policy'}, plots: {out / 'train'}/*.png)")
    return rows
