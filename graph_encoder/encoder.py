"""GNN encoder of the layer graph, in PyG's module layout."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv
from torch_geometric.utils import scatter

__all__ = ["LayerGraphEncoder"]

# PyG names the module it generates for a message-passing class's propagate() after the class
_GENERATED = f"{GATv2Conv.__module__}_{GATv2Conv.__name__}_"


def _delete_generated_sources() -> None:
    """Delete the files PyG wrote its generated GATv2Conv modules to (propagate and edge_updater, in the temp folder,
    once per process, never deleted). The modules are loaded by then and stay in ``sys.modules``, so nothing reads
    the files again.
    """
    tmp = Path(tempfile.gettempdir()).resolve()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith(_GENERATED) and path and Path(path).resolve().parent == tmp:
            Path(path).unlink(missing_ok=True)


class LayerGraphEncoder(nn.Module):
    r"""Directed-aware GATv2 encoder of a network's layer graph (Brody et al., ICLR 2022,
    https://arxiv.org/abs/2105.14491).

    Messages flow both ways along each data-flow edge; an edge feature of ``+1`` (forward) or ``-1``
    (backward) tells the attention which way. Each layer is residual with LayerNorm. The graph embedding
    is a linear map of the mean and max of the node embeddings.

    Args:
        in_channels (int): node feature size.
        hidden_channels (int): node and graph embedding size.
        num_layers (int, optional): GATv2 layers. (default: :obj:`3`)
        heads (int, optional): attention heads; ``hidden_channels`` must divide by it. (default: :obj:`2`)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices :math:`(2, |\mathcal{E}|)`,
          batch vector :math:`(|\mathcal{V}|)` (optional)
        - **output:** node embeddings :math:`(|\mathcal{V}|, H)`, graph embeddings :math:`(B, H)`
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_layers: int = 3, heads: int = 2):
        super().__init__()
        if hidden_channels % heads:
            raise ValueError(f"hidden_channels={hidden_channels} must be divisible by heads={heads}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.heads = heads
        self.lin_in = nn.Linear(in_channels, hidden_channels)
        self.convs = nn.ModuleList(GATv2Conv(hidden_channels, hidden_channels // heads, heads=heads, edge_dim=1)
                                   for _ in range(num_layers))
        _delete_generated_sources()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_channels) for _ in range(num_layers))
        self.lin_graph = nn.Linear(2 * hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin_in.reset_parameters()
        self.lin_graph.reset_parameters()
        for conv, norm in zip(self.convs, self.norms):
            conv.reset_parameters()
            norm.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor | None = None,
                num_graphs: int | None = None) -> tuple[Tensor, Tensor]:
        if batch is None:
            batch = x.new_zeros(x.size(0), dtype=torch.long)
            num_graphs = 1
        num_graphs = num_graphs if num_graphs is not None else int(batch.max()) + 1
        both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        direction = torch.cat([x.new_ones(edge_index.size(1)), -x.new_ones(edge_index.size(1))]).unsqueeze(1)
        h = torch.relu(self.lin_in(x))
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + torch.relu(conv(h, both, direction)))
        pooled = torch.cat([scatter(h, batch, 0, num_graphs, reduce="mean"),
                            scatter(h, batch, 0, num_graphs, reduce="max")], dim=1)
        return h, torch.relu(self.lin_graph(pooled))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, num_layers={self.num_layers})"
