"""Render bench/results/*.json as one markdown document (the README quotes it).

    python bench/report.py > bench/results/REPORT.md
"""

from __future__ import annotations

import json

from common import RESULTS


def fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def search_table(res: dict) -> list[str]:
    d = res["dense"]
    lines = [f"Dense ResNet-56: test {d['acc_test']:.2f}%, latency {d['latency_b1_ms']:.2f} ms (b1) / "
             f"{d['latency_b64_ms']:.1f} ms (b64). Reward split: {res['config']['reward_images']} training images; "
             f"{res['config']['calib_batches']} x 64 calibration images; evaluation budget "
             f"{res['config']['episodes']} episodes per search method; fine-tune: {res['config']['finetune_epochs']} "
             "epoch(s) SGD + KD from the dense model on the 5,085 training images.", ""]
    lines += ["| target | method | FLOPs | params | reward acc | test acc (adapt-BN) | test acc (fine-tuned) | "
              "search s | ep/min | agent share | speed-up b1 | speed-up b64 | FLOPs speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for target, rows in res["targets"].items():
        for method, r in rows.items():
            if "runs" in r:
                s = r["summary"]
                n = len(r["runs"])

                def ms(k, nd=2, s=s):
                    return f"{s[k]['mean']:.{nd}f} ± {s[k]['std']:.{nd}f}" if k in s else "–"
                ft = r["runs"][0].get("acc_test_finetuned")
                lines.append(f"| {target} | {method} ({n} seeds) | {ms('flops_ratio', 3)} | – | {ms('acc_reward')} | "
                             f"{ms('acc_test')} | {fmt(ft)} (seed 0) | {ms('search_s', 0)} | "
                             f"{ms('episodes_per_min', 1)} | {ms('agent_share', 3)} | {ms('speedup_b1')} | "
                             f"{ms('speedup_b64')} | {fmt(1 / s['flops_ratio']['mean'])} |")
            else:
                lines.append(f"| {target} | {method} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
                             f"{r['acc_reward']:.2f} | {r['acc_test']:.2f} | {fmt(r.get('acc_test_finetuned'))} | "
                             f"{r.get('search_s', 0):.0f} | {fmt(r.get('episodes_per_min'), 1)} | "
                             f"{fmt(r.get('agent_share'), 3)} | {r['speedup_b1']:.2f} | {r['speedup_b64']:.2f} | "
                             f"{r['flops_speedup']:.2f} |")
    return lines


def transfer_table(res: dict) -> list[str]:
    lines = [f"Policy trained on ResNet-20 ({res['config']['train_episodes']} episodes, {res['config']['algo']}); "
             f"source test acc {res['source']['acc_test']:.2f}% vs uniform {res['source']['acc_test_uniform']:.2f}%.",
             "", "| target | FLOPs | test acc | uniform test acc | reward acc | uniform reward acc |",
             "|---|---|---|---|---|---|"]
    for name, r in res["targets"].items():
        lines.append(f"| {name} | {fmt(r.get('flops_ratio'), 3)} | {fmt(r.get('acc_test'))} | "
                     f"{fmt(r.get('acc_test_uniform'))} | {fmt(r.get('acc_reward'))} | "
                     f"{fmt(r.get('acc_reward_uniform'))} |")
    return lines


def scale_table(res: dict) -> list[str]:
    lines = ["| model | nodes | edges | groups | trace s | GNN fwd ms (1 obs) | GNN fwd+bwd ms (256 obs) | "
             "prune ms | adapt-BN s (10x64) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        lines.append(f"| {name} | {r['graph_nodes']} | {r['graph_edges']} | {r['groups']} | {r['trace_s']:.3f} | "
                     f"{r['gnn_forward_ms']:.1f} | {r['gnn_fwd_bwd_b256_ms']:.0f} | {r['prune_ms']:.1f} | "
                     f"{r['adapt_bn_10x64_s']:.2f} |")
    return lines


def latency_table(res: dict) -> list[str]:
    lines = [f"Median of {res['repeats']} blocked-autorange medians, measured alone; architectures rebuilt from "
             "the search results' ratios.", "",
             "| model | FLOPs | b1 ms | b64 ms | speed-up b1 | speed-up b64 | FLOPs speed-up | b64 / FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        if name == "dense":
            lines.append(f"| dense | 1.000 | {r['b1_ms']:.2f} | {r['b64_ms']:.1f} | 1.00 | 1.00 | 1.00 | – |")
            continue
        lines.append(f"| {name} | {r['flops_ratio']:.3f} | {r['b1_ms']:.2f} | {r['b64_ms']:.1f} | "
                     f"{r['speedup_b1']:.2f} | {r['speedup_b64']:.2f} | {r['flops_speedup']:.2f} | "
                     f"{r['speedup_b64'] / r['flops_speedup']:.0%} |")
    return lines


def ppo_table(res: dict) -> list[str]:
    lines = ["PPO's initial exploration std on ResNet-56 at 50% FLOPs (protocol of search_0.5; std 1.0 is SB3's "
             "default, seed 0 of it is in search_0.5).", "",
             "| init std | seed | reward acc | test acc (adapt-BN) | FLOPs | search s |", "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['init_std']} | {r['seed']} | {r['acc_reward']:.2f} | {r['acc_test']:.2f} | "
                     f"{r['flops_ratio']:.3f} | {r['search_s']:.0f} |")
    return lines


def env_table(res: dict) -> list[str]:
    sh = res["share"]
    return [f"PruneEnv on ResNet-56, {res['config']['reward_images']}-image reward split, "
            f"{res['config']['calib_batches']} x 64 calibration images: {res['episodes_per_min']:.1f} episodes/min; "
            f"time split: evaluate {sh['eval_s']:.1%}, recalibrate {sh['adapt_s']:.1%}, prune {sh['prune_s']:.1%}, "
            f"other {sh['other_s']:.1%}."]


def main() -> None:
    out = []
    renderers = {"search": search_table, "transfer": transfer_table, "scale": scale_table,
                 "latency": latency_table, "ppo": ppo_table, "env": env_table}
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        render = renderers.get(name.split("_")[0])
        if render is None:
            continue
        res = json.loads(path.read_text())
        m = res["machine"]
        out += [f"### {name} ({res['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']})", "",
                *render(res), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
