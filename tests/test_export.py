"""Export (pruning_core.export): a pruned model saved as a torch.export program and as ONNX computes its logits."""

import torch
from helpers import randomise

from pruning_core import build_model, export_model, load_exported, prune, trace_model, uniform_ratios


def test_export_reloads_with_same_logits(tmp_path):
    model = randomise(build_model("mobilenetv2"))
    trace = trace_model(model, (3, 32, 32))
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(model, uniform_ratios(trace, 0.5), scores, trace)
    files = export_model(pruned, tmp_path, (3, 32, 32))
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the one exported with
    with torch.no_grad():
        assert torch.allclose(load_exported(files["pt2"])(x), pruned(x), atol=1e-5)
    import onnxruntime as ort
    sess = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), pruned(x), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]
