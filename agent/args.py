"""Argparse pieces the subcommands share: argument types, flag groups and checks made before any work."""

from __future__ import annotations

import argparse
import logging

from pruning_core import UserError
from pruning_core.latency import BACKENDS, cpu_channel_block

log = logging.getLogger("prunepilot")

__all__ = ["DATA_HELP", "INPUT_SETTINGS", "MODEL_HELP", "ROUND_TO_HELP", "add_input_args", "add_model_args",
           "add_normalisation_args", "add_output_args", "check_flops", "floats_arg", "input_settings", "positive_int",
           "round_to_arg"]

MODEL_HELP = ("zoo name (resnet20/32/44/56/110, vgg11_bn, vgg16_bn, mobilenetv2, digits_cnn, digits_cnn_wide, "
              "digits_bottleneck, digits_bottleneck_deep), torchvision:NAME, timm:NAME or package.module:factory")
DATA_HELP = "cifar10:DIR, imagefolder:DIR (train/ and test/ or val/, streamed) or digits"
# SessionConfig fields these flags set, shared by every command that loads a model
INPUT_SETTINGS = ("mean", "std", "scale", "image_size", "loader_workers", "num_classes", "trust_pickle", "device")

ROUND_TO_HELP = ("round kept channels up to a multiple of this; auto: this CPU's conv channel block (16 with "
                 "AVX-512, else 8), the widths its kernels run without padding")


def round_to_arg(value: str) -> int:
    """``--round-to``: a whole number >= 1, or ``auto`` for this CPU's channel block (:func:`cpu_channel_block`),
    resolved here so that reports and saved configs record the number.
    """
    if value == "auto":
        return cpu_channel_block()
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {value!r}")
    n = int(value)
    if n & (n - 1):
        log.warning("--round-to %d is not a power of two: CPU conv kernels run channels in blocks of 8 or 16 "
                    "(--round-to auto picks this CPU's), so widths in multiples of %d save no time there", n, n)
    return n


def add_model_args(p: argparse.ArgumentParser, data_default: str | None = None) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", help="checkpoint: a state_dict or {'state_dict': ...}, loaded with weights_only=True")
    default_note = f" (default: {data_default})" if data_default else ""
    p.add_argument("--data", required=data_default is None, default=data_default, help=DATA_HELP + default_note)
    p.add_argument("--val-data", metavar="DIR",
                   help="folder of class folders the model was not trained on: the reward and select images that "
                        "searches score on (default: the data's val/ folder if it has one, else training images)")
    add_input_args(p)
    p.add_argument("--flops", type=float, default=0.5, help="FLOPs budget as a fraction of dense (default: 0.5)")
    p.add_argument("--max-ratio", type=float, default=0.8,
                   help="largest pruning ratio of any one group (default: 0.8)")
    p.add_argument("--round-to", type=round_to_arg, default=None, help=ROUND_TO_HELP)
    p.add_argument("--reward-images", type=int, default=1000,
                   help="training images in the reward split (default: 1000)")
    p.add_argument("--calib-batches", type=int, default=10,
                   help="batches of 64 training images for adaptive BN (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_output_args(p: argparse.ArgumentParser, out_required: bool = False, adapt_bn: bool = True) -> None:
    if adapt_bn:
        p.add_argument("--adapt-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="recalibrate BN statistics on training images after pruning (default: on)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="epochs of fine-tuning with KD from the dense model after pruning (default: 0)")
    p.add_argument("--out", required=out_required,
                   help="folder for report.json and the exported model (model.pt2, model.onnx)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing only the files this command writes")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--latency", choices=BACKENDS, metavar="BACKEND",
                   help="also time the pruned model against dense on this CPU, in pairs (median of 5), and add "
                        "report['latency']: torch (eager), torch-cl (eager with Conv+BN folded, channels-last: "
                        f"usually the fastest PyTorch form) or onnxruntime. One of: {', '.join(BACKENDS)}")
    p.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for --latency (default: 1)")


def floats_arg(text: str) -> tuple[float, ...]:
    """Argparse type: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers") from None


def add_normalisation_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--mean, --std, --scale: how pixels (0-255) become the model's input, as (pixel * scale - mean) / std."""
    note = " (default: the data set's; ImageNet's for cifar10 and image folders)" if defaults else ""
    p.add_argument("--mean", type=floats_arg, metavar="M[,M,M]", help="per-channel mean" + note)
    p.add_argument("--std", type=floats_arg, metavar="S[,S,S]", help="per-channel std" + note)
    p.add_argument("--scale", type=float, help="factor from 0-255 pixels to the model's range (default: 1/255)")


WORKERS_HELP = ("processes evaluating pruned models in parallel, each with its own copy of the model; the same seed "
                "finds the same allocations with any number (default: 1)")
RAY_HELP = "run the --workers as Ray actors on this cluster: auto (ray start), local, or HOST:PORT"



def add_input_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags of :data:`INPUT_SETTINGS`: normalisation, image size, decoding workers, head, pickles and device.
    Each defaults to None, which leaves the :class:`~pruning_core.SessionConfig` default.
    """
    add_normalisation_args(p)
    p.add_argument("--image-size", type=positive_int, metavar="PX",
                   help="resize and centre-crop images to PX x PX (default: their own size)")
    p.add_argument("--loader-workers", type=int, metavar="N", help="processes decoding an image folder (default: 2)")
    p.add_argument("--num-classes", type=positive_int, metavar="N",
                   help="build the model with an N-class head (default: the data's, for torchvision/timm models)")
    p.add_argument("--trust-pickle", action="store_const", const=True,
                   help="let --weights be a whole pickled model; this runs code from the file, so only for your own")
    p.add_argument("--device", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model is scored, pruned and evaluated (default: auto, a CUDA GPU if there is one)")


def input_settings(args: argparse.Namespace) -> dict:
    """The :data:`INPUT_SETTINGS` the flags gave, for :class:`~pruning_core.SessionConfig`."""
    return {k: getattr(args, k) for k in INPUT_SETTINGS if getattr(args, k, None) is not None}


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_flops(flops: float | None) -> None:
    """``--flops``, when given, must be a fraction of dense in (0, 1]."""
    if flops is not None and not 0.0 < flops <= 1.0:
        raise UserError(f"--flops {flops} must be in (0, 1]")
