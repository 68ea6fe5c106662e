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
import math

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from pruning_core.errors import UserError
from pruning_core.graph import ChannelGroup, GraphNode, LayerInfo, Member, ModelTrace

__all__ = ["trace_model"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)
_SUPPORTED = (nn.Conv2d, nn.Linear, *_BN, nn.PReLU)  # PReLU with one slope per channel is an "act" layer
# autograd function names (Torch-Pruning's element-wise ops) that become layer-graph nodes
_GRAPH_OPS = {"AddBackward0": "add", "CatBackward0": "concat", "AvgPool2DBackward0": "pool",
              "MaxPool2DWithIndicesBackward0": "pool", "AdaptiveAvgPool2DBackward0": "pool",
              "MeanBackward1": "pool", "AdaptiveMaxPool2DBackward0": "pool"}

# Functional ops a channel group may pass through. Torch-Pruning treats an op it does not know as element-wise,
# so channel j stays channel j; that is wrong for a pixel or channel shuffle, a flip, a softmax or a norm over the
# channels, and a group through any op not listed here is excluded instead (its channels stay unpruned).
_ELEMENTWISE = frozenset(
    "Relu Hardtanh LeakyRelu Elu Gelu Silu Mish Hardswish Hardsigmoid Sigmoid Tanh Softplus Threshold Add Sub Mul "
    "Div Neg Abs Exp Pow Sqrt Rsqrt Reciprocal Clamp ClampMin ClampMax Maximum Minimum Where Clone ToCopy Alias "
    "Expand T NativeDropout AvgPool2D MaxPool2DWithIndices AdaptiveAvgPool2D AdaptiveMaxPool2D UpsampleNearest2D "
    "UpsampleBilinear2D UpsampleBicubic2D Cat Split SplitWithSizes Slice".split())
_REDUCTIONS = frozenset("Mean Sum Amax Amin Max Min Std Var Logsumexp LinalgVectorNorm Softmax LogSoftmax".split())
_RESHAPES = frozenset("View UnsafeView Reshape ReshapeAlias Squeeze Unsqueeze".split())
_PADS = frozenset("ConstantPadNd ReflectionPad2D ReplicationPad2D".split())


def _shared_slope(mod: nn.Module) -> bool:
    """A PReLU with one slope for every channel: an element-wise op, not a layer of the trace."""
    return isinstance(mod, nn.PReLU) and mod.num_parameters == 1


