"""Stable-Baselines3 features extractor over padded layer-graph observations."""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn
from torch_geometric.utils import scatter

from graph_encoder.encoder import LayerGraphEncoder
from graph_encoder.features import STATIC_FEATURES

__all__ = ["GraphFeaturesExtractor", "batch_observations", "unflatten"]


def unflatten(obs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Restore ``x`` to (B, N, F) and ``edge_index`` to (B, 2, E) from the env's flat 1-D boxes."""
    b, n = obs["node_mask"].shape
    return {**obs, "x": obs["x"].reshape(b, n, -1), "edge_index": obs["edge_index"].reshape(b, 2, -1)}


def batch_observations(obs: dict[str, Tensor], num_features: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Turn a batch of padded observations into one PyG-style disjoint graph, with tensor ops only.

    Padded nodes and edges are dropped; edge indices are shifted to the kept nodes' new positions.

    :param obs: padded observations, flat as the env gives them or unflattened.
    :param num_features: keep only the first this many node features (e.g. the static ones).
    :returns: ``(x, edge_index, batch, node_mask, num_graphs)``; ``node_mask`` (B*N,) marks the kept
        padded positions, in the order of ``x``.
    """
    obs = unflatten(obs)
    x = obs["x"] if num_features is None else obs["x"][..., :num_features]
    b, n, f = x.shape
    node_mask = obs["node_mask"].reshape(b * n) > 0.5
    new_pos = torch.cumsum(node_mask.long(), 0) - 1  # position of each kept node in the flat tensor
    offsets = (torch.arange(b, device=x.device) * n).view(b, 1, 1)
    edges = (obs["edge_index"].long() + offsets).permute(1, 0, 2).reshape(2, -1)
    edges = edges[:, obs["edge_mask"].reshape(-1) > 0.5]
    batch = torch.arange(b, device=x.device).repeat_interleave(n)[node_mask]
    return x.reshape(b * n, f)[node_mask], new_pos[edges], batch, node_mask, b


class GraphFeaturesExtractor(BaseFeaturesExtractor):
    """Embed the layer graph and the search state; output [current node ‖ graph] embeddings.

    Two stages keep a replay batch cheap:

    1. :class:`LayerGraphEncoder` (GATv2) embeds the *static* node features. Observations of the same
       model share one ``graph_id``, so it runs once per distinct graph in the batch, not once per sample.
    2. A per-node MLP mixes each node's static embedding with its *dynamic* features (ratios so far,
       current group, FLOPs removed and left); masked mean and max pooling give the graph embedding.

    Pass it with ``policy_kwargs=dict(features_extractor_class=GraphFeaturesExtractor,
    features_extractor_kwargs=dict(hidden_channels=64))``. It is trained end-to-end by the RL loss.

    :param observation_space: the ``spaces.Dict`` of :class:`envs.PruneEnv`.
    :param hidden_channels: embedding size; ``features_dim`` is twice this.
    :param num_layers: GATv2 layers.
    :param heads: attention heads.
    """

    def __init__(self, observation_space: spaces.Dict, hidden_channels: int = 64, num_layers: int = 3,
                 heads: int = 2):
        super().__init__(observation_space, features_dim=2 * hidden_channels)
        self.config = {"hidden_channels": hidden_channels, "num_layers": num_layers, "heads": heads}
        self.num_static = len(STATIC_FEATURES)
        num_dynamic = observation_space["x"].shape[0] // observation_space["node_mask"].shape[0] - self.num_static
        self.encoder = LayerGraphEncoder(self.num_static, hidden_channels, num_layers, heads)
        self.node_mlp = nn.Sequential(nn.Linear(hidden_channels + num_dynamic, hidden_channels), nn.ReLU())
        self.graph_proj = nn.Sequential(nn.Linear(3 * hidden_channels, hidden_channels), nn.ReLU())

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        obs = unflatten(observations)
        b, n, _ = obs["x"].shape
        # 1. static GNN, once per distinct graph in the batch
        key = torch.stack([obs["graph_id"].reshape(b), obs["node_mask"].sum(1)], dim=1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), b, dtype=torch.long, device=inverse.device)
        first = first.scatter_reduce(0, inverse, torch.arange(b, device=inverse.device), reduce="amin")
        reps = {k: v[first] for k, v in obs.items()}
        x, edge_index, batch, rep_mask, u = batch_observations(reps, self.num_static)
        nodes, graphs = self.encoder(x, edge_index, batch, u)
        # scatter the distinct graphs' node embeddings back to padded slots, then to every sample's real nodes
        padded = nodes.new_zeros(u * n, nodes.shape[1]).index_copy(0, rep_mask.nonzero().squeeze(1), nodes)
        node_mask = obs["node_mask"].reshape(b * n) > 0.5
        sample_slots = (inverse.view(b, 1) * n + torch.arange(n, device=inverse.device)).reshape(b * n)[node_mask]
        # 2. dynamic state, per real node of every sample
        dyn = obs["x"][..., self.num_static:].reshape(b * n, -1)[node_mask]
        z = self.node_mlp(torch.cat([padded[sample_slots], dyn], dim=1))
        sample = torch.arange(b, device=z.device).repeat_interleave(n)[node_mask]
        pooled = torch.cat([scatter(z, sample, 0, b, reduce="mean"), scatter(z, sample, 0, b, reduce="max"),
                            graphs[inverse]], dim=1)
        position = torch.cumsum(node_mask.long(), 0) - 1
        current = z[position[obs["cursor"].reshape(b).long() + torch.arange(b, device=z.device) * n]]
        return torch.cat([current, self.graph_proj(pooled)], dim=1)
