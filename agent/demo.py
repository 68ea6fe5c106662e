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
    PruningSession,
    SessionConfig,
    accuracy,
    build_model,
    finetune,
    load_data,
    uniform_ratios,
)

__all__ = ["run_demo"]

SOURCE, TARGET = "digits_cnn", "digits_cnn_wide"


def run_demo(out: str | Path = "runs/demo", episodes: int = 60, flops: float = 0.5, seed: int = 0) -> list[dict]:
    """Run the whole job on scikit-learn's digits and print dense, uniform and RL side by side.

    Everything goes under ``out`` (replaced if it holds an earlier demo): the two trained CNNs, the training
    run, the exported policy, the pruned models and ``summary.json``.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = load_data("digits")
    cfg = SessionConfig(reward_images=500, calib_batches=4, seed=seed)
    sessions = {}
    for i, name in enumerate((SOURCE, TARGET)):
        print(f"[demo] training {name} on digits ...", flush=True)
        torch.manual_seed(seed + i)
        model = finetune(build_model(name), data.train, epochs=10, lr=0.05, augment=False, seed=seed)
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
            {"model": name, "method": report["method"] + (f" ({report['transfer']['chosen']})" if "transfer" in report
                                                          else ""),
             "flops_ratio": report["flops_ratio"], "acc": report["acc"],
             "acc_before_reconstruct": report["acc_before_reconstruct"]},
        ]
    write_json(out / "summary.json", rows)
    print(f"\n{'model':<16} {'method':<22} {'FLOPs':>6} {'test acc':>9} {'not refitted':>13}")
    for r in rows:
        plain = f"{r['acc_before_reconstruct']:>12.2f}%" if "acc_before_reconstruct" in r else f"{'':>13}"
        print(f"{r['model']:<16} {r['method']:<22} {r['flops_ratio']:>6.3f} {r['acc']:>8.2f}% {plain}")
    print("(pruned models are refitted to the dense model by least squares before adaptive BN; 'not refitted' is the "
          "same model without it. rl-transfer keeps the policy's allocation, or uniform when uniform scores better "
          "on the training images of the reward and select splits)")
    print(f"\n[demo] everything is under {out}/ (policy: {out / 'policy'}, plots: {out / 'train'}/*.png)")
    return rows
