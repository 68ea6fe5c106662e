"""Models by name (the built-in CIFAR zoo, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``) and
their weights.

The ResNets follow the exact layout of akamaster/pytorch_resnet_cifar10 (the shared
checkpoints), including the parameter-free "option A" shortcut that zero-pads channels.
VGG and MobileNetV2 are 32x32 variants used for structure tests; they have no weights.
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
import torch.nn.functional as F
from torch import nn

from pruning_core.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["MODELS", "build_model", "load_weights", "replace_head", "SmallCNN", "ChannelPadShortcut"]


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by 2 and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = ChannelPadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, in akamaster's layout (``conv1``, ``layer1..3``, ``linear``)."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.flatten(1))


_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (one linear classifier, as in the CIFAR pruning papers)."""

    def __init__(self, depth: int = 16, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: stem stride 1, as in the CIFAR variants."""

    _CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        c_in = 32
        for t, c, n, s in self._CFG:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers += [nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


class SmallCNN(nn.Module):
    """A small CNN for 8x8 grayscale digits (the built-in demo).

    :param widths: output channels of each 3x3 conv block.
    :param pool_after: indices of blocks followed by a 2x2 max-pool.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64), pool_after: tuple[int, ...] = (1,),
                 in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


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
