"""The SB3 algorithms the search runs, built from a :class:`~agent.config.TrainConfig`: their GNN policy, AMC's
exploration noise and credit assignment, and access to the deterministic actor.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from stable_baselines3 import DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictReplayBuffer, DictRolloutBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import NormalActionNoise
from torch import nn

from agent.config import TrainConfig
from graph_encoder import GraphFeaturesExtractor

__all__ = ["ALGO_CLASSES", "DecayingNormalNoise", "DeferredRewardBuffer", "FinalRewardReplayBuffer", "build_algo",
           "policy_modules"]


class _BoundaryHook:
    """Call ``boundary`` when a rollout is about to be collected: after the previous update, before any of the
    next rollout's random draws. A checkpoint taken there lets a resumed run redo exactly what follows.
    """

    boundary: Callable[[], None] | None = None

    def collect_rollouts(self, *args, **kwargs):
        if self.boundary is not None:
            self.boundary()
        return super().collect_rollouts(*args, **kwargs)


ALGO_CLASSES: dict[str, type[BaseAlgorithm]] = {
    name: type(cls.__name__, (_BoundaryHook, cls), {})
    for name, cls in (("ddpg", DDPG), ("td3", TD3), ("sac", SAC), ("ppo", PPO))}


class DeferredRewardBuffer(DictRolloutBuffer):
    """PPO's rollout buffer, with a hook that runs before the returns are computed: a search whose episode
    evaluations were deferred (run in parallel at the end of the rollout) writes their rewards into
    :attr:`rewards` there.
    """

    before_returns: Callable[[DictRolloutBuffer], None] | None = None

    def compute_returns_and_advantage(self, last_values, dones) -> None:
        if self.before_returns is not None:
            self.before_returns(self)
        super().compute_returns_and_advantage(last_values, dones)


class DecayingNormalNoise(NormalActionNoise):
    """Gaussian exploration noise whose std shrinks by ``decay`` after every episode (AMC's schedule).

    SB3 calls ``reset()`` at the end of each episode, and once as ``learn()`` starts. Actions plus noise are
    clipped to the action box.
    """

    def __init__(self, sigma: float, decay: float, dims: int = 1):
        super().__init__(np.zeros(dims), np.full(dims, sigma))
        self.decay = decay
        self.held = False

    def hold(self) -> None:
        """Keep the std through the next ``reset()``: a resumed run's ``learn()`` must not decay it a second time."""
        self.held = True

    def reset(self) -> None:
        if not self.held:
            self._sigma = self._sigma * self.decay
        self.held = False

    @property
    def sigma(self) -> float:
        return float(self._sigma[0])

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = np.full_like(self._sigma, value)


class FinalRewardReplayBuffer(DictReplayBuffer):
    """Store what the env did, credited with the episode's outcome (AMC's credit assignment).

    - The stored action is the env's ``info["action_applied"]`` (after the budget clamp), not the proposed one.
      Otherwise the clamp, which overrides low early actions, teaches the critic that larger actions always
      pay, and DDPG's actor saturates at the maximum ratio within a few episodes.
    - Every transition of an episode gets the episode's final reward as a terminal, so the critic's target
      for ``Q(s_t, a_t)`` is that reward rather than a bootstrapped estimate through many zero-reward steps.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_episode: list[int] = []

    def add(self, obs, next_obs, action, reward, done, infos) -> None:
        self.open_episode.append(self.pos)
        if "action_applied" in infos[0]:
            action = np.stack([info["action_applied"] for info in infos])
        super().add(obs, next_obs, action, reward, done, infos)
        if done[0]:
            idx = np.array(self.open_episode)
            self.rewards[idx, 0] = reward[0]
            self.dones[idx, 0] = 1.0
            self.open_episode = []


def build_algo(config: TrainConfig, env: gym.Env, steps_per_episode: int,
               tensorboard_log: str | None = None) -> BaseAlgorithm:
    """A fresh SB3 algorithm (``config.algo``) with the GNN extractor on ``env``, seeded with ``config.seed``.

    Without ``tensorboard_log`` it logs nowhere: SB3's default logger would leave an empty ``SB3-<time>`` folder in
    the temporary directory on every ``learn``.
    """
    algo = _new_algo(config, env, steps_per_episode, tensorboard_log)
    if tensorboard_log is None:
        algo.set_logger(Logger(folder=None, output_formats=[]))
    return algo


def _new_algo(config: TrainConfig, env: gym.Env, steps_per_episode: int, tensorboard_log: str | None) -> BaseAlgorithm:
    """The SB3 algorithm :func:`build_algo` configures.

    PPO collects rollouts of ``rollout_episodes * screen`` episodes with gamma = lambda = 1 (every step's advantage
    is the final reward minus the value, AMC's assignment) and, with ``sde``, a fresh noise matrix every episode. The
    off-policy algorithms learn after ``warmup_episodes`` random episodes, once per episode, from
    :class:`FinalRewardReplayBuffer`.
    """
    c, n = config, steps_per_episode
    kwargs = dict(
        policy_kwargs=dict(features_extractor_class=GraphFeaturesExtractor, net_arch=list(c.net_arch),
                           features_extractor_kwargs=dict(hidden_channels=c.hidden, num_layers=c.gnn_layers)),
        learning_rate=c.learning_rate, seed=c.seed, verbose=0, device="cpu", tensorboard_log=tensorboard_log)
    if c.algo in ("ppo", "sac"):
        kwargs["policy_kwargs"]["log_std_init"] = float(np.log(c.init_std))
    if c.algo == "ppo":
        kwargs["policy_kwargs"]["net_arch"] = dict(pi=list(c.net_arch), vf=list(c.net_arch))
        sde = dict(use_sde=True, sde_sample_freq=n) if c.sde else {}
        # a rollout holds the screened proposals of rollout_episodes evaluations; minibatches of rollout_episodes
        # episodes when they are short, else of one episode
        k = c.rollout_episodes
        return ALGO_CLASSES["ppo"]("MultiInputPolicy", env, n_steps=k * c.screen * n,
                                   batch_size=k * n if k * n <= 64 else n,
                                   n_epochs=4, gamma=1.0, gae_lambda=1.0, rollout_buffer_class=DeferredRewardBuffer,
                                   **sde, **kwargs)
    off = dict(buffer_size=c.buffer_size, learning_starts=c.warmup_episodes * n, batch_size=c.batch_size,
               gamma=1.0, train_freq=(1, "episode"), gradient_steps=c.gradient_steps,
               replay_buffer_class=FinalRewardReplayBuffer, **kwargs)
    if c.algo == "sac":
        return ALGO_CLASSES["sac"]("MultiInputPolicy", env, **off)
    off["policy_kwargs"]["share_features_extractor"] = True  # the critic trains the GNN; cheaper updates
    noise = DecayingNormalNoise(c.noise_sigma, c.noise_decay)
    return ALGO_CLASSES[c.algo]("MultiInputPolicy", env, action_noise=noise, **off)


def policy_modules(algo: BaseAlgorithm, name: str) -> tuple[nn.Module, nn.Sequential, nn.Linear, str]:
    """The deterministic actor of an SB3 model as (features extractor, hidden MLP, output layer, squash).

    The modules are the model's own (not copies), so loading weights into them loads the model.
    """
    if name in ("ddpg", "td3"):
        layers = list(algo.actor.mu)
        return algo.actor.features_extractor, nn.Sequential(*layers[:-2]), layers[-2], "tanh"
    if name == "sac":
        return algo.actor.features_extractor, algo.actor.latent_pi, algo.actor.mu, "tanh"
    policy = algo.policy
    return policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net, "clip"
