"""An RL search over pruning ratios: SB3 algorithm + GNN extractor + PruneEnv, with best-episode tracking,
exploration schedule, TensorBoard charts and checkpoints. ``train`` and ``apply --search-episodes`` use it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
from stable_baselines3 import PPO

from agent.algos import DecayingNormalNoise, build_algo, policy_modules
from agent.baseline import MovingAverageBaseline
from agent.checkpoint import find_checkpoint, restore
from agent.checkpoint import save as save_checkpoint
from agent.cloning import calibrate_sde, clone_actor, set_std
from agent.config import TrainConfig
from agent.outputs import write_json
from agent.progress import SearchProgress
from agent.rollout import EpisodeCallback, episode_record, random_episodes, resolve_deferred
from agent.screen import Screen
from envs import PruneEnv
from pruning_core.errors import Interrupted

__all__ = ["MovingAverageBaseline", "Search"]

log = logging.getLogger("prunepilot")

REEXPLORE_MAX_STD = 1.0  # SB3's initial std: wider mostly samples the clipped ends of the [-1, 1] action


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
        # PPO proposes ``screen`` episodes per evaluation; a reward model picks which to evaluate
        screened = isinstance(self.algo, PPO) and config.screen > 1
        self.screen = Screen(env, config.screen, config.seed, config.table_prior) if screened else None
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
        # PPO with evaluation workers: episodes ended without evaluation, (buffer position, info, actions); their
        # evaluations run in parallel before the rollout's returns are computed (:meth:`resolve`)
        self._deferred: list[tuple[int | None, dict, list[float]]] = []
        self._progress: SearchProgress | None = None  # while run() runs
        self._checkpoint_due = False
        self._stop_requested = False  # Ctrl-C: stop at the next checkpoint boundary
        self._run_started: float | None = None

    # ---- set-up --------------------------------------------------------------------------------------
    def _build_algo(self):
        algo = build_algo(self.config, self.wrapped, self.steps_per_episode,
                          str(self.run_dir / "tb") if self.run_dir else None)
        algo.boundary = self._boundary
        if self.config.algo == "ppo" and self.config.sde:
            calibrate_sde(algo, self.env, self.config.init_std)
        return algo

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
            calibrate_sde(self.algo, self.env, self.config.init_std)  # the loaded latent has its own scale

    # ---- the loop ------------------------------------------------------------------------------------
    @property
    def evaluations_done(self) -> int:
        """Distinct allocations evaluated so far (the env's cache of rewards), deferred ones included."""
        if self.screening:
            return len(self.env.cache) + self._planned(new=True)
        return self.env.evaluations

    def budget_spent(self) -> bool:
        """Whether the episodes, or the distinct evaluations if there is a budget on them, are used up."""
        return self.episodes_done + self._planned() >= self.target_episodes or (
            self.target_evaluations is not None and self.evaluations_done >= self.target_evaluations)

    def _planned(self, new: bool = False) -> int:
        """Episodes the deferred ones will record (with ``new``, only those that evaluate a new allocation)."""
        if self.screen is not None:
            return self.screen.planned(self._deferred, new)
        return len(self._deferred)

    @property
    def parallel(self) -> bool:
        """Whether episodes end without evaluation and are evaluated together: PPO with several workers. PPO's
        actions within a rollout never depend on its rewards, so this finds what one-by-one evaluation finds.
        """
        return isinstance(self.algo, PPO) and self.env.pool is not None and self.env.pool.size > 1

    @property
    def screening(self) -> bool:
        """Whether PPO's episodes are screened by a reward model before evaluation (``screen`` > 1)."""
        return self.screen is not None

    @property
    def proposals(self) -> int:
        """PPO episodes screened so far, evaluated or not."""
        return self.screen.proposals if self.screen is not None else 0

    @property
    def pending_episodes(self) -> int:
        """Episodes ended without evaluation, waiting for :meth:`resolve`."""
        return len(self._deferred)

    def defer_episode(self, info: dict, position: int | None) -> None:
        """Hold an episode that ended without evaluation (``info["pending"]``) until :meth:`resolve`."""
        self._deferred.append((position, info, self._actions))
        self._actions = []

    def resolve(self, buffer=None) -> None:
        """Evaluate the deferred episodes together (in parallel on the env's pool), then record each in order as
        :meth:`on_episode_end` would have, writing the reward the agent learns from into ``buffer``. When
        screening, only the episodes :meth:`Screen.choose <agent.screen.Screen.choose>` picks are.
        """
        deferred, self._deferred = self._deferred, []
        resolve_deferred(self, deferred, buffer)

    def run(self, episodes: int, evaluations: int | None = None) -> dict:
        """Search until ``episodes`` episodes are done in total, or ``evaluations`` distinct allocations have been
        evaluated (episodes that hit the env's cache cost no evaluation); return the best episode.
        """
        self.target_episodes, self.target_evaluations = episodes, evaluations
        if self.budget_spent():
            return self.best
        self._progress = SearchProgress(self.config.algo, self.config.progress, self.run_dir, episodes, evaluations,
                                        self.episodes_done, self.evaluations_done)
        self._run_started = time.perf_counter()
        self.algo._last_obs = None  # start from a fresh episode even if the env was used in between
        if isinstance(self.algo, PPO):
            self.algo.rollout_buffer.before_returns = self.resolve
        handler = self._catch_ctrl_c()
        self.env.defer = self.parallel or self.screening
        try:
            if isinstance(self.algo, PPO) and (self.start or (self.config.clone_warmup and
                                                              self.config.warmup_episodes > 0)):
                self._ppo_warmup()
            # PPO's steps: the remaining episodes' proposals (the callback stops at the budget)
            factor = self.screen.factor if self.screen else 1
            steps = (episodes - self.episodes_done) * self.steps_per_episode * factor
            if not self.budget_spent():
                if self.noise is not None and self.algo.num_timesteps > 0:
                    self.noise.hold()  # learn() resets the noise as it starts; it decayed at the episode's end
                self.algo.learn(steps, callback=EpisodeCallback(self), reset_num_timesteps=False, tb_log_name="sb3")
                self.env.defer = False
                self.resolve()  # a rollout the budget cut short
        finally:  # after an interruption the deferred episodes are redone from the last checkpoint
            self.env.defer = False
            self._deferred = []
            self.env.evaluator.release()
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            self.search_s = self.elapsed()
            self._run_started = None
            self._progress.close()
            self._progress = None
        if self.run_dir:
            self.checkpoint()
        return self.best

    def _catch_ctrl_c(self):
        """With a run folder, in the main thread: the first Ctrl-C stops the search at the next checkpoint boundary
        (:class:`~pruning_core.errors.Interrupted`), a second one at once. Returns the handler it replaced, or None.
        """
        if self.run_dir is None or threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            log.warning("Ctrl-C: stopping after this rollout with a checkpoint (Ctrl-C again to stop now)")

        return signal.signal(signal.SIGINT, on_sigint)

    def _ppo_warmup(self) -> None:
        """PPO's warm-up: ``warmup_episodes`` episodes of uniformly random actions (as DDPG's ``learning_starts``
        and AMC's), then the actor is fitted to the best of them, or to :attr:`start` (an allocation found another
        way, such as the sensitivity method's) if that scored higher (behaviour cloning), so that PPO refines the
        best allocation known instead of starting its search from the centre one.

        The actions of episode ``i`` come from ``seed`` and ``i`` alone, so a resumed warm-up draws what an
        uninterrupted one would have.
        """
        batch = self.env.pool.size if self.parallel else 1
        while self.episodes_done < self.config.warmup_episodes and not self.budget_spent():
            random_episodes(self, batch)
            self.resolve()
            self._boundary()
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
        """Fit PPO's actor to one episode's applied ``actions`` (:func:`~agent.cloning.clone_actor`), then set its
        action std to ``std`` (default ``init_std``). Returns the Adam steps taken.
        """
        taken = clone_actor(self.algo, self.env, actions, self.config.learning_rate, steps)
        set_std(self.algo, self.env, self.config.init_std if std is None else std, self.config.sde)
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

    def on_episode_end(self, info: dict, actions: list[float] | None = None) -> None:
        """Record a finished episode: after its last :meth:`on_step`, or a deferred one with its applied ``actions``."""
        self.episodes_done += 1
        if actions is None:
            actions, self._actions = self._actions, []
        reward = float(info["reward_raw"])
        record = episode_record(info, self.episodes_done, self.noise.sigma if self.noise else None, self.elapsed())
        self.history.append(record)
        if self.best is None or reward > self.best["reward"]:
            self.best = {**record, "ratios": info["ratios"], "actions": actions}
            if self.run_dir:
                write_json(self.run_dir / "best.json", self.best)
        if self._progress is not None:
            self._progress.episode(record, self.best, self.noise.sigma if self.noise else None, self.evaluations_done)
        if self.noise is not None and self.episodes_done <= self.config.warmup_episodes:
            self.noise.sigma = self.config.noise_sigma  # no decay while actions are still random
        if self.episodes_done % self.config.checkpoint_every == 0:
            self._checkpoint_due = True

    def _boundary(self) -> None:
        """Where every random draw to come depends only on saved state (before a rollout, between warm-up
        episodes): checkpoint when one is due, and stop there after a Ctrl-C.
        """
        if self.run_dir and (self._checkpoint_due or self._stop_requested):
            self.checkpoint()
        self._checkpoint_due = False
        if self._stop_requested:
            raise Interrupted(f"interrupted after episode {self.episodes_done}, at a checkpoint; continue with: "
                              f"prunepilot train --resume {self.run_dir}")

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the search to ``run_dir/ckpt`` (:func:`agent.checkpoint.save`), through a fresh folder and a rename."""
        save_checkpoint(self, self.run_dir)

    def state(self) -> dict:
        """The search's own counters, as a checkpoint's state.json holds them."""
        return {"episodes_done": self.episodes_done, "best": self.best, "history": self.history,
                "search_s": self.elapsed(), "noise_sigma": self.noise.sigma if self.noise else None,
                "baseline": self.wrapped.average, "cloned": self.cloned, "reexplorations": self.reexplorations,
                "stalls": self._stalls, "proposals": self.proposals}

    def load_state(self, state: dict) -> None:
        """Set the counters :meth:`state` wrote."""
        if self.noise is not None and state["noise_sigma"] is not None:
            self.noise.sigma = state["noise_sigma"]
        self.wrapped.average = state["baseline"]
        self.episodes_done, self.best, self.history = state["episodes_done"], state["best"], state["history"]
        self.search_s, self.cloned = state["search_s"], state["cloned"]
        self.reexplorations, self._stalls = state["reexplorations"], state["stalls"]
        if self.screen is not None:
            self.screen.proposals = state.get("proposals", 0)

    @classmethod
    def resume(cls, config: TrainConfig, env: PruneEnv, run_dir: str | Path) -> Search:
        """Rebuild a search from the last checkpoint in ``run_dir``; one killed before its first checkpoint starts
        over. Continuing from a checkpoint repeats what the uninterrupted run did after it.
        """
        search = cls(config, env, run_dir)
        folder = find_checkpoint(run_dir)
        if folder is not None:
            restore(search, folder)
        return search
