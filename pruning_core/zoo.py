"""Models by name (the built-in CIFAR zoo of :mod:`pruning_core.models`, ``torchvision:NAME``, ``timm:NAME``,
``package.module:factory``) and their weights.

torchvision and timm models are built without weights (nothing is downloaded): pass ``--weights``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning_core.errors import UserError

# models pickled whole (load_weights with trust_pickle) name their classes by this module, where they were defined
from pruning_core.models import (  # noqa: F401
    VGG,
    BasicBlock,
    ChannelPadShortcut,
    CifarResNet,
    InvertedResidual,
    MobileNetV2,
    SmallCNN,
)

log = logging.getLogger(__name__)

__all__ = ["MODELS", "build_model", "load_weights", "replace_head", "SmallCNN", "ChannelPadShortcut"]


MODELS: dict[str, Callable[..., nn.Module]] = {  # each takes num_classes
    "resnet20": lambda **kw: CifarResNet(3, **kw),
    "resnet32": lambda **kw: CifarResNet(5, **kw),
    "resnet44": lambda **kw: CifarResNet(7, **kw),
    "resnet56": lambda **kw: CifarResNet(9, **kw),
    "resnet110": lambda **kw: CifarResNet(18, **kw),
    "vgg11_bn": lambda **kw: VGG(11, **kw),
    "vgg16_bn": lambda **kw: VGG(16, **kw),
    "mobilenetv2": MobileNetV2,
    "digits_cnn": lambda **kw: SmallCNN((32, 64, 64), (1,), **kw),
    "digits_cnn_wide": lambda **kw: SmallCNN((48, 48, 96, 96), (1,), **kw),
    "digits_bottleneck": lambda **kw: SmallCNN((64, 8, 64), (1,), **kw),  # unequal layers: the demo's model
    "digits_bottleneck_deep": lambda **kw: SmallCNN((48, 48, 8, 64), (1,), **kw),
}


RECORDED_ACC = ("best_prec1", "best_acc", "acc")  # keys beside a state_dict that hold its accuracy (%)
AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}  # torchvision's train-only heads


def build_model(spec: str | nn.Module, num_classes: int | None = None) -> nn.Module:
    """Build a model from a zoo name, ``torchvision:NAME``, ``timm:NAME`` or a ``package.module:factory`` spec, or
    pass an ``nn.Module`` through.

    With ``num_classes`` the model gets a head with that many outputs: zoo, torchvision and timm models are built
    with it; a factory's model (or a module passed in) has its last linear layer replaced when that differs.

    :raises UserError: the name is unknown, torchvision or timm is not installed, the factory cannot be imported,
        or it returns no module.
    """
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be at least 1, got {num_classes}")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if isinstance(spec, nn.Module):  # a new head goes on a copy
        return replace_head(copy.deepcopy(spec), num_classes) if num_classes is not None else spec
    if spec in MODELS:
        return MODELS[spec](**kw)
    source, sep, name = spec.partition(":")
    if sep and source in ("torchvision", "timm"):
        return _hub_model(source, name, kw)
    if not sep:
        raise UserError(f"unknown model {spec!r}; use one of {', '.join(MODELS)}, torchvision:NAME, timm:NAME or "
                        "'package.module:factory'")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)  # the current folder is importable, as with python -m
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory {spec!r} (from {here} or the installed packages): {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return replace_head(model, num_classes) if num_classes is not None else model


def _hub_model(source: str, name: str, kw: dict) -> nn.Module:
    """A torchvision or timm classification model, built without pretrained weights."""
    try:
        lib = importlib.import_module(source)
    except ImportError:
        raise UserError(f"--model {source}:{name} needs {source}: pip install {source}") from None
    if source == "torchvision":
        names = lib.models.list_models(module=lib.models)
        if name not in names:
            raise UserError(f"torchvision has no classification model {name!r}; it has {', '.join(names[:8])}, …")
        if name in AUX_HEADS:  # they run only in training, where the pruned model could not feed them
            log.info("building torchvision's %s without its auxiliary heads (aux_logits=False)", name)
            kw = {**kw, "aux_logits": False}
        return lib.models.get_model(name, weights=None, **kw)
    if name not in lib.list_models():
        raise UserError(f"timm has no model {name!r} (timm.list_models() lists them)")
    return lib.create_model(name, pretrained=False, **kw)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """``model`` with its last ``nn.Linear`` replaced by a freshly initialised one with ``num_classes`` outputs,
    unless it already has that many.

    :raises UserError: the model has no linear layer.
    """
    name = _head_name(model)
    if name is None:
        raise UserError(f"--num-classes: {type(model).__name__} has no linear classifier layer to replace")
    head = model.get_submodule(name)
    if head.out_features != num_classes:
        parent, _, attr = name.rpartition(".")
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def load_weights(model: nn.Module, path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` in place (``weights_only=True``) and return it.

    Accepts a bare state_dict or ``{'state_dict': ...}`` (or ``'model'``) and strips a ``module.`` prefix. With
    ``trust_pickle`` the file may instead be a whole pickled ``nn.Module``, whose weights are taken: unpickling runs
    code from the file, so only for files you made.
    Missing ``num_batches_tracked`` buffers are allowed; every other key must match in name and shape.
    """
    ckpt = _read_checkpoint(path, trust_pickle)
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    state = (ckpt.get("state_dict") or ckpt.get("model") or ckpt) if isinstance(ckpt, dict) else None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    aux = {k.split(".")[0] for k in state if k not in own} & {h for heads in AUX_HEADS.values() for h in heads}
    if aux and not any(k.split(".")[0] in aux for k in own):
        log.warning("ignoring the weights of the auxiliary heads %s in %s: the model is built without them",
                    ", ".join(sorted(aux)), path)
        state = {k: v for k, v in state.items() if k.split(".")[0] not in aux}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    head = _head_name(model)
    if not missing and not unexpected and wrong and head and all(k.startswith(head + ".") for k in wrong):
        theirs, ours = state[f"{head}.weight"].shape[0], own[f"{head}.weight"].shape[0]
        raise UserError(f"the weights in {path} have a {theirs}-class head ({head}), the model {ours} outputs: "
                        f"pass --num-classes {theirs}")
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise UserError(f"weights in {path} do not fit {type(model).__name__} ({detail}); "
                        "is --model the architecture these weights were trained for?")
    model.load_state_dict(state, strict=False)
    return model


