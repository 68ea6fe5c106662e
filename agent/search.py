"""An RL search over pruning ratios: SB3 algorithm + GNN extractor + PruneEnv, with best-episode tracking,
exploration schedule, TensorBoard charts and checkpoints. ``train`` and ``apply --search-episodes`` use it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import NormalActionNoise
from torch import nn

from agent.config import TrainConfig
from agent.outputs import write_json
from envs import PruneEnv
from graph_encoder import GraphFeaturesExtractor

__all__ = ["DecayingNormalNoise", "MovingAverageBaseline", "Search", "policy_modules"]

ALGO_CLASSES: dict[str, type[BaseAlgorithm]] = {"ddpg": DDPG, "td3": TD3, "sac": SAC, "ppo": PPO}
REEXPLORE_MAX_STD = 1.0  # SB3's initial std: wider mostly samples the clipped ends of the [-1, 1] action
CLONE_TOLERANCE = 0.02  # a fit whose deterministic actions are all this close to the target's stops


class DecayingNormalNoise(NormalActionNoise):
    """Gaussian exploration noise whose std shrinks by ``decay`` after every episode (AMC's schedule).

    SB3 calls ``reset()`` at the end of each episode. Actions plus noise are clipped to the action box.
    """

    def __init__(self, sigma: float, decay: float, dims: int = 1):
        super().__init__(np.zeros(dims), np.full(dims, sigma))
        self.decay = decay

    def reset(self) -> None:
        self._sigma = self._sigma * self.decay

    @property
    def sigma(self) -> float:
        return float(self._sigma[0])

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = np.full_like(self._sigma, value)


class MovingAverageBaseline(gym.Wrapper):
    """Subtract a moving average of past final rewards from each final reward (AMC's variance reduction), and
    ``repeat_penalty`` from the final reward of an episode that repeated an allocation already evaluated
    (``info["cached"]``).

    The unshifted reward is always kept in ``info["reward_raw"]`` (the search keeps its best by it), and the
    average is over raw rewards; with ``enabled=False`` nothing is shifted.
    """

    def __init__(self, env: gym.Env, alpha: float = 0.1, enabled: bool = True, repeat_penalty: float = 0.0):
        super().__init__(env)
        self.alpha = alpha
        self.enabled = enabled
        self.repeat_penalty = repeat_penalty
        self.average: float | None = None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info = {**info, "reward_raw": reward}
            if self.average is None:
                self.average = reward
            shifted = reward - self.average
            self.average += self.alpha * (reward - self.average)
            reward = shifted if self.enabled else reward
            if info.get("cached"):
                reward -= self.repeat_penalty
        return obs, reward, terminated, truncated, info


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


class _EpisodeCallback(BaseCallback):
    def __init__(self, search: Search):
        super().__init__()
        self.search = search

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            self.search.on_step(info)
            if done:
                self.search.on_episode_end(info)
        return not self.search.budget_spent()

    def _on_rollout_start(self) -> None:
        # after the previous rollout's update: widening the policy then leaves that update's ratios intact
        self.search.on_rollout_start()

    def _on_rollout_end(self) -> None:
        # after the rollout's transitions are stored: the replay buffer holds whole episodes only
        self.search.on_rollout_end()
        self.search.maybe_checkpoint()


class Search:
    """Run (or resume) an RL search on one :class:`PruneEnv`.

    :param config: the training config (algorithm, exploration, budget, sizes).
    :param env: the environment, built on the session whose scores and splits every method shares.
    :param run_dir: where best.json, checkpoints and TensorBoard logs go; None keeps everything in memory.
    """

    def __init__(self, config: TrainConfig, env: PruneEnv, run_dir: str | Path | None = None):
        self.config = config
        self.env = env
        self.run_dir = Path(run_dir) if run_dir else None
        self.steps_per_episode = env.num_steps
        self.wrapped = MovingAverageBaseline(env, enabled=config.baseline, repeat_penalty=config.repeat_penalty)
        self.algo = self._build_algo()
        self.noise: DecayingNormalNoise | None = getattr(self.algo, "action_noise", None)
        self.best: dict | None = None
        self.history: list[dict] = []
        self.episodes_done = 0
        self.target_episodes = 0
        self.target_evaluations: int | None = None
        self.search_s = 0.0
        self.cloned = False  # PPO: whether the policy was fitted to its best warm-up episode (or to ``start``)
        self.start: tuple[list[float], float] | None = None  # PPO: (applied actions, reward) of a start candidate
        self.reexplorations = 0  # PPO: times its policy was widened after a rollout of repeats only
        self._rollout_first = 0  # index in history of the current rollout's first episode
        self._stalls = 0  # PPO: rollouts in a row that only repeated evaluated allocations
        self._actions: list[float] = []  # the applied actions of the episode under way
        self._bar = None
        self._writer = None
        self._checkpoint_due = False
        self._run_started: float | None = None

    # ---- set-up --------------------------------------------------------------------------------------
    def _build_algo(self) -> BaseAlgorithm:
        c = self.config
        kwargs = dict(
            policy_kwargs=dict(features_extractor_class=GraphFeaturesExtractor, net_arch=list(c.net_arch),
                               features_extractor_kwargs=dict(hidden_channels=c.hidden, num_layers=c.gnn_layers)),
            learning_rate=c.learning_rate, seed=c.seed, verbose=0, device="cpu",
            tensorboard_log=str(self.run_dir / "tb") if self.run_dir else None,
        )
        n = self.steps_per_episode
        if c.algo in ("ppo", "sac"):
            kwargs["policy_kwargs"]["log_std_init"] = float(np.log(c.init_std))
        if c.algo == "ppo":
            kwargs["policy_kwargs"]["net_arch"] = dict(pi=list(c.net_arch), vf=list(c.net_arch))
            # gamma = lambda = 1: every step's advantage is the final reward minus the value (AMC's assignment)
            sde = dict(use_sde=True, sde_sample_freq=n) if c.sde else {}  # a fresh noise matrix every episode
            # rollouts of 4 episodes; minibatches of one episode, or the whole rollout when episodes are short
            ppo = PPO("MultiInputPolicy", self.wrapped, n_steps=4 * n, batch_size=4 * n if 4 * n <= 64 else n,
                      n_epochs=4, gamma=1.0, gae_lambda=1.0, **sde, **kwargs)
            if c.sde:
                self._calibrate_sde(ppo, c.init_std)
            return ppo
        off = dict(buffer_size=c.buffer_size, learning_starts=c.warmup_episodes * n, batch_size=c.batch_size,
                   gamma=1.0, train_freq=(1, "episode"), gradient_steps=c.gradient_steps,
                   replay_buffer_class=FinalRewardReplayBuffer, **kwargs)
        if c.algo == "sac":
            return SAC("MultiInputPolicy", self.wrapped, **off)
        off["policy_kwargs"]["share_features_extractor"] = True  # the critic trains the GNN; cheaper updates
        noise = DecayingNormalNoise(c.noise_sigma, c.noise_decay)
        return ALGO_CLASSES[c.algo]("MultiInputPolicy", self.wrapped, action_noise=noise, **off)

    def _calibrate_sde(self, ppo: PPO, std: float) -> None:
        """Scale gSDE's noise so that the initial action std is ``std``.

        gSDE's action noise is ``latent @ eps`` with ``eps ~ N(0, sigma^2)`` per entry, so its std is
        ``sigma * |latent|``; sigma is set from the policy latent of the first observation.
        """
        policy = ppo.policy
        obs, _ = self.env.reset()
        with torch.no_grad():
            obs_t, _ = policy.obs_to_tensor(obs)
            latent = policy.mlp_extractor.forward_actor(policy.extract_features(obs_t, policy.pi_features_extractor))
            policy.log_std.fill_(float(np.log(std / max(float(latent.norm()), 1e-6))))
        policy.reset_noise()

    def load_policy_weights(self, state: dict) -> None:
        """Warm-start the actor (and target networks) from a portable policy's state dict."""
        extractor, mlp, head, _ = policy_modules(self.algo, self.config.algo)
        parts = {"extractor": extractor, "mlp": mlp, "head": head}
        for prefix, module in parts.items():
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
        for online, target in (("actor", "actor_target"), ("critic", "critic_target")):
            if hasattr(self.algo, target):
                getattr(self.algo, target).load_state_dict(getattr(self.algo, online).state_dict())
        if getattr(self.algo, "use_sde", False):
            self._calibrate_sde(self.algo, self.config.init_std)  # the loaded latent has its own scale

    # ---- the loop ------------------------------------------------------------------------------------
    @property
    def evaluations_done(self) -> int:
        """Distinct allocations evaluated so far (the env's cache of rewards)."""
        return len(self.env.cache)

    def budget_spent(self) -> bool:
        """Whether the episodes, or the distinct evaluations if there is a budget on them, are used up."""
        return self.episodes_done >= self.target_episodes or (
            self.target_evaluations is not None and self.evaluations_done >= self.target_evaluations)

    def run(self, episodes: int, evaluations: int | None = None) -> dict:
        """Search until ``episodes`` episodes are done in total, or ``evaluations`` distinct allocations have been
        evaluated (episodes that hit the env's cache cost no evaluation); return the best episode.
        """
        self.target_episodes, self.target_evaluations = episodes, evaluations
        if self.budget_spent():
            return self.best
        if self.config.progress:
            from tqdm.auto import tqdm
            total, done, unit = ((evaluations, self.evaluations_done, "eval") if evaluations is not None
                                 else (episodes, self.episodes_done, "ep"))
            self._bar = tqdm(total=total, initial=done, desc=f"search {self.config.algo}", unit=unit,
                             dynamic_ncols=True, disable=None)
        if self.run_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.run_dir / "tb" / "episodes"))
        self._run_started = time.perf_counter()
        self.algo._last_obs = None  # start from a fresh episode even if the env was used in between
        try:
            if isinstance(self.algo, PPO) and (self.start or (self.config.clone_warmup and
                                                              self.config.warmup_episodes > 0)):
                self._ppo_warmup()
            remaining = episodes - self.episodes_done
            if not self.budget_spent():
                self.algo.learn(remaining * self.steps_per_episode, callback=_EpisodeCallback(self),
                                reset_num_timesteps=False, tb_log_name="sb3")
        finally:
            self.search_s = self.elapsed()
            self._run_started = None
            if self._bar is not None:
                self._bar.close()
            if self._writer is not None:
                self._writer.close()
        if self.run_dir:
            self.checkpoint()
        return self.best

    def _ppo_warmup(self) -> None:
        """PPO's warm-up: ``warmup_episodes`` episodes of uniformly random actions (as DDPG's ``learning_starts``
        and AMC's), then the actor is fitted to the best of them, or to :attr:`start` (an allocation found another
        way, such as the sensitivity method's) if that scored higher (behaviour cloning), so that PPO refines the
        best allocation known instead of starting its search from the centre one.

        The actions of episode ``i`` come from ``seed`` and ``i`` alone, so a resumed warm-up draws what an
        uninterrupted one would have.
        """
        while self.episodes_done < self.config.warmup_episodes and not self.budget_spent():
            rng = np.random.default_rng([self.config.seed, self.episodes_done])
            self.wrapped.reset()
            done = False
            while not done:
                _, _, terminated, truncated, info = self.wrapped.step(rng.uniform(-1, 1, 1).astype(np.float32))
                self.on_step(info)
                done = terminated or truncated
            self.on_episode_end(info)
            self.maybe_checkpoint()
        if self.episodes_done < self.config.warmup_episodes or self.cloned:
            return
        # the best warm-up episode (no actions in a checkpoint from before they were kept), or the start candidate
        target = (self.best or {}).get("actions")
        if self.start is not None and (not target or self.start[1] > self.best["reward"]):
            target = self.start[0]
        if target:
            self._clone(target)
            self.cloned = True
            if self.run_dir:
                self.checkpoint()

    def _clone(self, actions: list[float], steps: int = 200, std: float | None = None) -> int:
        """Fit PPO's deterministic actor to one episode's applied ``actions`` (MSE, Adam; at most ``steps``
        steps, stopping as soon as every action is within :data:`CLONE_TOLERANCE`), then set its action std to
        ``std`` (default ``init_std``; with gSDE, re-scaled for the new latent). Returns the Adam steps taken.

        An actor already on those actions takes no step (each step is a GNN forward and backward pass), as when
        a re-centring follows one on the same best episode with no PPO update in between.
        """
        observations, obs = [], self.env.reset()[0]
        episodes = self.env.episodes
        for a in actions:  # the observations along that episode: the env is deterministic, its evaluation cached
            observations.append(obs)
            obs, *_ = self.env.step(np.array([a], dtype=np.float32))
        self.env.episodes = episodes  # a replay, not an episode of the search
        self.env.reset()  # back at the first step, where the algorithm's next episode starts
        batch = {k: torch.as_tensor(np.stack([o[k] for o in observations])).float() for k in observations[0]}
        target = torch.tensor(actions, dtype=torch.float32).unsqueeze(1)
        extractor, mlp, head, _ = policy_modules(self.algo, "ppo")
        params = [p for m in (extractor, mlp, head) for p in m.parameters()]
        opt = torch.optim.Adam(params, lr=self.config.learning_rate)
        for taken in range(steps + 1):  # steps >= 0, so the loop always binds taken
            predicted = head(mlp(extractor(batch)))
            if taken == steps or float((predicted.detach() - target).abs().max()) < CLONE_TOLERANCE:
                break
            loss = F.mse_loss(predicted, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        std = self.config.init_std if std is None else std
        if self.config.sde:
            self._calibrate_sde(self.algo, std)
        else:
            with torch.no_grad():
                self.algo.policy.log_std.fill_(float(np.log(std)))
        return taken

    def on_rollout_start(self) -> None:
        """PPO with ``reexplore``: after ``k`` rollouts in a row in which every episode repeated an evaluated
        allocation, re-centre the policy on the best episode so far (its applied actions, fitted as with
        ``clone_warmup``) and widen it to ``init_std * 2**k`` (at most :data:`REEXPLORE_MAX_STD`).

        On a coarse grid (``round_to`` 8) a Gaussian policy stalls two ways: samples within ``init_std`` of its
        mean mostly round to widths already tried, and where the best allocations sit on the edge of the action
        box its mean drifts outside it, so that every sample clips to the same allocation. Either way the search
        would spend the rest of its episodes on cache hits. PPO's updates narrow the policy again once it finds
        better allocations.
        """
        self._rollout_first = len(self.history)
        if not self._stalls or not (self.best or {}).get("actions"):
            return
        self._clone(self.best["actions"], std=min(REEXPLORE_MAX_STD, self.config.init_std * 2 ** self._stalls))
        self.reexplorations += 1

    def on_rollout_end(self) -> None:
        rollout = self.history[self._rollout_first:]
        stalled = (self.config.reexplore and isinstance(self.algo, PPO) and bool(rollout)
                   and all(r["cached"] for r in rollout))
        self._stalls = self._stalls + 1 if stalled else 0

    def elapsed(self) -> float:
        """Search wall time so far, this run included."""
        running = time.perf_counter() - self._run_started if self._run_started is not None else 0.0
        return self.search_s + running

    def on_step(self, info: dict) -> None:
        self._actions.append(float(np.asarray(info["action_applied"]).reshape(-1)[0]))

    def on_episode_end(self, info: dict) -> None:
        """Record a finished episode (after its last :meth:`on_step`)."""
        self.episodes_done += 1
        actions, self._actions = self._actions, []
        reward = float(info["reward_raw"])
        record = {"episode": self.episodes_done, "reward": reward, "acc": info["acc"],
                  "flops_ratio": info["flops_ratio"], "params_ratio": info["params_ratio"],
                  "cached": bool(info.get("cached")), "noise_sigma": self.noise.sigma if self.noise else None,
                  "wall_s": round(self.elapsed(), 3)}
        self.history.append(record)
        if self.best is None or reward > self.best["reward"]:
            self.best = {**record, "ratios": info["ratios"], "actions": actions}
            if self.run_dir:
                write_json(self.run_dir / "best.json", self.best)
        if self._writer is not None:
            for key in ("reward", "acc", "flops_ratio"):
                self._writer.add_scalar(f"charts/episode_{key}", record[key], self.episodes_done)
            self._writer.add_scalar("charts/best_reward", self.best["reward"], self.episodes_done)
            if self.noise:
                self._writer.add_scalar("charts/noise_sigma", self.noise.sigma, self.episodes_done)
        if self.noise is not None and self.episodes_done <= self.config.warmup_episodes:
            self.noise.sigma = self.config.noise_sigma  # no decay while actions are still random
        if self._bar is not None:
            if self.target_evaluations is None:
                self._bar.update(1)
            else:
                self._bar.update(self.evaluations_done - self._bar.n)
            self._bar.set_postfix(best=f"{self.best['reward']:.4f}", acc=f"{self.best['acc']:.2f}",
                                  flops=f"{self.best['flops_ratio']:.3f}", ep=self.episodes_done)
        if self.episodes_done % self.config.checkpoint_every == 0:
            self._checkpoint_due = True

    def maybe_checkpoint(self) -> None:
        if self.run_dir and self._checkpoint_due:
            self.checkpoint()
        self._checkpoint_due = False

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write agent, replay buffer and counters to ``ckpt/`` through a fresh folder and a rename."""
        ckpt, tmp, old = (self.run_dir / n for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.algo.save(tmp / "agent.zip")
        if hasattr(self.algo, "replay_buffer"):
            self.algo.save_replay_buffer(tmp / "replay.pkl")
        baseline = self.wrapped.average
        state = {"episodes_done": self.episodes_done, "num_timesteps": self.algo.num_timesteps,
                 "best": self.best, "history": self.history, "search_s": self.elapsed(),
                 "noise_sigma": self.noise.sigma if self.noise else None, "baseline": baseline,
                 "cloned": self.cloned, "reexplorations": self.reexplorations,
                 "stalls": self._stalls,
                 "env_episodes": self.env.episodes, "env_timings": self.env.timings,
                 "cache": [[list(k), r, info] for k, (r, info) in self.env.cache.items()]}
        (tmp / "state.json").write_text(json.dumps(state))
        if ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def resume(cls, config: TrainConfig, env: PruneEnv, run_dir: str | Path) -> Search:
        """Rebuild a search from the last checkpoint in ``run_dir`` (``ckpt/``, or ``ckpt.old/`` after a
        kill mid-swap).
        """
        run_dir = Path(run_dir)
        ckpt = next((run_dir / n for n in ("ckpt", "ckpt.old") if (run_dir / n / "state.json").is_file()), None)
        search = cls(config, env, run_dir)
        if ckpt is None:
            return search  # killed before the first checkpoint: start over
        state = json.loads((ckpt / "state.json").read_text())
        search.algo = ALGO_CLASSES[config.algo].load(ckpt / "agent.zip", env=search.wrapped, device="cpu")
        if (ckpt / "replay.pkl").is_file():
            search.algo.load_replay_buffer(ckpt / "replay.pkl")
        search.noise = getattr(search.algo, "action_noise", None)
        if search.noise is not None and state["noise_sigma"] is not None:
            search.noise.sigma = state["noise_sigma"]
        search.wrapped.average = state["baseline"]
        search.episodes_done, search.best, search.history = state["episodes_done"], state["best"], state["history"]
        search.search_s = state["search_s"]
        search.cloned = state.get("cloned", False)
        search.reexplorations, search._stalls = state.get("reexplorations", 0), state.get("stalls", 0)
        env.episodes, env.timings = state["env_episodes"], state["env_timings"]
        env.cache = {tuple(k): (r, info) for k, r, info in state["cache"]}
        return search
