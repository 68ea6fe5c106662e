"""Trace a model into a :class:`~pruning_core.graph.ModelTrace`: prunable channel groups, per-layer shapes and
the layer graph.

Coupling comes from Torch-Pruning's ``DependencyGraph``. Each group it proposes is checked before it is accepted:
every member whose *output* channels are removed must be covered completely and bijectively by the group's
channels, and every op between a group's layers must keep channel j as channel j. Torch-Pruning 1.6.1 couples the
three residual streams of the CIFAR ResNets (whose "option A" shortcut zero-pads channels) into one 16-index group;
that group fails the check and is excluded with a logged reason, so those channels stay unpruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from pruning_core.errors import UserError
from pruning_core.graph import GraphNode, LayerInfo, ModelTrace
from pruning_core.groups import channel_groups
from pruning_core.opcheck import NORMS, SUPPORTED, OpShapes, is_layer, nodes_between, reshape_failure, shared_slope

__all__ = ["trace_model"]

log = logging.getLogger(__name__)

# autograd function names (Torch-Pruning's element-wise ops) that become layer-graph nodes
_GRAPH_OPS = {"AddBackward0": "add", "CatBackward0": "concat", "AvgPool2DBackward0": "pool",
              "MaxPool2DWithIndicesBackward0": "pool", "AdaptiveAvgPool2DBackward0": "pool",
              "MeanBackward1": "pool", "AdaptiveMaxPool2DBackward0": "pool"}


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> ModelTrace:
    """Trace ``model`` once (on a copy's forward at batch 1) and return its :class:`ModelTrace`.

    :param input_shape: one input without the batch dimension, e.g. ``(3, 32, 32)``.
    :raises UserError: an unsupported layer, or a model that does not run on ``input_shape``.
    """
    _check_supported(model)
    names = {m: n for n, m in model.named_modules()}
    run = _run(model, input_shape, names)
    _warn_idle(model, run.calls)
    layers, has_bias = _layer_infos(model, run.shapes)
    nodes, edges = _layer_graph(run.dg, names)
    order = {n.module: i for i, n in enumerate(nodes) if n.module}
    outputs = _output_layers(run.dg, names)
    groups, excluded = channel_groups(run.dg, model, names, layers, outputs, run.op_shapes.shapes, run.inner)
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    for name, reason in excluded.items():
        log.info("group %s is not prunable: %s", name, reason)
    slopes = {n: "" for m, n in names.items() if shared_slope(m)}
    slopes.update({n: g.name for g in groups for n in g.shared_slopes})
    return ModelTrace(tuple(input_shape), layers, groups, excluded, nodes, edges, has_bias=has_bias,
                      shared_slopes=slopes)


def _check_supported(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        own_params = list(mod.parameters(recurse=False))
        if own_params and not isinstance(mod, SUPPORTED):
            raise UserError(f"module {name!r} ({type(mod).__name__}) has parameters but is not supported; "
                            "prunepilot prunes networks of Conv2d, Linear, BatchNorm1d/2d, InstanceNorm2d, GroupNorm "
                            "and PReLU layers")


@dataclass
class _Run:
    """What the forward hooks record: each layer's output size and calls in a plain forward pass, then the ops
    inside layers in Torch-Pruning's pass.
    """

    names: dict
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    # autograd nodes inside a layer's own forward (instance norm's reshapes, PReLU's slopes)
    inner: set = field(default_factory=set)
    op_shapes: OpShapes | None = None  # set for Torch-Pruning's pass
    dg: tp.DependencyGraph | None = None

    def hook(self, mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if self.op_shapes is not None:  # Torch-Pruning's pass
            self.inner.update(nodes_between(out.grad_fn, {t.grad_fn for t in inp if isinstance(t, torch.Tensor)}))
            return
        name = self.names[mod]
        self.calls[name] = self.calls.get(name, 0) + 1
        if is_layer(mod):
            self.shapes[name] = tuple(out.shape[2:4]) if out.dim() == 4 else (1, 1)


def _run(model: nn.Module, input_shape: tuple[int, ...], names: dict) -> _Run:
    """Run ``model`` in eval mode twice: a plain forward pass, then Torch-Pruning's ``DependencyGraph`` build.

    :raises UserError: the model does not run, or calls a layer more than once.
    """
    run = _Run(names)
    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(run.hook) for m in model.modules() if isinstance(m, SUPPORTED)]
    try:
        with torch.no_grad():  # one plain forward pass: the shapes, and how often each layer runs
            model(torch.zeros(1, *input_shape))
        shared = sorted(name for name, n in run.calls.items() if n > 1)
        if not shared:
            run.op_shapes = OpShapes()
            with run.op_shapes:
                run.dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001 - report any tracing failure as a user error with the cause
        raise UserError(f"cannot trace {type(model).__name__} on input shape {input_shape}: "
                        f"{reshape_failure(e) or e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if shared:
        raise UserError(f"{type(model).__name__} calls {', '.join(map(repr, shared))} more than once per forward "
                        "pass (shared weights); prunepilot needs each layer with parameters used once")
    return run


def _warn_idle(model: nn.Module, calls: dict[str, int]) -> None:
    """Warn of layers that did not run in eval mode."""
    idle = sorted({n.split(".")[0] for n, m in model.named_modules() if is_layer(m) and n not in calls})
    if idle:
        log.warning("%s: layers under %s do not run in eval mode (auxiliary heads?) and are not pruned, so they "
                    "will not fit the pruned model in train mode; remove them before fine-tuning",
                    type(model).__name__, ", ".join(idle))


def _layer_infos(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, LayerInfo], dict[str, bool]]:
    """Each layer that ran, and whether it has a bias (a norm: whether it is affine, with a gate and a bias)."""
    layers: dict[str, LayerInfo] = {}
    has_bias: dict[str, bool] = {}
    for name, mod in model.named_modules():
        if name not in shapes:
            continue
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            layers[name] = LayerInfo(name, "conv", mod.in_channels, mod.out_channels, kh, mod.stride[0], mod.groups,
                                     shapes[name], kernel_w=kw if kw != kh else 0)
            has_bias[name] = mod.bias is not None
        elif isinstance(mod, nn.Linear):
            layers[name] = LayerInfo(name, "linear", mod.in_features, mod.out_features)
            has_bias[name] = mod.bias is not None
        elif isinstance(mod, NORMS):
            c = mod.num_channels if isinstance(mod, nn.GroupNorm) else mod.num_features
            layers[name] = LayerInfo(name, "bn", c, c, out_hw=shapes[name])
            has_bias[name] = mod.affine  # BN: whether it has a gate and a bias (affine)
        elif isinstance(mod, nn.PReLU):
            layers[name] = LayerInfo(name, "act", mod.num_parameters, mod.num_parameters, out_hw=shapes[name])
            has_bias[name] = False
    return layers, has_bias


def _output_layers(dg: tp.DependencyGraph, names: dict) -> list[str]:
    """The conv/linear layers whose output channels are the model's outputs (the classes): those reached from each
    output backwards through anything but a conv or linear layer (BN, pooling, flatten, softmax, add, concat), as
    in a classifier that is a 1x1 conv followed by global pooling. Their output channels are never pruned.
    """
    found, seen = [], set()
    todo = [node for node in dg.module2node.values() if not node.outputs]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, (nn.Conv2d, nn.Linear)) and node.module in names:
            found.append(names[node.module])
        else:
            todo.extend(node.inputs)
    return sorted(found)


def _layer_graph(dg: tp.DependencyGraph, names: dict) -> tuple[list[GraphNode], list[tuple[int, int]]]:
    """Contract Torch-Pruning's traced node graph to the layers and ops that matter."""
    tp_nodes = list(dg.module2node.values())
    kept = {id(n): _node_kind(n) for n in tp_nodes}
    # successors of each kept node, skipping through the others
    def kept_successors(node, seen: set) -> list:
        out = []
        for nxt in node.outputs:
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            out.extend([nxt] if kept[id(nxt)] else kept_successors(nxt, seen))
        return out

    succ = {id(n): kept_successors(n, set()) for n in tp_nodes if kept[id(n)]}
    by_id = {id(n): n for n in tp_nodes}
    order = _topological_order(succ, by_id, names)
    index = {k: i for i, k in enumerate(order)}
    nodes = []
    counters: dict[str, int] = {}
    for k in order:
        n = by_id[k]
        op = kept[k]
        if n.module in names:
            nodes.append(GraphNode(names[n.module], op, names[n.module]))
        else:
            counters[op] = counters.get(op, 0) + 1
            nodes.append(GraphNode(f"{op}_{counters[op]}", op, None))
    edges = sorted({(index[k], index[id(o)]) for k in order for o in succ[k]})
    return nodes, edges


def _node_kind(node) -> str | None:
    """The layer-graph kind of a Torch-Pruning node, or None for a node the graph skips through."""
    mod = node.module
    if isinstance(mod, nn.Conv2d):
        return "dwconv" if mod.groups > 1 else "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, NORMS):
        return "bn"
    if type(mod).__name__ == "_ConcatOp":
        return "concat"
    fn = node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""
    return _GRAPH_OPS.get(fn)


def _topological_order(succ: dict[int, list], by_id: dict[int, object], names: dict) -> list[int]:
    """The kept nodes (by id) in topological order (Kahn), ties broken by discovery order from the inputs."""
    indeg = {k: 0 for k in succ}
    for outs in succ.values():
        for o in outs:
            indeg[id(o)] += 1
    ready = sorted((k for k, d in indeg.items() if d == 0), key=lambda k: _def_key(by_id[k], names))
    order: list[int] = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for o in sorted(succ[k], key=lambda n: _def_key(n, names)):
            indeg[id(o)] -= 1
            if indeg[id(o)] == 0:
                ready.append(id(o))
    return order


def _def_key(node, names: dict) -> tuple[int, str]:
    name = names.get(node.module)
    return (0, name) if name is not None else (1, node.name)