def _head_name(model: nn.Module) -> str | None:
    """The name of the model's last linear layer, its classifier head, if it has one."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def recorded_accuracy(path: str | Path, trust_pickle: bool = False) -> float | None:
    """The accuracy (%) a weights file records beside its state_dict (``best_prec1``, ``best_acc`` or ``acc``, as
    training scripts such as akamaster's save it), or None.
    """
    ckpt = _read_checkpoint(path, trust_pickle)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return None
    found = next((ckpt[k] for k in RECORDED_ACC if k in ckpt), None)
    if torch.is_tensor(found) and found.numel() == 1:
        found = found.item()
    return float(found) if isinstance(found, (int, float)) else None


def _read_checkpoint(path: str | Path, trust_pickle: bool = False) -> object:
    """A torch checkpoint read with ``weights_only=True``, or as any pickle with ``trust_pickle``.

    :raises UserError: no such file, or (without ``trust_pickle``) one that holds anything but tensors and plain
        containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot unpickle {path}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        # torch's message advises weights_only=False, which must never be taken from an untrusted file: keep the cause
        cause = next((line.strip() for line in str(e).splitlines()[1:] if line.strip() and "WeightsUnpickler" not in
                      line and "Please file" not in line and "Check the documentation" not in line), str(e).strip())
        hint = "; if it is a whole model saved with torch.save(model) by you, pass --trust-pickle" if "GLOBAL" in str(
            e) else ""
        raise UserError(f"cannot read weights file {path}: not a torch checkpoint of tensors ({cause[:200]}){hint}"
                        ) from e
