"""prunepilot's pruning core: trace, score, prune, recalibrate, evaluate and export CNNs.

Nothing here imports RL, gym or PyG code.
"""

from pruning_core.allocate import global_ratios, uniform_ratios
from pruning_core.data import ImageData, load_data, make_splits
from pruning_core.errors import UserError
from pruning_core.evaluate import accuracy, adapt_bn, correct, paired_lead
from pruning_core.export import export_model, load_exported
from pruning_core.finetune import FinetuneConfig, finetune
from pruning_core.graph import ModelTrace, layer_macs, measure_flops
from pruning_core.importance import L1Importance, TaylorImportance
from pruning_core.latency import compare_latency, measure_latency
from pruning_core.latency_table import LatencyBudget, LatencyTable
from pruning_core.prune import (
    branch_width,
    check_ratios,
    drop_order,
    kept_channels,
    kept_counts,
    prune,
    removed_channels,
)
from pruning_core.reconstruct import Reconstruction
from pruning_core.session import PruningSession
from pruning_core.session_config import DROP_CRITERIA, SessionConfig
from pruning_core.splits import FolderSplit, Split
from pruning_core.tracer import trace_model
from pruning_core.zoo import MODELS, build_model, load_weights

__version__ = "0.1.0"

__all__ = [
    "DROP_CRITERIA", "MODELS", "FinetuneConfig", "FolderSplit", "ImageData", "L1Importance", "LatencyBudget",
    "LatencyTable", "ModelTrace",
    "PruningSession", "Reconstruction", "SessionConfig", "Split", "TaylorImportance", "UserError", "__version__",
    "accuracy", "adapt_bn", "branch_width", "build_model", "check_ratios", "correct",
    "compare_latency", "drop_order", "export_model", "finetune", "global_ratios", "kept_channels", "kept_counts",
    "layer_macs", "load_data", "load_exported", "load_weights", "make_splits", "measure_flops", "measure_latency",
    "paired_lead", "prune", "removed_channels", "trace_model", "uniform_ratios",
]