def _is_layer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a layer of the trace (see :func:`_shared_slope`)."""
    return isinstance(mod, _SUPPORTED) and not _shared_slope(mod)


def _check_supported(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        own_params = list(mod.parameters(recurse=False))
        if own_params and not isinstance(mod, _SUPPORTED):
            raise UserError(f"module {name!r} ({type(mod).__name__}) has parameters but is not supported; "
                            "prunepilot prunes networks of Conv2d, Linear, BatchNorm1d/2d, InstanceNorm2d, GroupNorm "
                            "and PReLU layers")


def _reshape_failure(e: Exception) -> str | None:
    """What Torch-Pruning was mapping when it failed inside its reshape index mapping, named, or None."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "update_reshape_index_mapping":
            node = tb.tb_frame.f_locals.get("reshape_node")
            where = getattr(node, "name", None) or "a reshape"
            return (f"{where} reshapes the channel dimension (as ShuffleNet's channel shuffle does: view, transpose, "
                    f"view), which channels cannot be traced through one by one ({type(e).__name__}: {e})")
        tb = tb.tb_next
    return None


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> ModelTrace:
    """Trace ``model`` once (on a copy's forward at batch 1) and return its :class:`ModelTrace`.

    :param input_shape: one input without the batch dimension, e.g. ``(3, 32, 32)``.
    :raises UserError: an unsupported layer, or a model that does not run on ``input_shape``.
    """
    _check_supported(model)
    was_training = model.training
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, tuple[int, int]] = {}
    calls: dict[str, int] = {}
    inner: set = set()  # autograd nodes inside a layer's own forward (instance norm's reshapes, PReLU's slopes)
    op_shapes: _OpShapes | None = None

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if op_shapes is not None:  # Torch-Pruning's pass
            inner.update(_nodes_between(out.grad_fn, {t.grad_fn for t in inp if isinstance(t, torch.Tensor)}))
            return
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        if _is_layer(mod):
            shapes[names[mod]] = tuple(out.shape[2:4]) if out.dim() == 4 else (1, 1)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _SUPPORTED)]
    try:
        with torch.no_grad():  # one plain forward pass: the shapes, and how often each layer runs
            model(torch.zeros(1, *input_shape))
        shared = sorted(name for name, n in calls.items() if n > 1)
        if not shared:
            op_shapes = _OpShapes()
            with op_shapes:
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001 - report any tracing failure as a user error with the cause
        raise UserError(f"cannot trace {type(model).__name__} on input shape {input_shape}: "
                        f"{_reshape_failure(e) or e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if shared:
        raise UserError(f"{type(model).__name__} calls {', '.join(map(repr, shared))} more than once per forward "
                        "pass (shared weights); prunepilot needs each layer with parameters used once")
    idle = sorted({n.split(".")[0] for n, m in model.named_modules() if _is_layer(m) and n not in calls})
    if idle:
        log.warning("%s: layers under %s do not run in eval mode (auxiliary heads?) and are not pruned, so they "
                    "will not fit the pruned model in train mode; remove them before fine-tuning",
                    type(model).__name__, ", ".join(idle))

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
        elif isinstance(mod, _BN):
            c = mod.num_channels if isinstance(mod, nn.GroupNorm) else mod.num_features
            layers[name] = LayerInfo(name, "bn", c, c, out_hw=shapes[name])
            has_bias[name] = mod.affine  # BN: whether it has a gate and a bias (affine)
        elif isinstance(mod, nn.PReLU):
            layers[name] = LayerInfo(name, "act", mod.num_parameters, mod.num_parameters, out_hw=shapes[name])
            has_bias[name] = False

    nodes, edges = _layer_graph(dg, names)
    order = {n.module: i for i, n in enumerate(nodes) if n.module}
    outputs = _output_layers(dg, names)
    groups, excluded = _channel_groups(dg, model, names, layers, outputs, op_shapes.shapes, inner)
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    for name, reason in excluded.items():
        log.info("group %s is not prunable: %s", name, reason)
    slopes = {n: "" for m, n in names.items() if _shared_slope(m)}
    slopes.update({n: g.name for g in groups for n in g.shared_slopes})
    return ModelTrace(tuple(input_shape), layers, groups, excluded, nodes, edges, has_bias=has_bias,
                      shared_slopes=slopes)


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


class _OpShapes(TorchFunctionMode):
    """Records, for the autograd node of each op in a forward pass, the shapes of its first tensor input and of its
    output: what a reshape did to the channel dimension, which the node itself does not keep.
    """

    def __init__(self):
        super().__init__()
        self.shapes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.grad_fn not in self.shapes:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.shapes[out.grad_fn] = (None if first is None else tuple(first.shape), tuple(out.shape))
        return out


def _channel_op_problem(grad_fn, shapes: dict) -> str | None:
    """Why a group's channels cannot pass through this functional op one to one (None if they can): the op is
    not known to keep channel j at position j of dimension 1 (see ``_ELEMENTWISE``), or it reduces, normalises
    over, reorders or reshapes that dimension.
    """
    if grad_fn is None:
        return None
    op = grad_fn.name().rstrip("0123456789").removesuffix("Backward").lstrip("_")
    if op in _ELEMENTWISE:
        return None
    in_shape, out_shape = shapes.get(grad_fn, (None, None))

    def dims(attr: str) -> tuple[int, ...] | None:  # a saved dimension argument, made non-negative
        value = getattr(grad_fn, attr, None)
        if value is None or in_shape is None:
            return None
        return tuple((d - 2**64 if d >= 2**63 else d) % len(in_shape) for d in (value if isinstance(value, tuple)
                                                                               else (value,)))

    if op in _REDUCTIONS:
        reduced = dims("_saved_dim")
        if reduced is not None and 1 not in reduced and (0 not in reduced or getattr(grad_fn, "_saved_keepdim", 0)):
            return None  # over space, or over the batch with its dimension kept: channel j stays at j
        if reduced is None:
            return f"{op} over every dimension mixes channels"
        if 1 in reduced:
            return f"{op} over the channel dimension mixes channels"
        return f"{op} over the batch dimension moves the channels out of dimension 1"
    if op in ("Transpose", "Permute", "Flip"):
        if op == "Permute":  # the dimensions that the permutation moves
            order = dims("_saved_dims")
            moved = None if order is None else {i for i, d in enumerate(order) if d != i}
        elif op == "Transpose":
            pair = (dims("_saved_dim0") or ()) + (dims("_saved_dim1") or ())
            moved = set(pair) if len(pair) == 2 and pair[0] != pair[1] else None
        else:
            moved = None if dims("_saved_dims") is None else set(dims("_saved_dims"))
        if moved is not None and not moved & {0, 1}:
            return None
        return f"{op} reorders the channels"
    if op in _RESHAPES | _PADS and in_shape is not None and out_shape is not None and len(in_shape) >= 2:
        n, c, rest = in_shape[0], in_shape[1], math.prod(in_shape[2:])
        if len(out_shape) >= 2 and out_shape[0] == n and (out_shape[1] == c or (  # channels stay in dimension 1,
                op in _RESHAPES and len(out_shape) == 2 and out_shape[1] == c * rest)):  # or a flatten into a linear
            return None
        return f"{op} from {list(in_shape)} to {list(out_shape)} changes the channel dimension"
    return f"{op} is not known to keep channels one to one"


def _nodes_between(start, stop: set) -> set:
    """The autograd nodes from ``start`` back to (not into) the ``stop`` nodes: the ops of one layer's forward."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in stop or node in seen:
            continue
        seen.add(node)
        todo.extend(f for f, _ in node.next_functions)
    return seen


def _channel_groups(dg: tp.DependencyGraph, model: nn.Module, names: dict, layers: dict[str, LayerInfo],
                    outputs: list[str], op_shapes: dict, inner: set) -> tuple[list[ChannelGroup], dict[str, str]]:
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in outputs]
    groups: list[ChannelGroup] = []
    excluded: dict[str, str] = {}
    definition_order = {n: i for i, n in enumerate(modules)}
    for tp_group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root_len = len(tp_group.items[0].idxs)
        members: list[Member] = []
        problem, blocks, unit, slopes = None, 1, 1, []
        for item in tp_group.items:
            mod = item.dep.target.module
            if _shared_slope(mod):  # element-wise
                slopes.append(names[mod])
                continue
            if mod not in names or not isinstance(mod, _SUPPORTED):  # functional op: nothing to cut, but it must
                if item.dep.target.grad_fn in inner:  # keep channels one to one, unless the op is part of a
                    continue  # layer's own forward (instance norm's reshapes, PReLU's slopes), cut with the layer
                problem = _channel_op_problem(item.dep.target.grad_fn, op_shapes)  # keep channels one to one
                if problem:
                    break
                continue
            name = names[mod]
            handler = item.dep.handler.__name__
            dim = "out" if handler == "prune_out_channels" or isinstance(mod, (*_BN, nn.PReLU)) else "in"
            info = layers[name]
            full = info.out_channels if dim == "out" else info.in_channels
            root_idxs = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
            idxs = [int(i) for i in item.idxs]
            index: list[list[int]] = [[] for _ in range(root_len)]
            for r, i in zip(root_idxs, idxs):
                if r >= root_len:
                    problem = f"{name} maps to group channel {r} of {root_len}"
                    break
                index[r].append(i)
            if problem:
                break
            partial = len(idxs) != full or sorted(idxs) != list(range(full))
            if partial and dim == "out" and isinstance(mod, (*_BN, nn.PReLU)) and not isinstance(mod, nn.GroupNorm):
                dim = "in"  # a norm reading a concat (DenseNet): sliced per input, as a conv reading it is
            if dim == "out" and partial:
                problem = (f"{name} has {full} output channels but the traced group covers {len(set(idxs))} of "
                           "them (a channel-padding or slicing op couples unequal widths)")
                break
            if any(len(ix) != len(index[0]) for ix in index) or len(set(idxs)) != len(idxs):
                problem = f"{name} maps group channels unevenly"
                break
            # whether this layer's channels are the group's channels, one to one and in order
            alone = full == root_len and all(ix == [j] for j, ix in enumerate(index))
            if info.kind == "conv" and info.groups > 1 and not info.depthwise:  # a grouped conv: blocks stay even
                if not alone:
                    problem = f"grouped conv {name} (groups={info.groups}) has channels of this group among others"
                    break
                blocks = math.lcm(blocks, info.groups)
                if blocks == root_len:
                    problem = (f"grouped conv {name} (groups={info.groups}) reads each of these channels in a conv "
                               "group of its own (a depthwise conv with a channel multiplier)"
                               if info.groups == root_len else
                               f"grouped convs on these {root_len} channels have group counts whose least common "
                               f"multiple is {root_len} ({name}: groups={info.groups}), so no cut keeps them all even")
                    break
            if isinstance(mod, nn.GroupNorm):  # whole norm groups go
                if not alone:
                    problem = f"group norm {name} has channels of this group among others"
                    break
                unit = math.lcm(unit, full // mod.num_groups)
                if unit == root_len:
                    problem = (f"group norm {name} (num_groups={mod.num_groups}) normalises all these channels together"
                               if mod.num_groups == 1 else
                               f"group norms of {root_len} channels in norm groups that do not nest ({name}): "
                               f"whole norm groups of all of them make one unit of all {root_len} channels")
                    break
                if root_len % unit:
                    problem = f"group norms of {root_len} channels in norm groups that do not nest ({name})"
                    break
            if blocks > 1 and unit > 1:
                problem = f"{name}: a grouped conv and a group norm on the same channels are not supported"
                break
            if (name, dim) not in {(m.module, m.dim) for m in members}:  # a layer may read what it scales
                members.append(Member(name, dim, tuple(tuple(ix) for ix in index)))
        outs = [m for m in members if m.dim == "out" and layers[m.module].weighted]
        candidates = sorted(outs or members, key=lambda m: (layers[m.module].depthwise, definition_order[m.module]))
        gname = candidates[0].module if candidates else names.get(tp_group.items[0].dep.target.module, "?")
        if problem is None and not outs:
            problem = "no conv or linear layer produces these channels"
        if problem:
            excluded[gname] = problem
            continue
        groups.append(ChannelGroup(gname, root_len, members, blocks, tuple(dict.fromkeys(slopes)), unit))
    return groups, excluded


def _layer_graph(dg: tp.DependencyGraph, names: dict) -> tuple[list[GraphNode], list[tuple[int, int]]]:
    """Contract Torch-Pruning's traced node graph to the layers and ops that matter."""
    tp_nodes = list(dg.module2node.values())

    def kind(node) -> str | None:
        mod = node.module
        if isinstance(mod, nn.Conv2d):
            return "dwconv" if mod.groups > 1 else "conv"
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, _BN):
            return "bn"
        if type(mod).__name__ == "_ConcatOp":
            return "concat"
        fn = node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""
        return _GRAPH_OPS.get(fn)

    kept = {id(n): kind(n) for n in tp_nodes}
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
    # topological order (Kahn), ties broken by discovery order from the inputs
    indeg = {k: 0 for k in succ}
    for outs in succ.values():
        for o in outs:
            indeg[id(o)] += 1
    by_id = {id(n): n for n in tp_nodes}
    ready = sorted((k for k, d in indeg.items() if d == 0), key=lambda k: _def_key(by_id[k], names))
    order: list[int] = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for o in sorted(succ[k], key=lambda n: _def_key(n, names)):
            indeg[id(o)] -= 1
            if indeg[id(o)] == 0:
                ready.append(id(o))
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


def _def_key(node, names: dict) -> tuple[int, str]:
    name = names.get(node.module)
    return (0, name) if name is not None else (1, node.name)
