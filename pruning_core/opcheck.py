"""What the tracer accepts: the module types that are layers of a trace, and whether a functional op keeps a channel
group's channels one to one (reading the shapes that :class:`OpShapes` records in Torch-Pruning's forward pass).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["NORMS", "SUPPORTED", "OpShapes", "channel_op_problem", "is_layer", "nodes_between", "reshape_failure",
           "shared_slope"]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)
SUPPORTED = (nn.Conv2d, nn.Linear, *NORMS, nn.PReLU)  # PReLU with one slope per channel is an "act" layer

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


def shared_slope(mod: nn.Module) -> bool:
    """A PReLU with one slope for every channel: an element-wise op, not a layer of the trace."""
    return isinstance(mod, nn.PReLU) and mod.num_parameters == 1


def is_layer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a layer of the trace (see :func:`shared_slope`)."""
    return isinstance(mod, SUPPORTED) and not shared_slope(mod)


class OpShapes(TorchFunctionMode):
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


def channel_op_problem(grad_fn, shapes: dict) -> str | None:
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
    if op in _REDUCTIONS:
        return _reduction_problem(op, grad_fn, in_shape)
    if op in ("Transpose", "Permute", "Flip"):
        return _reorder_problem(op, grad_fn, in_shape)
    if op in _RESHAPES | _PADS and in_shape is not None and out_shape is not None and len(in_shape) >= 2:
        return _reshape_problem(op, in_shape, out_shape)
    return f"{op} is not known to keep channels one to one"


def _saved_dims(grad_fn, attr: str, in_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A dimension argument that the autograd node saved, made non-negative, or None."""
    value = getattr(grad_fn, attr, None)
    if value is None or in_shape is None:
        return None
    return tuple((d - 2**64 if d >= 2**63 else d) % len(in_shape) for d in (value if isinstance(value, tuple)
                                                                           else (value,)))


def _reduction_problem(op: str, grad_fn, in_shape: tuple[int, ...] | None) -> str | None:
    """A reduction keeps channel j at j when it runs over space, or over the batch with that dimension kept."""
    reduced = _saved_dims(grad_fn, "_saved_dim", in_shape)
    if reduced is not None and 1 not in reduced and (0 not in reduced or getattr(grad_fn, "_saved_keepdim", 0)):
        return None
    if reduced is None:
        return f"{op} over every dimension mixes channels"
    if 1 in reduced:
        return f"{op} over the channel dimension mixes channels"
    return f"{op} over the batch dimension moves the channels out of dimension 1"


def _reorder_problem(op: str, grad_fn, in_shape: tuple[int, ...] | None) -> str | None:
    """A transpose, permutation or flip keeps the channels when it moves neither the batch nor the channel
    dimension.
    """
    if op == "Permute":  # the dimensions that the permutation moves
        order = _saved_dims(grad_fn, "_saved_dims", in_shape)
        moved = None if order is None else {i for i, d in enumerate(order) if d != i}
    elif op == "Transpose":
        pair = ((_saved_dims(grad_fn, "_saved_dim0", in_shape) or ())
                + (_saved_dims(grad_fn, "_saved_dim1", in_shape) or ()))
        moved = set(pair) if len(pair) == 2 and pair[0] != pair[1] else None
    else:
        flipped = _saved_dims(grad_fn, "_saved_dims", in_shape)
        moved = None if flipped is None else set(flipped)
    if moved is not None and not moved & {0, 1}:
        return None
    return f"{op} reorders the channels"


def _reshape_problem(op: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str | None:
    """A reshape or pad keeps the channels when they stay in dimension 1, or when it flattens them into a linear's
    input.
    """
    n, c, rest = in_shape[0], in_shape[1], math.prod(in_shape[2:])
    if len(out_shape) >= 2 and out_shape[0] == n and (out_shape[1] == c or (
            op in _RESHAPES and len(out_shape) == 2 and out_shape[1] == c * rest)):
        return None
    return f"{op} from {list(in_shape)} to {list(out_shape)} changes the channel dimension"


def nodes_between(start, stop: set) -> set:
    """The autograd nodes from ``start`` back to (not into) the ``stop`` nodes: the ops of one layer's forward."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in stop or node in seen:
            continue
        seen.add(node)
        todo.extend(f for f, _ in node.next_functions)
    return seen


def reshape_failure(e: Exception) -> str | None:
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
