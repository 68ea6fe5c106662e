"""How well a freshly measured latency table predicts the ONNX Runtime latency measured for the benchmark models.

Measures a ResNet-56 table (ORT, batch 64, as ``--max-latency`` does) and predicts, for every model that
``bench/latency.py`` timed into ``latency_budget.json`` and ``latency_r8.json``, its latency as a fraction of
dense. Three predictions: the table as fitted (offset from the half-width probe), the same entries scaled
proportionally (offset 0, the table before the probe), and the table each search run budgeted with (when it
recorded one). The error is predicted minus measured (1 / the paired ORT speed-up at batch 64).

    python bench/table_accuracy.py
    python bench/table_accuracy.py --timed drop --name table_accuracy_drop_xeon   # the dropped-block models

``--timed drop`` takes the AVX-512 runs whose models remove residual blocks (widths in 16-channel blocks), and
the uniform models timed beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import RESULTS, labelled_runs, write_result

from pruning_core import LatencyTable, build_model, kept_counts, trace_model

# latency results file -> the search results whose kept models it timed
TIMED = {"r8": {"latency_budget": ["search_latency", "search_latency_warmup"],
                "latency_r8": ["search_substage_r8", "search_substage_r8_warmup"]},
         "drop": {"latency_substage_drop_loss_xeon": ["search_substage_r16_drop_loss"],
                  "latency_substage_drop_loss_s345_xeon": ["search_substage_r16_drop_loss_s345"],
                  "latency_substage_drop_removed_xeon": ["search_substage_r16_drop_removed"],
                  "latency_taylor_drop_xeon": ["search_taylor_drop"],
                  "latency_uniform_r16_xeon": ["search_uniform_r16_lowflops"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timed", choices=sorted(TIMED), default="r8",
                   help="which timed models to predict: r8 (AVX2 machine, widths in multiples of 8; default) or drop")
    p.add_argument("--block", type=int, default=None,
                   help="the table's channel block (default: what LatencyTable.measure uses on this CPU)")
    p.add_argument("--name", default="table_accuracy", help="results file to write (default: table_accuracy)")
    args = p.parse_args()
    dense = build_model("resnet56").eval()
    trace = trace_model(dense, (3, 32, 32))
    t = time.perf_counter()
    table = LatencyTable.measure(dense, trace, "onnxruntime", 64, block=args.block)
    build_s = time.perf_counter() - t
    proportional = LatencyTable.from_dict({**table.to_dict(), "offset_ms": 0.0})
    print(f"table: {build_s:.1f}s, dense {table.dense_ms:.1f} ms, offset {table.offset_ms:.2f} ms, probe "
          f"{table.probe['speedup']:.3f}x", flush=True)
    rows = []
    for timed, stems in TIMED[args.timed].items():
        measured = json.loads((RESULTS / f"{timed}.json").read_text())["models"]
        for label, run, res in labelled_runs([RESULTS / f"{stem}.json" for stem in stems]):
            if label not in measured:
                continue
            kept = kept_counts(trace, run["ratios"], run.get("round_to"))
            own = LatencyTable.from_dict(res["latency_budget"]["table"]) if "latency_budget" in res else None
            row = {"timed_in": timed, "model": label, "measured": 1 / measured[label]["ort_speedup_b64"],
                   "fitted": table.ratio(trace, kept), "proportional": proportional.ratio(trace, kept),
                   "run_table": own.ratio(trace, kept) if own else None}
            rows.append(row)
            print(f"{label}: measured {row['measured']:.3f}, fitted {row['fitted']:.3f}, proportional "
                  f"{row['proportional']:.3f}" + (f", run's table {row['run_table']:.3f}" if own else ""), flush=True)
    errors = {}
    for k in ("fitted", "proportional", "run_table"):
        e = [r[k] - r["measured"] for r in rows if r[k] is not None]
        if not e:
            continue  # e.g. no run budgeted with a table of its own
        errors[k] = {"mean": statistics.mean(e), "max_abs": max(map(abs, e)), "models": len(e)}
        print(f"{k}: mean error {errors[k]['mean']:+.4f}, max |error| {errors[k]['max_abs']:.4f} "
              f"({len(e)} models)", flush=True)
    fit = {"build_s": build_s, "block": table.block, "dense_ms": table.dense_ms, "offset_ms": table.offset_ms,
           "probe_speedup": table.probe["speedup"]}
    write_result(args.name, {"timed": args.timed, "table": fit, "errors": errors, "rows": rows})


if __name__ == "__main__":
    main()
