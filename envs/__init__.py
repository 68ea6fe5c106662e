"""The pruning environment and its Gymnasium registration (``prunepilot/ChannelPrune-v0``)."""

from gymnasium.envs.registration import register, registry

from envs.prune_env import ACTION_CENTERS, DEFAULT_MAX_NODES, GRANULARITIES, REWARDS, PruneEnv

ENV_ID = "prunepilot/ChannelPrune-v0"
if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.prune_env:PruneEnv")

__all__ = ["ACTION_CENTERS", "DEFAULT_MAX_NODES", "ENV_ID", "GRANULARITIES", "REWARDS", "PruneEnv"]
