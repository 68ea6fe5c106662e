import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_session

from envs import PruneEnv
from graph_encoder import GraphFeaturesExtractor, LayerGraph, LayerGraphEncoder, batch_observations
from pruning_core import UserError, build_model, trace_model


def test_encoder_shapes_and_repr():
    enc = LayerGraphEncoder(5, 16, num_layers=2)
    x = torch.randn(4, 5)
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 3]])
    nodes, graph = enc(x, edge_index)
    assert nodes.shape == (4, 16) and graph.shape == (1, 16)
    assert repr(enc) == "LayerGraphEncoder(5, 16, num_layers=2)"
    with pytest.raises(ValueError, match="divisible"):
        LayerGraphEncoder(5, 15, heads=2)


def test_encoder_leaves_no_generated_files_in_tmp(tmp_path):
    # PyG writes its generated GATv2Conv module to the temp folder once per process (cached afterwards): build the
    # encoder in a fresh process with its own temp folder
    code = "from graph_encoder import LayerGraphEncoder; LayerGraphEncoder(8, 16)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert not list(tmp_path.iterdir())


def test_resnet20_graph_structure():
    trace = trace_model(build_model("resnet20"), (3, 32, 32))
    graph = LayerGraph.from_trace(trace)
    ops = [n.op for n in trace.nodes]
    assert (ops.count("conv"), ops.count("bn"), ops.count("add"), ops.count("linear")) == (19, 19, 9, 1)
    index = {n.name: i for i, n in enumerate(trace.nodes)}
    into = {}
    for s, t in trace.edges:
        into.setdefault(t, []).append(s)
    residual = 0
    for i, node in enumerate(trace.nodes):
        if node.op == "add":
            sources = [trace.nodes[s].name for s in into[i]]
            assert len(sources) == 2
            assert any(s.endswith(".bn2") for s in sources)  # the block's own branch
            residual += 1  # the other input is the shortcut
    assert residual == 9
    assert sorted(graph.group_names) == sorted(g.name for g in trace.groups)
    assert len(set(graph.group_roots.tolist())) == len(trace.groups) == 9
    for g, root in zip(graph.group_names, graph.group_roots):
        assert trace.nodes[root].name == g
    assert all(s < t for s, t in trace.edges)  # topological order
    assert index["linear"] == len(trace.nodes) - 1
    data = graph.to_data()
    assert data.x.shape == (49, graph.x_static.shape[1]) and data.edge_index.shape[1] == len(trace.edges)


def test_mobilenetv2_depthwise_coupled_with_producer():
    trace = trace_model(build_model("mobilenetv2"), (3, 32, 32))
    graph = LayerGraph.from_trace(trace)
    dw_nodes = [i for i, n in enumerate(trace.nodes) if n.op == "dwconv"]
    assert len(dw_nodes) == 17
    for members in graph.group_nodes:
        ops = {trace.nodes[i].op for i in members}
        if "dwconv" in ops and len(members) > 2:  # every expanded block: 1x1 expand conv + dw conv together
            assert "conv" in ops
    coupled = sum(1 for members in graph.group_nodes
                  if {"conv", "dwconv"} <= {trace.nodes[i].op for i in members})
    assert coupled == 17  # every dw conv with its producer (the stem conv for the first, expansion-1 block)


@pytest.fixture(scope="module")
def r20_env():
    session = tiny_session("resnet20")
    return PruneEnv(session=session)


def to_batch(*observations):
    return {k: torch.as_tensor(np.stack([o[k] for o in observations])).float() for k in observations[0]}


def test_extractor_alone_equals_in_batch_and_mixes_models(r20_env):
    session56 = tiny_session("resnet56")
    env56 = PruneEnv(session=session56)
    assert env56.observation_space == r20_env.observation_space
    o20, _ = r20_env.reset(seed=0)
    o20b, *_ = r20_env.step(np.array([0.3], np.float32))
    o56, _ = env56.reset(seed=0)
    assert r20_env.observation_space.contains(o20) and r20_env.observation_space.contains(o56)
    ex = GraphFeaturesExtractor(r20_env.observation_space, hidden_channels=32, num_layers=2).eval()
    with torch.no_grad():
        together = ex(to_batch(o20, o56, o20b))
        for i, o in enumerate((o20, o56, o20b)):
            assert torch.allclose(ex(to_batch(o))[0], together[i], atol=1e-5)
    assert not torch.allclose(together[0], together[2])  # the dynamic state changes the features


def test_extractor_permutation_invariant(r20_env):
    obs, _ = r20_env.reset(seed=0)
    obs, *_ = r20_env.step(np.array([0.5], np.float32))
    n = int(obs["node_mask"].sum())
    perm = np.random.default_rng(0).permutation(n)  # new position of old node i is inv[i]
    inv = np.argsort(perm)
    permuted = {k: v.copy() for k, v in obs.items()}
    x, px = obs["x"].reshape(len(obs["node_mask"]), -1), permuted["x"].reshape(len(obs["node_mask"]), -1)
    px[:n] = x[perm]
    e = int(obs["edge_mask"].sum())
    edges, pedges = obs["edge_index"].reshape(2, -1), permuted["edge_index"].reshape(2, -1)
    pedges[:, :e] = inv[edges[:, :e]]
    permuted["cursor"] = np.array([inv[obs["cursor"][0]]])
    ex = GraphFeaturesExtractor(r20_env.observation_space, hidden_channels=32).eval()
    with torch.no_grad():
        assert torch.allclose(ex(to_batch(obs)), ex(to_batch(permuted)), atol=1e-5)


def test_batch_observations_drops_padding(r20_env):
    obs, _ = r20_env.reset(seed=0)
    x, edge_index, batch, mask, b = batch_observations(to_batch(obs, obs))
    n = r20_env.graph.num_nodes
    assert x.shape[0] == 2 * n and b == 2 and int(mask.sum()) == 2 * n
    assert edge_index.shape[1] == 2 * r20_env.graph.num_edges and int(edge_index.max()) == 2 * n - 1
    assert batch.tolist() == [0] * n + [1] * n


def test_max_nodes_too_small_says_what_to_pass(r20_env):
    with pytest.raises(UserError, match=r"pass max_nodes >= 49"):
        PruneEnv(session=r20_env.session, max_nodes=40)
