"""Built-in CIFAR model zoo and model/weight loading.

The ResNets follow the exact layout of akamaster/pytorch_resnet_cifar10 (the shared
checkpoints), including the parameter-free "option A" shortcut that zero-pads channels.
VGG and MobileNetV2 are 32x32 variants used for structure tests; they have no weights.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.errors import UserError

__all__ = ["MODELS", "build_model", "load_weights", "SmallCNN", "ChannelPadShortcut"]


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


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: CifarResNet(3),
    "resnet32": lambda: CifarResNet(5),
    "resnet44": lambda: CifarResNet(7),
    "resnet56": lambda: CifarResNet(9),
    "resnet110": lambda: CifarResNet(18),
    "vgg11_bn": lambda: VGG(11),
    "vgg16_bn": lambda: VGG(16),
    "mobilenetv2": MobileNetV2,
    "digits_cnn": lambda: SmallCNN((32, 64, 64), (1,)),
    "digits_cnn_wide": lambda: SmallCNN((48, 48, 96, 96), (1,)),
}


RECORDED_ACC = ("best_prec1", "best_acc", "acc")  # keys beside a state_dict that hold its accuracy (%)


def build_model(spec: str | nn.Module) -> nn.Module:
    """Build a model from a zoo name, a ``package.module:factory`` spec, or pass an ``nn.Module`` through.

    :raises UserError: the name is unknown, the factory cannot be imported, or it returns no module.
    """
    if isinstance(spec, nn.Module):
        return spec
    if spec in MODELS:
        return MODELS[spec]()
    if ":" not in spec:
        raise UserError(f"unknown model {spec!r}; use one of {', '.join(MODELS)} or 'package.module:factory'")
    mod_name, _, attr = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)  # the current folder is importable, as with python -m
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import model factory {spec!r} (from {here} or the installed packages): {e}") from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` in place (``weights_only=True``) and return it.

    Accepts a bare state_dict or ``{'state_dict': ...}`` and strips a ``module.`` prefix.
    Missing ``num_batches_tracked`` buffers are allowed; every other key must match in name and shape.
    """
    ckpt = _read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
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


def recorded_accuracy(path: str | Path) -> float | None:
    """The accuracy (%) a weights file records beside its state_dict (``best_prec1``, ``best_acc`` or ``acc``, as
    training scripts such as akamaster's save it), or None.
    """
    ckpt = _read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return None
    found = next((ckpt[k] for k in RECORDED_ACC if k in ckpt), None)
    if torch.is_tensor(found) and found.numel() == 1:
        found = found.item()
    return float(found) if isinstance(found, (int, float)) else None


def _read_checkpoint(path: str | Path) -> object:
    """A torch checkpoint read with ``weights_only=True``.

    :raises UserError: no such file, or one that holds anything but tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        # torch's message advises weights_only=False, which must never be taken from an untrusted file: keep the cause
        cause = next((line.strip() for line in str(e).splitlines()[1:] if line.strip() and "WeightsUnpickler" not in
                      line and "Please file" not in line and "Check the documentation" not in line), str(e).strip())
        raise UserError(f"cannot read weights file {path}: not a torch checkpoint of tensors ({cause[:200]})") from e
