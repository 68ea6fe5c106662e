"""Shared pieces of the benchmarks: paths, the machine's description, timing and per-method evaluation."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from pruning_core import LatencyTable, PruningSession, SessionConfig, accuracy, kept_counts, measure_latency
from pruning_core.latency import compare_latency

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CIFAR = f"cifar10:{ASSETS / 'cifar10-subset'}"
WEIGHTS = {"resnet20": str(ASSETS / "weights" / "resnet20-12fca82f.th"),
           "resnet56": str(ASSETS / "weights" / "resnet56-4bfd9763.th")}
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def cifar_session(model: str, **config) -> PruningSession:
    """A session on the shared pretrained ``model`` and CIFAR-10 subset; ``config``: SessionConfig fields
    (split seed 0 unless given)."""
    return PruningSession(model, WEIGHTS[model], CIFAR, SessionConfig(**{"seed": 0, **config}))


def labelled_runs(paths: list[Path], all_seeds: bool = True):
    """``(label, run, result)`` for every kept model of these search results (a seeded method's first seed only
    unless ``all_seeds``), labelled as bench/latency.py times them: target, method (agents with their action
    space and results file), seed, rounding and dropped residual branches; a label seen before with other ratios
    gets ``(file)`` appended, one seen with the same ratios (e.g. uniform in every file) is skipped."""
    seen: dict[str, dict] = {}
    for path in paths:
        res = json.loads(path.read_text())
        space = res.get("rl_config", {}).get("granularity", "stage")  # the agents' action space in that run
        for target, methods in res["targets"].items():
            candidates = {}
            for m, r in methods.items():
                # agents differ between runs (action space, warm-up, ...): name their results file
                name = f"{m} {space} ({path.stem})" if m.startswith("rl-") else m
                if "runs" in r:
                    for run in r["runs"] if all_seeds else r["runs"][:1]:
                        candidates[f"{name} seed {run['seed']}"] = run
                elif "ratios" in r:
                    candidates[name] = r
            for name, run in candidates.items():
                label = f"{target} {name}" + (f" round_to={run['round_to']}" if run.get("round_to") else "")
                dropped = sum(r == 1.0 for r in run["ratios"].values())
                label += f", {dropped} blocks dropped" if dropped else ""
                if label in seen:
                    if run["ratios"] == seen[label]["ratios"]:
                        continue
                    label += f" ({path.stem})"
                seen[label] = run
                yield label, run, res


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return path


def latency_ms(model, input_shape, batch: int, backend: str = "torch") -> float:
    return 1000 * measure_latency(model, input_shape, batch, min_run_time=1.0, backend=backend)


def evaluate_method(session: PruningSession, ratios: dict[str, float], finetune_epochs: int, timing: dict,
                    round_to: int | None = None, latency_table: LatencyTable | None = None, **extra) -> dict:
    """Build with adaptive BN (kept channels rounded up to ``round_to``), measure accuracy, latency, then the
    shared fine-tune recipe. With ``latency_table``, the row also holds its predicted latency ratio.

    Latency is timed on ``timing["backend"]`` at batch 1 and 64, paired with the dense model
    (:func:`compare_latency`, ``timing["repeats"]`` sweeps): the speed-up is the median of per-sweep ratios, and
    ``dense_b{b}_ms`` is the dense timing of the sweep that ``latency_b{b}_ms`` comes from."""
    model = session.build(ratios, round_to)
    m = session.measure(ratios, round_to)
    row = {"round_to": round_to, "flops_ratio": m["flops_ratio"], "params_ratio": m["params_ratio"],
           "acc_reward": accuracy(model, session.splits.reward), "acc_test": accuracy(model, session.splits.test)}
    if latency_table is not None:
        row["latency_pred_ratio"] = latency_table.ratio(session.trace, kept_counts(session.trace, ratios, round_to))
    shape = session.data.input_shape
    for b in (1, 64):
        c = compare_latency(session.model, model, shape, b, timing["backend"], timing["repeats"])
        row.update({f"latency_b{b}_ms": c["pruned_ms"], f"dense_b{b}_ms": c["dense_ms"], f"speedup_b{b}": c["speedup"]})
    row["flops_speedup"] = 1 / m["flops_ratio"]
    if finetune_epochs:
        t = time.perf_counter()
        model = session.finetune(model, finetune_epochs)
        row["acc_test_finetuned"] = accuracy(model, session.splits.test)
        row["finetune_s"] = time.perf_counter() - t
    row["ratios"] = ratios
    best = extra.get("search_best")
    if best is not None:  # a search's own best episode, before re-scoring kept another candidate (or the same)
        best["same_as_kept"] = best["ratios"] == ratios
        if best["same_as_kept"]:  # the same model: its accuracies are the row's, measured before fine-tuning
            best.update(acc_reward=row["acc_reward"], acc_test=row["acc_test"])
        else:
            model = session.build(best["ratios"], round_to)
            best.update(acc_reward=accuracy(model, session.splits.reward),
                        acc_test=accuracy(model, session.splits.test))
        row["search_best_acc_test"] = best["acc_test"]
    return {**row, **extra}


def jpeg_folder(parts: tuple[str, ...] = ("train", "test")) -> Path:
    """The CIFAR-10 JPEG image folder (``train/`` and ``test/``, 60,000 images) of ``../shared/assets``, extracted
    once into ``bench/.cache/`` (only ``parts``)."""
    import tarfile

    root = ROOT / "bench" / ".cache" / "cifar10-jpeg"
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ASSETS / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(root, members=[m for m in tar.getmembers() if m.name.split("/")[0] in missing],
                           filter="data")
    return root


def unseen_split(session: PruningSession, limit: int | None = None, seed: int = 0):
    """CIFAR-10 JPEG test images the shared ResNets never saw: ``test/<class>/`` of ``cifar10-jpeg.tar.gz`` minus
    the JPEG twins of the 1,017 exact test images (per class the numbering follows the official order, so the
    first n_c files of class c are the twins), normalised like the session's images; ``limit`` of them at random.
    Extracted once into ``bench/.cache/``.
    """
    from pruning_core.data import read_folder
    from pruning_core.folder import class_names
    root = jpeg_folder(("test",))
    classes = class_names(root / "test")
    twins = torch.bincount(session.splits.test.y, minlength=len(classes)).tolist()
    x, y = read_folder(root / "test", classes, keep=lambda cls, k: k >= twins[classes.index(cls)])
    if limit is not None:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[idx], y[idx]
    train = session.splits.train
    return type(train)(x, y, train.mean, train.std, train.scale)
