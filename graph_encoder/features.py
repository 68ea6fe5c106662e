"""The layer graph as node features, built from the pruning core's single trace.

Static features describe each node (op type, shape, cost, depth, Taylor-score statistics of its group);
dynamic features describe the search state at each step. Every feature is a share, a log-scaled width or
a standardised score, so a ResNet-20 and a ResNet-110 give comparable scales.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from pruning_core.graph import OP_TYPES, ModelTrace

__all__ = ["DYNAMIC_FEATURES", "FEATURE_BOUND", "LayerGraph", "observation_space", "NUM_FEATURES", "STATIC_FEATURES"]

STATIC_FEATURES = (
    *[f"op_{op}" for op in OP_TYPES],
    "log_in_channels", "log_out_channels", "kernel", "stride", "log_feature_map", "flops_rel", "params_rel",
    "depth", "prunable", "group_root", "group_flops_sensitivity",
    "score_mean", "score_std", "score_q10", "score_q50", "score_q90",
)
DYNAMIC_FEATURES = ("ratio", "is_current", "decided", "flops_removed", "flops_to_remove", "min_ratio_now", "drop_step")
NUM_FEATURES = len(STATIC_FEATURES) + len(DYNAMIC_FEATURES)
FEATURE_BOUND = 10.0  # every feature is clipped to [-FEATURE_BOUND, FEATURE_BOUND]


def observation_space(max_nodes: int, max_edges: int) -> spaces.Dict:
    """The padded observation space of a layer graph (see :class:`envs.PruneEnv` for each key)."""
    return spaces.Dict({
        "x": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (max_nodes * NUM_FEATURES,), np.float32),
        "edge_index": spaces.Box(0, max_nodes - 1, (2 * max_edges,), np.int64),
        "edge_mask": spaces.Box(0.0, 1.0, (max_edges,), np.float32),
        "node_mask": spaces.Box(0.0, 1.0, (max_nodes,), np.float32),
        "cursor": spaces.Box(0, max_nodes - 1, (1,), np.int64),
        "graph_id": spaces.Box(0, 2**24 - 1, (1,), np.int64),
    })


@dataclass
class LayerGraph:
    """Nodes, edges and static features of a model's layer graph, with its prunable groups located.

    :ivar x_static: (num_nodes, len(STATIC_FEATURES)) float32.
    :ivar edge_index: (2, num_edges) int64, data-flow direction.
    :ivar group_nodes: for each prunable group (trace order), the nodes whose output channels it sets.
    :ivar group_roots: for each prunable group, the node of its root module.
    """

    names: list[str]
    x_static: np.ndarray
    edge_index: np.ndarray
    group_names: list[str]
    group_nodes: list[np.ndarray]
    group_roots: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    @classmethod
    def from_trace(cls, trace: ModelTrace, scores: dict[str, torch.Tensor] | None = None) -> LayerGraph:
        """Build the graph of ``trace``; ``scores`` (per group, per channel) fill the score statistics."""
        nodes = trace.nodes
        n = len(nodes)
        x = np.zeros((n, len(STATIC_FEATURES)), dtype=np.float32)
        col = {name: i for i, name in enumerate(STATIC_FEATURES)}
        flops = trace.layer_flops()
        params = trace.layer_params()
        costly = [f for f in flops.values() if f > 0]
        mean_flops = float(np.mean(costly)) if costly else 1.0
        mean_params = float(np.mean(list(params.values()))) if params else 1.0
        in_hw = trace.input_shape[1] * trace.input_shape[2] if len(trace.input_shape) == 3 else 1
        dense = trace.flops()
        sensitivity = {}
        for g in trace.groups:  # FLOPs share freed by halving this group, times the number of groups
            freed = dense - trace.flops({**trace.dense_kept(), g.name: max(1, g.channels // 2)})
            sensitivity[g.name] = freed / dense * len(trace.groups)
        log_scores = {g: torch.log(s.double().clamp_min(1e-30)) for g, s in (scores or {}).items()}
        if log_scores:
            allv = torch.cat(list(log_scores.values()))
            mu, sd = float(allv.mean()), float(allv.std().clamp_min(1e-6))
        for i, node in enumerate(nodes):
            x[i, col[f"op_{node.op}"]] = 1.0
            x[i, col["depth"]] = i / max(1, n - 1)
            info = trace.layers.get(node.module) if node.module else None
            if info is None:
                continue
            x[i, col["log_in_channels"]] = math.log2(info.in_channels) / 10
            x[i, col["log_out_channels"]] = math.log2(info.out_channels) / 10
            x[i, col["kernel"]] = math.sqrt(math.prod(info.kernel_size)) / 7  # a square kernel's side
            x[i, col["stride"]] = info.stride / 2
            x[i, col["log_feature_map"]] = math.log2(max(1, info.out_hw[0] * info.out_hw[1])) / max(1, math.log2(in_hw))
            x[i, col["flops_rel"]] = math.log1p(flops.get(node.module, 0) / mean_flops)
            x[i, col["params_rel"]] = math.log1p(params.get(node.module, 0) / mean_params)
            group = trace.out_group.get(node.module)
            if group is None:
                continue
            x[i, col["prunable"]] = 1.0
            x[i, col["group_root"]] = float(node.module == group)
            x[i, col["group_flops_sensitivity"]] = sensitivity[group]
            if group in log_scores:
                z = ((log_scores[group] - mu) / sd).float()
                q = torch.quantile(z, torch.tensor([0.1, 0.5, 0.9]))
                x[i, col["score_mean"]:col["score_q90"] + 1] = [float(z.mean()), float(z.std()) if len(z) > 1
                                                                else 0.0, *q.tolist()]
        np.clip(x, -FEATURE_BOUND, FEATURE_BOUND, out=x)
        index = {node.module: i for i, node in enumerate(nodes) if node.module}
        group_nodes = [np.array(sorted(index[m.module] for m in g.members if m.dim == "out" and m.module in index),
                                dtype=np.int64) for g in trace.groups]  # a PReLU is no node (as a ReLU is none)
        roots = np.array([index[g.name] for g in trace.groups], dtype=np.int64)
        edges = np.array(trace.edges, dtype=np.int64).T.reshape(2, -1)
        return cls([nd.name for nd in nodes], x, edges, [g.name for g in trace.groups], group_nodes, roots)

    def fingerprint(self) -> int:
        """A CRC32 of the static features and edges: equal graphs give equal fingerprints."""
        return zlib.crc32(self.x_static.tobytes() + self.edge_index.tobytes())

    def to_data(self, x_dynamic: np.ndarray | None = None):
        """A ``torch_geometric.data.Data`` with static (and, if given, dynamic) node features."""
        from torch_geometric.data import Data
        x = self.x_static if x_dynamic is None else np.concatenate([self.x_static, x_dynamic], axis=1)
        return Data(x=torch.from_numpy(x), edge_index=torch.from_numpy(self.edge_index))
