"""Every kept model of the results table, re-measured on the ~9,000 CIFAR-10 images the networks never saw.

The 1,017 exact test images resolve about 1.3 points per model; two methods that differ by less are not told apart
there. This rebuilds each kept model of the methods runs as ``bench/methods.py`` built it (the run's seed draws its
calibration images, so the same refitted model; its test accuracy is checked against the file) and scores it on the JPEG
test images minus the twins of the exact test images (``common.unseen_split``, all of them), the validation images the
protocol allows choices on. Per method it reports the mean test and unseen accuracy, and for ``train`` rows against
random search (and a variant such as ``train-120-prior`` against the ``train`` row it varies) the paired difference per
seed, and over seeds with its standard error from the images (per image, the difference in correctness averaged over the
seeds: how far another draw of as many images could move it).

Example (from bench/, PYTHONPATH=..): python unseen_check.py methods_r20_05_screen_amd methods_r56_05_screen_amd \
    --name unseen_check_amd
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import cifar_session, unseen_split, write_result
from methods import commit
from render_methods import merged

from pruning_core import correct

SPLITS = ("test", "unseen")


def scored(model: torch.nn.Module, session, unseen) -> dict[str, torch.Tensor]:
    """:func:`~pruning_core.correct` on the session's test images and on ``unseen``, keyed by :data:`SPLITS`."""
    return {split: correct(model, images) for split, images in zip(SPLITS, (session.splits.test, unseen))}


def paired(mine: dict[int, dict], other: dict[int, dict], split: str) -> dict:
    """``mine`` minus ``other`` (per seed: correctness vectors) on ``split`` over their common seeds: per seed, the
    mean, and its standard error from the images."""
    seeds = sorted(mine.keys() & other.keys())
    per_image = torch.stack([mine[s][split] - other[s][split] for s in seeds]).mean(0)
    return {"seeds": seeds, "per_seed": [100 * float((mine[s][split] - other[s][split]).mean()) for s in seeds],
            "mean": 100 * float(per_image.mean()), "se": 100 * float(per_image.std() / len(per_image) ** 0.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="methods results files in bench/results/, without .json (merged as "
                                            "render_methods.py merges them)")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    at = commit()  # before this run writes its own (tracked) results file
    sessions, unseen, out = {}, {}, {}
    for (model, target), methods in merged(args.names).items():
        block, vectors = out.setdefault(model, {}).setdefault(target, {}), {}
        for method, (entry, run_commit, _) in methods.items():
            runs, vectors[method] = [], {}
            for run in entry.get("runs", [entry]):
                seed = run.get("seed", 0)
                if (model, seed) not in sessions:
                    sessions[(model, seed)] = cifar_session(model, select_images=1000, seed=seed, reconstruct=True)
                session = sessions[(model, seed)]
                if model not in unseen:  # and the dense network's accuracy there, for scale
                    unseen[model] = unseen_split(session)
                    out[model]["dense"] = {split: 100 * float(v.mean())
                                           for split, v in scored(session.model, session, unseen[model]).items()}
                    print(f"{model} dense: {out[model]['dense']}", flush=True)
                kept, _ = session.build_final(run["ratios"])
                vectors[method][seed] = scored(kept, session, unseen[model])
                runs.append({"seed": seed, **{f"acc_{split}": 100 * float(v.mean())
                                              for split, v in vectors[method][seed].items()}})
                assert abs(runs[-1]["acc_test"] - run["acc_test"]) < 1e-6, (model, target, method, seed, run)
            block[method] = {"commit": run_commit, "runs": runs,
                             **{f"acc_{split}": statistics.mean(r[f"acc_{split}"] for r in runs) for split in SPLITS}}
            print(f"{model} {target} {method:16s} test {block[method]['acc_test']:.2f}  "
                  f"unseen {block[method]['acc_unseen']:.2f}  ({len(runs)} runs)", flush=True)
        for method in [m for m in block if m.startswith("train")]:  # against random search and the train it varies
            for other in [m for m in block if m.startswith("random") or method.startswith(m + "-")]:
                if vectors[method].keys() & vectors[other].keys():
                    block[method][f"minus_{other}"] = diff = {split: paired(vectors[method], vectors[other], split)
                                                              for split in SPLITS}
                    print(f"   {method} - {other}: " + "; ".join(
                        f"{split} {d['mean']:+.2f} +- {d['se']:.2f} (per seed " +
                        " ".join(f"{x:+.2f}" for x in d["per_seed"]) + ")" for split, d in diff.items()), flush=True)
        config = {"names": args.names, "unseen_images": len(next(iter(unseen.values())).y)}
        write_result(args.name, {"commit": at, "config": config, "models": out})


if __name__ == "__main__":
    main()
