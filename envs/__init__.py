"""The pruning environment and its Gymnasium registration (``prunepilot/ChannelPrune-v0``)."""

from gymnasium.envs.registration import register, registry

from envs.decisions import DecisionSpace
from envs.evaluator import EVALUATION_TIMINGS, Evaluator
from envs.methods import (
    FLOOR_METHODS,
    applied_actions,
    centre_allocation,
    evaluation_workers,
    floor_allocations,
    random_search,
    resolve_episode,
    run_episode,
    run_episodes,
    select_best,
    sensitivity_search,
    sensitivity_table,
    uniform_test,
)
from envs.prune_env import ACTION_CENTERS, DEFAULT_MAX_NODES, GRANULARITIES, REWARDS, PruneEnv
from envs.reward_model import RewardModel

ENV_ID = "prunepilot/ChannelPrune-v0"
if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.prune_env:PruneEnv")

__all__ = ["ACTION_CENTERS", "DEFAULT_MAX_NODES", "ENV_ID", "EVALUATION_TIMINGS", "FLOOR_METHODS", "GRANULARITIES",
           "REWARDS", "DecisionSpace", "Evaluator", "PruneEnv", "RewardModel",
           "applied_actions", "centre_allocation", "evaluation_workers", "floor_allocations", "random_search",
           "resolve_episode", "run_episode", "run_episodes", "select_best", "sensitivity_search", "sensitivity_table",
           "uniform_test"]
