"""Render bench/results/*.json as one markdown document, and the headline runs for docs/benchmarks.md.

    python bench/report.py            # print every results file's table
    python bench/report.py --write    # all to bench/results/REPORT.md, HEADLINE_RESULTS to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS


def fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def budget(config: dict) -> str:
    """A search benchmark's budget: episodes, or distinct evaluations (cache hits free) with a cap on episodes."""
    if config.get("evaluations"):
        return f"{config['evaluations']} distinct evaluations (at most {config['episodes']} episodes)"
    return f"{config['episodes']} episodes"


def evals(r: dict) -> str:
    """Distinct evaluations / episodes of one search run."""
    return f"{r['unique_evaluations']} / {r['episodes']}" if "unique_evaluations" in r else "–"


def search_table(res: dict) -> list[str]:
    d = res["dense"]
    timing = res.get("in_run_latency")  # older runs: eager PyTorch, unpaired
    timed = ({"torch": "eager PyTorch", "torch-cl": "eager PyTorch (channels-last, Conv+BN folded)",
              "onnxruntime": "ONNX Runtime"}[timing["backend"]]
             + f", each model paired with dense in {timing['repeats']} sweeps (median ratio)" if timing
             else "eager PyTorch, each model against one dense timing from the start of the run (they swing by tens "
                  "of percent)")
    lines = [f"Dense ResNet-56: test {d['acc_test']:.2f}%, latency {d['latency_b1_ms']:.2f} ms (b1) / "
             f"{d['latency_b64_ms']:.1f} ms (b64). Reward split: {res['config']['reward_images']} training images; "
             f"{res['config']['calib_batches']} x 64 calibration images; evaluation budget "
             f"{budget(res['config'])} per search method; fine-tune: {res['config']['finetune_epochs']} "
             "epoch(s) SGD + KD from the dense model on the 5,085 training images. Rows with seeds: mean ± std; RL "
             f"settings {res.get('rl_config', 'TrainConfig defaults at the time of the run')}. Speed-ups here are "
             f"timed inside the run in {timed}; bench/latency.py's table times them alone.", ""]
    if res["config"].get("round_to"):
        rt = res["config"]["round_to"]
        lines[0] += (f" Every method keeps channel counts rounded up to multiples of {rt} (--round-to; a group no "
                     f"wider than {rt} is not rounded)"
                     + (", the CPU kernels' channel block with AVX2 (half a block with AVX-512)." if rt == 8 else "."))
    if res.get("rl_config", {}).get("drop_blocks"):
        lines[0] += (" The searches may also remove residual branches whole (--drop-blocks): a branch, however "
                     "wide, keeps whole blocks of that many channels, or none"
                     + (f"; with {res['rl_config']['granularity']} steps, each run's width step is followed by a drop "
                        "step that removes its cheapest branches, "
                        + {"taylor": "by summed Taylor score", "loss": "by the calibration loss with that branch alone "
                           "removed"}[res["config"].get("drop_criterion", "taylor")]
                        + " (centre-drop: action 0 on every step)."
                        if res["rl_config"].get("granularity", "group") != "group" else "."))
    if res["config"].get("reconstruct"):
        lines[0] += (" Every pruned model, in every reward and row, has its conv and linear layers refitted by least "
                     f"squares to the dense model's outputs on {res.get('reconstruct_images', 256)} calibration "
                     "images before adaptive BN (--reconstruct).")  # files before it was recorded: the default
    lat = res.get("latency_budget")
    if lat:
        lines[0] += (f" Every method also keeps the latency that a latency table ({lat['backend']}, batch "
                     f"{lat['batch_size']}) predicts within {lat['max_latency']} of dense (--max-latency; 'predicted "
                     "latency' column).")
    rescore = res["config"].get("rescore_top", 0)
    if rescore:
        lines[0] += (f" Search methods re-score their {rescore} best candidates on {res['rl_config']['select_images']} "
                     "more training images and keep the best over both splits; 'best episode' is the test accuracy "
                     "of the best reward-split episode, what they kept before re-scoring.")
    lines += ["| target | method | FLOPs | params | reward acc | test acc (adapt-BN) | best episode test acc | "
              "test acc (fine-tuned) | search s | evals / episodes | ep/min | agent share | speed-up b1 | "
              "speed-up b64 | FLOPs speed-up |" + (" predicted latency |" if lat else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if lat else "")]
    for target, rows in res["targets"].items():
        for method, r in rows.items():
            if "runs" in r:
                s = r["summary"]
                n = len(r["runs"])

                def ms(k, nd=2, s=s):
                    return f"{s[k]['mean']:.{nd}f} ± {s[k]['std']:.{nd}f}" if k in s else "–"
                ft = (ms("acc_test_finetuned") if all("acc_test_finetuned" in x for x in r["runs"])
                      else f"{fmt(r['runs'][0].get('acc_test_finetuned'))} (seed 0)")
                lines.append(f"| {target} | {method} ({n} seeds) | {ms('flops_ratio', 3)} | – | {ms('acc_reward')} | "
                             f"{ms('acc_test')} | {ms('search_best_acc_test')} | {ft} | "
                             f"{ms('search_s', 0)} | {', '.join(evals(x) for x in r['runs'])} | "
                             f"{ms('episodes_per_min', 1)} | {ms('agent_share', 3)} | {ms('speedup_b1')} | "
                             f"{ms('speedup_b64')} | {fmt(1 / s['flops_ratio']['mean'])} |"
                             + (f" {ms('latency_pred_ratio', 3)} |" if lat else ""))
            else:
                lines.append(f"| {target} | {method} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
                             f"{r['acc_reward']:.2f} | {r['acc_test']:.2f} | {fmt(r.get('search_best_acc_test'))} | "
                             f"{fmt(r.get('acc_test_finetuned'))} | "
                             f"{r.get('search_s', 0):.0f} | {evals(r)} | {fmt(r.get('episodes_per_min'), 1)} | "
                             f"{fmt(r.get('agent_share'), 3)} | {r['speedup_b1']:.2f} | {r['speedup_b64']:.2f} | "
                             f"{r['flops_speedup']:.2f} |"
                             + (f" {fmt(r.get('latency_pred_ratio'), 3)} |" if lat else ""))
    drifted = timing_drift(res)
    if drifted:
        lines += ["", f"In-run timing: dense at batch 64 ran more than {DRIFT:.0%} off its timing at the start of the "
                  f"run ({d['latency_b64_ms']:.1f} ms) when it was paired with {'; '.join(drifted)}. The machine's "
                  "speed moved during the run, so those speed-ups are not reliable; bench/latency.py times alone."]
    return lines


