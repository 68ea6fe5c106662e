"""Layer graph -> PyG data -> GNN embeddings, and the SB3 features extractor that wraps them."""

from graph_encoder.encoder import LayerGraphEncoder
from graph_encoder.extractor import GraphFeaturesExtractor, batch_observations
from graph_encoder.features import DYNAMIC_FEATURES, NUM_FEATURES, STATIC_FEATURES, LayerGraph, observation_space

__all__ = ["DYNAMIC_FEATURES", "NUM_FEATURES", "STATIC_FEATURES", "GraphFeaturesExtractor", "LayerGraph",
           "LayerGraphEncoder", "batch_observations", "observation_space"]
