"""Fitting PPO's actor to a known episode (behaviour cloning) and setting its exploration std: how the search starts
PPO from the best allocation known, and re-centres it when it stalls.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import PPO

from agent.algos import policy_modules
from envs import PruneEnv

__all__ = ["CLONE_TOLERANCE", "calibrate_sde", "clone_actor", "set_std"]

CLONE_TOLERANCE = 0.02  # a fit whose deterministic actions are all this close to the target's stops


def calibrate_sde(ppo: PPO, env: PruneEnv, std: float) -> None:
    """Scale gSDE's noise so that the initial action std is ``std``.

    gSDE's action noise is ``latent @ eps`` with ``eps ~ N(0, sigma^2)`` per entry, so its std is
    ``sigma * |latent|``; sigma is set from the policy latent of ``env``'s first observation.
    """
    policy = ppo.policy
    obs, _ = env.reset()
    with torch.no_grad():
        obs_t, _ = policy.obs_to_tensor(obs)
        latent = policy.mlp_extractor.forward_actor(policy.extract_features(obs_t, policy.pi_features_extractor))
        policy.log_std.fill_(float(np.log(std / max(float(latent.norm()), 1e-6))))
    policy.reset_noise()


def set_std(ppo: PPO, env: PruneEnv, std: float, sde: bool) -> None:
    """Set PPO's action std to ``std`` (with gSDE, scaled for the current latent)."""
    if sde:
        calibrate_sde(ppo, env, std)
    else:
        with torch.no_grad():
            ppo.policy.log_std.fill_(float(np.log(std)))


def clone_actor(ppo: PPO, env: PruneEnv, actions: list[float], learning_rate: float, steps: int = 200) -> int:
    """Fit PPO's deterministic actor to one episode's applied ``actions`` on ``env`` (MSE, Adam; at most ``steps``
    steps, stopping as soon as every action is within :data:`CLONE_TOLERANCE`). Returns the Adam steps taken.

    An actor already on those actions takes no step (each step is a GNN forward and backward pass), as when
    a re-centring follows one on the same best episode with no PPO update in between.
    """
    observations, obs = [], env.reset()[0]
    episodes, defer = env.episodes, env.defer
    env.defer = False
    for a in actions:  # the observations along that episode: the env is deterministic, its evaluation cached
        observations.append(obs)
        obs, *_ = env.step(np.array([a], dtype=np.float32))
    env.episodes, env.defer = episodes, defer  # a replay, not an episode of the search
    env.reset()  # back at the first step, where the algorithm's next episode starts
    batch = {k: torch.as_tensor(np.stack([o[k] for o in observations])).float() for k in observations[0]}
    target = torch.tensor(actions, dtype=torch.float32).unsqueeze(1)
    extractor, mlp, head, _ = policy_modules(ppo, "ppo")
    params = [p for m in (extractor, mlp, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=learning_rate)
    for taken in range(steps + 1):  # steps >= 0, so the loop always binds taken
        predicted = head(mlp(extractor(batch)))
        if taken == steps or float((predicted.detach() - target).abs().max()) < CLONE_TOLERANCE:
            break
        loss = F.mse_loss(predicted, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return taken