DRIFT = 0.10  # in-run dense timings further than this from the run's first one mark a busy machine


def timing_drift(res: dict) -> list[str]:
    """The rows of a search file whose paired dense timing at batch 64 is more than ``DRIFT`` off the dense timing
    taken at the start of the run, as "method seed S (X ms)". Paired runs only; older files have no paired dense."""
    start, out = res["dense"]["latency_b64_ms"], []
    for rows in res["targets"].values():
        for method, r in rows.items():
            for x in r.get("runs", [r]):
                ms = x.get("dense_b64_ms")
                if ms is not None and abs(ms / start - 1) > DRIFT:
                    seed = f" seed {x['seed']}" if x.get("seed") is not None else ""
                    out.append(f"{method}{seed} ({ms:.1f} ms)")
    return out


def transfer_table(res: dict) -> list[str]:
    cfg = res["config"]
    drop = cfg.get("drop_blocks", False)
    space = (f"; {cfg.get('granularity', 'substage')} steps"
             + (f", widths in multiples of {cfg['round_to']}" if cfg.get("round_to") else "")
             + (", residual branches may be dropped (centre: action 0 on every step, the space's simple "
                "allocation)" if drop else "")
             + ("; every reported model refitted to its dense model by least squares" if cfg.get("refit") else ""))
    lines = [f"Policy trained on ResNet-20 ({cfg['train_episodes']} episodes, {cfg['algo']}{space}); "
             f"source test acc {res['source']['acc_test']:.2f}% vs uniform {res['source']['acc_test_uniform']:.2f}%.",
             "", "| target | FLOPs | blocks dropped | test acc | uniform test acc | reward acc | uniform reward acc |"
             + (" centre test acc | centre reward acc |" if drop else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if drop else "")]
    for name, r in res["targets"].items():
        acc = fmt(r.get("acc_test")) + (f" ± {r['acc_test_std']:.2f} ({len(r['runs'])} seeds)" if "runs" in r else "")
        dropped = ("/".join(str(x["blocks_dropped"]) for x in r["runs"] if "blocks_dropped" in x) if "runs" in r
                   else r.get("blocks_dropped"))
        lines.append(f"| {name} | {fmt(r.get('flops_ratio'), 3)} | {dropped if dropped not in (None, '') else '–'} | "
                     f"{acc} | {fmt(r.get('acc_test_uniform'))} | {fmt(r.get('acc_reward'))} | "
                     f"{fmt(r.get('acc_reward_uniform'))} |"
                     + (f" {fmt(r.get('acc_test_centre'))} | {fmt(r.get('acc_reward_centre'))} |" if drop else ""))
    return lines


