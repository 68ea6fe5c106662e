"""Writing results: staged output folders (nothing half-written) and JSON files."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pruning_core.errors import UserError
from pruning_core.export import export_model
from pruning_core.latency import compare_latency

__all__ = ["add_latency", "check_out", "print_report", "staged_dir", "write_json", "write_pruned"]

log = logging.getLogger("prunepilot")


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success its files move into ``out`` (replacing same-named files,
    never folders), on failure it is removed.

    :raises UserError: ``out`` exists and is not a folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            if (out / f.name).is_dir():
                raise UserError(f"--out {out} holds a folder {f.name}, where a file goes; move it away")
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: str | Path, overwrite: bool = False, file: bool = False) -> None:
    """Fail at once, before any work, when ``out`` cannot become a folder (or with ``file``, a file) this process
    writes, or when writing would replace what is there and ``overwrite`` is off.

    :raises UserError: ``out`` is a file (a folder with ``file``), a non-empty folder (an existing file with
        ``file``) without ``overwrite``, lies under a file, or its nearest existing folder is not writable.
    """
    out = Path(out)
    if file:
        if out.is_dir():
            raise UserError(f"--out {out} is a folder")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists; pick another name or pass --overwrite")
        out = out.parent
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pick another folder or pass --overwrite (which replaces only "
                        "the files this command writes)")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"--out {out} lies under {base}, which is a file")
    try:
        tempfile.TemporaryDirectory(dir=base).cleanup()
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({base}: {e.strerror or e})") from e


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def print_report(report: dict, as_json: bool) -> None:
    """Print a report as one JSON line (``--json``) or as a one-line summary."""
    if as_json:
        print(json.dumps(report))
        return
    print(f"{report['model']} [{report['method']}]: FLOPs {report['flops_ratio']:.3f} of dense, params "
          f"{report['params_ratio']:.3f}, test acc {report['acc']:.2f}% (dense {report['acc_dense']:.2f}%)")
    if "acc_before_reconstruct" in report:
        print(f"layers refitted to the dense model by least squares (test acc without the refit: "
              f"{report['acc_before_reconstruct']:.2f}%)")
    vs = (report.get("search") or report.get("transfer") or {}).get("vs_uniform")
    if vs:  # what train or apply kept against the one-line baseline
        verdict = "kept it" if vs["kept"] == "best" else f"kept uniform (within {vs['z']:g} standard errors)"
        print(f"best candidate ({vs['best']}) leads uniform by {vs['lead']:.2f} ± {vs['se']:.2f} points on the "
              f"reward and select images: {verdict}")
    if report.get("excluded"):  # the reasons in full are in report.json
        reasons = [f"{name} ({why})" for name, why in report["excluded"].items()]
        more = f"; {len(reasons) - 2} more in report.json" if len(reasons) > 2 else ""
        print(f"left unpruned: {'; '.join(reasons[:2])}{more}")
    if "latency" in report:
        lat = report["latency"]
        print(f"latency ({lat['backend']}, batch {lat['batch_size']}): {lat['dense_ms']:.2f} ms dense -> "
              f"{lat['pruned_ms']:.2f} ms pruned, {lat['speedup']:.2f}x faster (FLOPs {lat['flops_speedup']:.2f}x)")


def add_latency(report: dict, session, model, backend: str, batch_size: int) -> dict:
    """Time ``model`` against the session's dense model (paired, :func:`pruning_core.compare_latency`) into
    ``report["latency"]``, with the FLOPs speed-up beside it.
    """
    log.info("timing the pruned model against dense (%s, batch %d)", backend, batch_size)
    report["latency"] = {**compare_latency(session.model, model, session.data.input_shape, batch_size, backend),
                         "flops_speedup": 1 / report["flops_ratio"]}
    return report


def write_pruned(out: str | Path, model, report: dict, input_shape: tuple[int, ...]) -> dict:
    """Export ``model`` (model.pt2, model.onnx) and ``report.json`` into ``out`` through a staged folder.

    Adds ``report["files"]`` (the final paths) and returns the report.
    """
    out = Path(out)
    with staged_dir(out) as tmp:
        meta = {"normalisation": report["normalisation"]} if "normalisation" in report else None
        files = export_model(model, tmp, input_shape, metadata=meta)
        report["files"] = {k: str(out / Path(v).name) for k, v in files.items()}
        write_json(tmp / "report.json", report)
    return report
