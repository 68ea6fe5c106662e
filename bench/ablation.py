"""Agent ablations on the shared ResNet-56: one change at a time, several seeds, the same Taylor scores.

Each variant is ``NAME:field=value,...`` over :class:`agent.TrainConfig` fields plus the session's
``reward_images``, ``calib_batches`` and ``select_images``; unset fields keep the defaults given by ``--base``.
Every run reports the kept allocation's (after re-scoring, as ``train`` keeps it) reward-split accuracy and test
accuracy (adaptive BN, no fine-tune), the search's best episode, the search wall time and the agent's share.

    python bench/ablation.py --name sde --seeds 0 1 2 \\
        --variant "no-sde:sde=false" --variant "sde:sde=true"
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import fields

from common import cifar_session, write_result
from search import rl_search

from agent import TrainConfig
from pruning_core import PruningSession, accuracy, uniform_ratios

SESSION_FIELDS = ("reward_images", "calib_batches", "select_images")


def parse_variant(spec: str, base: dict) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    out = dict(base)
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown field {key!r} in variant {spec!r}")
        typ = types[key]
        out[key] = raw.lower() in ("1", "true", "yes") if typ is bool else typ(raw)
    return name, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME:field=value,... (repeatable)")
    p.add_argument("--base", default="episodes=120,reward_images=1000,calib_batches=10,warmup_episodes=20",
                   help="field=value,... shared by every variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--name", default="ablation")
    args = p.parse_args()
    _, base = parse_variant(":" + args.base, {})
    sessions: dict[tuple, PruningSession] = {}
    out = {"config": vars(args), "variants": {}}
    for spec in args.variant:
        name, v = parse_variant(spec, base)
        key = tuple(v.get(k, getattr(TrainConfig(), k)) for k in SESSION_FIELDS)
        if key not in sessions:
            sessions[key] = cifar_session("resnet56", **dict(zip(SESSION_FIELDS, key)))
        s = sessions[key]
        if f"uniform@{key}" not in out:
            model = s.build(uniform_ratios(s.trace, args.target, v.get("max_ratio", 0.8)))
            out[f"uniform@{key}"] = {"acc_reward": accuracy(model, s.splits.reward),
                                     "acc_test": accuracy(model, s.splits.test)}
        runs = []
        for seed in args.seeds:
            r = rl_search(s, TrainConfig(**{**v, "seed": seed, "flops": args.target, "progress": False}))
            model = s.build(r["ratios"])
            runs.append({"seed": seed, "acc_reward": accuracy(model, s.splits.reward),
                         "acc_test": accuracy(model, s.splits.test), "best_episode": r["best_episode"],
                         "flops_ratio": s.measure(r["ratios"])["flops_ratio"], "search_s": r["search_s"],
                         "agent_share": r["agent_share"], "unique_evaluations": r["unique_evaluations"],
                         "ratios": r["ratios"]})
            print(f"{name} seed {seed}: reward {runs[-1]['acc_reward']:.2f} test {runs[-1]['acc_test']:.2f} "
                  f"best ep {r['best_episode']} {r['search_s']:.0f}s share {r['agent_share']:.3f}", flush=True)
        tests = [r["acc_test"] for r in runs]
        out["variants"][name] = {"settings": v, "runs": runs, "acc_test_mean": statistics.mean(tests),
                                 "acc_test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0}
        write_result(args.name, out)  # after every variant, so a long run leaves partial results


if __name__ == "__main__":
    main()