def scale_table(res: dict) -> list[str]:
    lines = ["| model | nodes | edges | groups | trace s | GNN fwd ms (1 obs) | GNN fwd+bwd ms (256 obs) | "
             "prune ms | adapt-BN s (10x64) | latency table s (ORT b1, timings) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        table = (f"{r['latency_table_s']:.1f} ({r['latency_table_timings']})" if "latency_table_s" in r else "–")
        lines.append(f"| {name} | {r['graph_nodes']} | {r['graph_edges']} | {r['groups']} | {r['trace_s']:.3f} | "
                     f"{r['gnn_forward_ms']:.1f} | {r['gnn_fwd_bwd_b256_ms']:.0f} | {r['prune_ms']:.1f} | "
                     f"{r['adapt_bn_10x64_s']:.2f} | {table} |")
    return lines


def latency_table(res: dict) -> list[str]:
    dense = res["models"]["dense"]
    block = res.get("block", 8)  # results from before it was recorded ran on AVX2 machines
    backends = [(n, p) for n, p in (("eager", ""), ("eager CL", "cl_"), ("ORT", "ort_")) if f"{p}b1_ms" in dense]
    how = (f"Paired timings: in each of {res['repeats']} sweeps, dense is timed right before each model; a "
           "speed-up is the median over sweeps of dense / pruned, and the ms columns are medians"
           if res.get("paired") else f"Median of {res['repeats']} latency medians")
    lines = [f"{how}, measured alone; architectures rebuilt from the search results' ratios "
             "(round_to=8: kept channels rounded up to multiples of 8). eager: PyTorch eager mode; eager CL: "
             "its deployment form, Conv+BN folded and channels-last memory format (dense timed the same way); "
             "ORT: the same model exported to ONNX and run by ONNX Runtime (CPU, all graph optimisations). Speed-ups "
             f"against dense, with their share of the FLOPs speed-up in brackets. {block}-block FLOPs speed-up: the "
             f"FLOPs speed-up with every kept width padded up to a multiple of {block}, the channel block of the "
             f"CPU conv kernels here ({'AVX-512' if block == 16 else 'AVX2'}).", "",
             f"| model | FLOPs | FLOPs speed-up | {block}-block FLOPs speed-up | "
             + " | ".join(f"{n} b1 ms | {n} b64 ms | {n} speed-up b1 | {n} speed-up b64" for n, _ in backends) + " |",
             "|---|---|---|---|" + "---|---|---|---|" * len(backends)]
    for name, r in res["models"].items():
        fs = r.get("flops_speedup", 1.0)
        aligned = r.get("aligned_flops_speedup")
        cells = [name, f"{r['flops_ratio']:.3f}", f"{fs:.2f}", f"{aligned:.2f}" if aligned else "–"]
        for _, p in backends:
            cells += [f"{r[p + 'b1_ms']:.2f}", f"{r[p + 'b64_ms']:.1f}"]
            for b in (1, 64):
                sp = r.get(f"{p}speedup_b{b}", 1.0)
                cells.append(f"{sp:.2f} ({sp / fs:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ablation_table(res: dict) -> list[str]:
    c = res["config"]
    lines = [f"ResNet-56 at {c.get('target', 0.5):.0%} FLOPs; shared settings: `{c['base']}`. Best episode of each "
             "run, rebuilt with adaptive BN; test = the 1,017 exact test images, never searched.", "",
             "| variant | settings | seed | reward acc | test acc | best episode | search s | agent share |",
             "|---|---|---|---|---|---|---|---|"]
    for key, v in res.items():
        if key.startswith("uniform@"):
            lines.insert(1, f"Uniform with the same split ({key[8:]}): reward {v['acc_reward']:.2f}, "
                            f"test {v['acc_test']:.2f}.")
    for name, v in res["variants"].items():
        changed = ", ".join(f"{k}={x}" for k, x in v["settings"].items() if f"{k}=" not in c["base"])
        for r in v["runs"]:
            lines.append(f"| {name} | {changed} | {r['seed']} | {r['acc_reward']:.2f} | {r['acc_test']:.2f} | "
                         f"{r['best_episode']} | {r['search_s']:.0f} | {fmt(r.get('agent_share'), 3)} |")
        lines.append(f"| {name} | mean ± std | | | {v['acc_test_mean']:.2f} ± {v['acc_test_std']:.2f} | | | |")
    if "note" in c:
        lines += ["", c["note"]]
    return lines


def reward_signal_table(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"{res['config']['samples']} allocations at {res['config']['target']:.0%} FLOPs sampled around uniform "
             f"(action spreads {res['config']['spreads']}), {res['config']['reward_images']} reward images. "
             f"Uniform's test accuracy: {s['uniform_acc_test']:.2%}; best sampled: {s['oracle_acc_test']:.2%}.", "",
             "| signal | Spearman with test acc | test acc of its pick | mean test acc of its top 5 |",
             "|---|---|---|---|"]
    for k in ("acc", "acc_half", "neg_ce", "neg_kl"):
        lines.append(f"| {k} | {s[k]['spearman_test']:.3f} | {s[k]['pick_acc_test']:.2%} | "
                     f"{s[k]['top5_mean_acc_test']:.2%} |")
    return lines


def env_table(res: dict) -> list[str]:
    sh = res["share"]
    return [f"PruneEnv on ResNet-56, {res['config']['reward_images']}-image reward split, "
            f"{res['config']['calib_batches']} x 64 calibration images: {res['episodes_per_min']:.1f} episodes/min; "
            f"time split: evaluate {sh['eval_s']:.1%}, recalibrate {sh['adapt_s']:.1%}, prune {sh['prune_s']:.1%}, "
            f"other {sh['other_s']:.1%}."]


def exhaustive_table(res: dict) -> list[str]:
    c = res["config"]
    lines = [f"Every allocation of `{c['results']}`'s action space ({c['granularity']}, widths rounded to "
             f"{c['round_to']}) within {c['target']} FLOPs"
             + (f" and its {c['max_latency_searched']} latency budget" if c.get("max_latency_searched") else "")
             + f": {res['feasible']} of {res['allocations_in_space']}, evaluated on the reward split in "
             f"{res['search_s']:.0f} s; {res['within_1pt_of_best']} are within 1 point of the best. Kept rows: the "
             "best after the same re-scoring as the search methods (with a latency budget: among the allocations "
             "that " + (f"`{c['latency_table']}`'s table" if c.get("latency_table") else "a fresh ORT batch-64 table")
             + " predicts within it).", "",
             "| kept | allocations | rank | reward acc | test acc (adapt-BN) | FLOPs | predicted latency |",
             "|---|---|---|---|---|---|---|"]
    for name, r in next(iter(res["targets"].values())).items():
        lines.append(f"| {name} | {r['feasible']} | {r.get('rank', '–')} | {fmt(r.get('acc_reward'))} | "
                     f"{fmt(r.get('acc_test'))} | {fmt(r.get('flops_ratio'), 3)} | "
                     f"{fmt(r.get('latency_pred_ratio'), 3)} |")
    lines += ["", f"Rank, among all {res['feasible']}, of the allocation each method of `{c['results']}` kept "
              "('outside': not one of them, e.g. uniform, whose leftover budget is given back group by group):", "",
              "| method | rank | reward acc | test acc | its distinct evaluations |", "|---|---|---|---|---|"]
    for name, r in res["ranks"].items():
        lines.append(f"| {name} | {r['rank'] or 'outside'} | {r['acc_reward']:.2f} | {r['acc_test']:.2f} | "
                     f"{r['unique_evaluations'] or '–'} |")
    return lines


def trunk_table(res: dict) -> list[str]:
    criteria = ("bn-taylor", "fm-taylor", "act-l2")
    lines = [f"{res['model']} with its residual trunks narrowed (bench/trunk_probe.py: removed trunk channels zeroed "
             "on every block output, branches pruned for real, BN recalibrated). Widths per stage; accuracy on the "
             "reward / select splits (training images) for each way of choosing the trunk channels.", "",
             "| trunk widths | branch widths | FLOPs | " + " | ".join(criteria) + " |",
             "|---|---|---|" + "---|" * len(criteria)]
    for r in res["rows"]:
        cells = [f"{r[c]['acc_reward']:.1f} / {r[c]['acc_select']:.1f}" if c in r else "–" for c in criteria]
        lines.append(f"| {'/'.join(map(str, r['trunk']))} | {'/'.join(map(str, r['branch']))} | "
                     f"{r['flops_ratio']:.3f} | " + " | ".join(cells) + " |")
    return lines


def within_table(res: dict) -> list[str]:
    variants = list(res["summary_mean_change"])
    lines = ["ResNet-56 at 50% FLOPs: searched allocations with each stage's pruning spread over its blocks "
             "(bench/within_stage.py: same stage totals; Taylor ranking within the stage, or a slope in ratio from "
             "the first block to the last). Accuracy on the reward / select splits (training images).", "",
             "| allocation | searched | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for r in res["rows"]:
        cells = [f"{r[k]['reward']:.1f} / {r[k]['select']:.1f}" for k in ("searched", *variants)]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    mean = res["summary_mean_change"]
    lines.append("| mean change | – | " + " | ".join(f"{mean[v]['reward']:+.2f} / {mean[v]['select']:+.2f}"
                                                   for v in variants) + " |")
    return lines


def reconstruct_table(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"Kept models of earlier searches ({', '.join(res['config']['results'])}), rebuilt with the same Taylor "
             "scores, calibration images and adaptive BN, without and with least-squares reconstruction "
             f"(bench/reconstruct.py: every conv and linear layer refitted to the dense model's outputs on "
             f"{res['reconstruction']['images']} calibration images). Dense: {res['dense']['acc_test']:.2f}% on test. "
             f"The plain rebuild reproduces every file's test accuracy"
             + (f" except {', '.join(s['plain_differs_from_file'])}" if s["plain_differs_from_file"] else "")
             + f"; reconstruction's test gain is {s['test_gain_mean']:+.2f} on average ({s['test_gain_min']:+.2f} to "
             f"{s['test_gain_max']:+.2f}) over {s['rows']} models. Reward and select splits: training images.", "",
             "| model | test | test, reconstructed | reward split | select split | refit build s | fine-tuned |",
             "|---|---|---|---|---|---|---|"]
    for label, r in res["rows"].items():
        p, f = r["plain"], r["refit"]
        lines.append(f"| {label} | {p['test']:.2f} | {f['test']:.2f} | {p['reward']:.1f} → {f['reward']:.1f} | "
                     f"{p['select']:.1f} → {f['select']:.1f} | {f['build_s']:.1f} | {fmt(f.get('test_finetuned'))} |")
    return lines


ORDER = ("search", "reconstruct", "exhaustive", "latency", "transfer", "ablation", "reward", "scale", "env", "trunk",
         "within")
HEADLINE_START, HEADLINE_END = "<!-- bench:start -->", "<!-- bench:end -->"
# The headline runs of docs/benchmarks.md, in its order (the default path, then searching with the refit in the
# reward, transfer and scale); REPORT.md holds every file, and bench/FINDINGS.md what each one found.
HEADLINE_RESULTS = ("search_substage_r8_drop_amd", "search_substage_r8_drop_s345_amd", "reconstruct_kept_amd",
                  "latency_substage_r8_drop_amd", "latency_substage_r8_drop_s345_amd",
                  "search_substage_r8_drop_recon_amd", "search_substage_r8_drop_recon_s345_amd",
                  "search_substage_r8_drop_recon_random_s345_amd", "search_substage_r8_drop_0.3_amd",
                  "reconstruct_0.3_amd", "latency_substage_r8_drop_0.3_amd", "transfer_r8_drop_refit_amd", "scale")


def render_tables() -> dict[str, str]:
    """Every results file's table, by results file stem, in report order."""
    renderers = {"search": search_table, "exhaustive": exhaustive_table, "transfer": transfer_table,
                 "scale": scale_table, "latency": latency_table, "ablation": ablation_table, "env": env_table,
                 "reward": reward_signal_table, "trunk": trunk_table, "within": within_table,
                 "reconstruct": reconstruct_table}
    paths = sorted(RESULTS.glob("*.json"), key=lambda p: (ORDER.index(p.stem.split("_")[0])
                                                          if p.stem.split("_")[0] in ORDER else len(ORDER), p.stem))
    tables = {}
    for path in paths:
        render = renderers.get(path.stem.split("_")[0])
        if render is None:
            continue
        res = json.loads(path.read_text())
        m = res["machine"]
        tables[path.stem] = "\n".join([f"### {path.stem} ({res['date']}; {m['cpu']}, {m['cores']} cores, "
                                       f"torch {m['torch']})", "", *render(res), ""])
    return tables


def join(tables: dict[str, str], names: tuple[str, ...] | None = None) -> str:
    """The tables of ``names`` (results file stems), in that order; every table, in report order, if None."""
    if names is None:
        return "\n".join(tables.values())
    missing = set(names) - set(tables)
    if missing:
        raise SystemExit(f"no results file for {', '.join(sorted(missing))} in {RESULTS}")
    return "\n".join(tables[name] for name in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true",
                   help="write every table to bench/results/REPORT.md and the headline runs' (HEADLINE_RESULTS) "
                        "between the bench markers of docs/benchmarks.md")
    args = p.parse_args()
    tables = render_tables()
    text = join(tables)
    if not args.write:
        print(text)
        return
    (RESULTS / "REPORT.md").write_text(text + "\n")
    doc = RESULTS.parents[1] / "docs" / "benchmarks.md"
    body = doc.read_text()
    start, end = body.index(HEADLINE_START) + len(HEADLINE_START), body.index(HEADLINE_END)
    doc.write_text(body[:start] + "\n" + join(tables, HEADLINE_RESULTS) + "\n" + body[end:])
    print(f"wrote {RESULTS / 'REPORT.md'} and {doc}")


if __name__ == "__main__":
    main()
