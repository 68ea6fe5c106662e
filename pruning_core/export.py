"""Export a pruned model so it reloads without its Python class: ``torch.export`` (.pt2) and ONNX."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from pruning_core.device import cpu_copy
from pruning_core.errors import UserError

__all__ = ["export_model", "load_exported"]

log = logging.getLogger(__name__)


def export_model(model: nn.Module, out_dir: str | Path, input_shape: tuple[int, ...], onnx: bool = True,
                 atol: float = 1e-4, metadata: dict[str, object] | None = None) -> dict[str, str]:
    """Write ``model.pt2`` (``torch.export``, dynamic batch) and, if onnx/onnxruntime are installed, ``model.onnx``
    with ``metadata`` (such as the input normalisation) as JSON strings in its ``metadata_props``.

    Each file is reloaded and checked to give the same logits as ``model`` within ``atol`` relative to their scale.
    Files are written to a temporary name first, so a failure leaves nothing half-written.

    :returns: format name -> path of each file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = cpu_copy(model).eval()  # the files load anywhere; the check runs on the CPU
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    written: dict[str, str] = {}
    pt2 = out_dir / "model.pt2"
    tmp = out_dir / ".model.tmp.pt2"  # torch.export wants the .pt2 suffix
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp)
    with torch.no_grad():
        _check(load_exported(tmp)(x), ref, atol, "torch.export")
    tmp.replace(pt2)
    written["pt2"] = str(pt2)
    if onnx:
        try:
            import onnxruntime as ort
        except ImportError:
            log.info("onnxruntime not installed: skipping ONNX export (pip install 'prunepilot[export]')")
            return written
        path = out_dir / "model.onnx"
        tmp = out_dir / ".model.tmp.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        if metadata:
            import onnx as onnx_lib
            proto = onnx_lib.load(str(tmp))
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=json.dumps(value))
            onnx_lib.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        _check(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), ref, atol, "ONNX")
        tmp.replace(path)
        written["onnx"] = str(path)
    return written


def load_exported(path: str | Path) -> nn.Module:
    """Reload a ``model.pt2`` as a callable module (no Python class needed)."""
    return torch.export.load(str(path)).module()


def _check(out: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    """The exported logits match within ``atol`` times the logits' scale (at least 1), as float32 rounding does.

    :raises UserError: they do not.
    """
    err, scale = float((out - ref).abs().max()), max(1.0, float(ref.abs().max()))
    if err > atol * scale:
        raise UserError(f"{what} export changed the logits (max abs diff {err:.2e}, more than {atol} x their scale "
                        f"{scale:.3g}); the model may hold an op the exporter does not support")
