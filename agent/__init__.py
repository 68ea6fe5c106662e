"""The agent: train a sparsity policy with SB3 over the GNN-embedded env, export it, apply it to new models.

>>> from agent import train, apply_policy, load_policy
"""

from agent.apply import apply_policy, policy_ratios
from agent.config import TrainConfig
from agent.policy import PortablePolicy, export_policy, load_policy, save_policy
from agent.search import Search
from agent.train import build_env, resume, train

__all__ = ["PortablePolicy", "Search", "TrainConfig", "apply_policy", "build_env", "export_policy", "load_policy",
           "policy_ratios", "resume", "save_policy", "train"]
