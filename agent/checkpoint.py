"""Search checkpoints that load without unpickling: tensors through torch's weights-only loader, the replay buffer as
plain arrays, counters and random states as JSON. A run folder from someone else cannot run code on ``--resume`` or
``export``.

A checkpoint taken where the algorithm is about to collect a rollout (:class:`agent.algos._BoundaryHook`) holds every
random state and counter the rest of the run depends on, so a run resumed from it repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from agent.algos import build_algo
from agent.config import TrainConfig
from graph_encoder.features import observation_space
from pruning_core.errors import UserError

if TYPE_CHECKING:
    from agent.search import Search

__all__ = ["find_checkpoint", "load_actor", "restore", "save"]

FOLDER, STAGING, PREVIOUS = "ckpt", "ckpt.tmp", "ckpt.old"
TENSORS, REPLAY, STATE = "agent.pt", "replay.npz", "state.json"
COUNTERS = ("num_timesteps", "_episode_num", "_n_updates")  # the SB3 counters a resumed learn() continues from
BUFFER_ARRAYS = ("actions", "rewards", "dones", "timeouts")


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's last complete checkpoint folder (``ckpt/``, or ``ckpt.old/`` after a kill mid-swap), or None.

    :raises UserError: the run was checkpointed by a version that pickled its agent (``agent.zip``).
    """
    run_dir = Path(run_dir)
    for name in (FOLDER, PREVIOUS):
        folder = run_dir / name
        if (folder / STATE).is_file() and (folder / TENSORS).is_file():
            return folder
        if (folder / "agent.zip").is_file():
            raise UserError(f"{folder} is a checkpoint of an older prunepilot (agent.zip, which loads by "
                            "unpickling and is not read); train the run again")
    return None


def save(search: Search, run_dir: Path) -> None:
    """Write the search's algorithm, replay buffer, counters and random states to ``run_dir/ckpt`` through a
    fresh folder and a rename, so a kill at any moment leaves one complete checkpoint.
    """
    ckpt, tmp, old = (run_dir / n for n in (FOLDER, STAGING, PREVIOUS))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    algo, env = search.algo, search.env
    variables = {name: getattr(algo, name).detach().clone() for name in algo._get_torch_save_params()[1]}
    torch.save({"parameters": algo.get_parameters(), "variables": variables, "torch_rng": torch.get_rng_state()},
               tmp / TENSORS)
    buffer = getattr(algo, "replay_buffer", None)
    if buffer is not None:
        n = buffer.buffer_size if buffer.full else buffer.pos
        arrays = {k: getattr(buffer, k)[:n] for k in BUFFER_ARRAYS}
        for part in ("observations", "next_observations"):
            arrays.update({f"{part}.{k}": v[:n] for k, v in getattr(buffer, part).items()})
        np.savez(tmp / REPLAY, **arrays)
    nprng = np.random.get_state(legacy=False)
    space = search.env.observation_space
    state = {
        **search.state(),
        "observation": {"max_nodes": int(space["node_mask"].shape[0]), "max_edges": int(space["edge_mask"].shape[0])},
        "algo": {k: getattr(algo, k) for k in COUNTERS},
        "replay": None if buffer is None else {"pos": buffer.pos, "full": buffer.full,
                                               "open_episode": buffer.open_episode},
        "random": {"numpy": {**nprng, "state": {"key": nprng["state"]["key"].tolist(),
                                                "pos": nprng["state"]["pos"]}},
                   "python": random.getstate(),
                   "action_space": algo.action_space.np_random.bit_generator.state,
                   "env": env.np_random.bit_generator.state},
        "env": {"episodes": env.episodes, "timings": env.timings,
                "cache": [[list(k), r, info] for k, (r, info) in env.cache.items()]},
    }
    (tmp / STATE).write_text(json.dumps(state))
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _tensors(folder: Path) -> dict:
    try:
        return torch.load(folder / TENSORS, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"{folder / TENSORS} is not a prunepilot checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _load_parameters(algo: BaseAlgorithm, tensors: dict, folder: Path) -> None:
    try:
        algo.set_parameters(tensors["parameters"], exact_match=True, device="cpu")
        for name, value in tensors["variables"].items():
            getattr(algo, name).data.copy_(value)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{folder / TENSORS} does not fit the run's config.json (edited or from another run): "
                        f"{str(e).splitlines()[0]}") from None


def restore(search: Search, folder: Path) -> dict:
    """Load a checkpoint into ``search`` (built fresh from the run's config) and return its state.json."""
    state = json.loads((folder / STATE).read_text())
    algo, env = search.algo, search.env
    tensors = _tensors(folder)
    _load_parameters(algo, tensors, folder)
    for k in COUNTERS:
        setattr(algo, k, state["algo"][k])
    if state["replay"] is not None:
        buffer = algo.replay_buffer
        with np.load(folder / REPLAY, allow_pickle=False) as arrays:
            n = len(arrays["actions"])
            for k in BUFFER_ARRAYS:
                getattr(buffer, k)[:n] = arrays[k]
            for part in ("observations", "next_observations"):
                for k, v in getattr(buffer, part).items():
                    v[:n] = arrays[f"{part}.{k}"]
        buffer.pos, buffer.full = state["replay"]["pos"], state["replay"]["full"]
        buffer.open_episode = state["replay"]["open_episode"]
    env.episodes, env.timings = state["env"]["episodes"], state["env"]["timings"]
    env.cache = {tuple(k): (r, info) for k, r, info in state["env"]["cache"]}
    rng = state["random"]
    torch.set_rng_state(tensors["torch_rng"])
    np.random.set_state({**rng["numpy"], "state": {"key": np.array(rng["numpy"]["state"]["key"], np.uint32),
                                                   "pos": rng["numpy"]["state"]["pos"]}})
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    algo.action_space.np_random.bit_generator.state = rng["action_space"]
    env.np_random.bit_generator.state = rng["env"]
    search.load_state(state)
    return state


class _Spaces(gym.Env):
    """An env that only carries spaces, to rebuild an algorithm's networks without a model."""

    def __init__(self, observation: gym.Space, action: gym.Space):
        self.observation_space, self.action_space = observation, action

    def reset(self, *, seed=None, options=None):
        raise RuntimeError("this env only carries spaces")

    def step(self, action):
        raise RuntimeError("this env only carries spaces")


def load_actor(run_dir: str | Path, config: TrainConfig) -> BaseAlgorithm:
    """The algorithm of a run's last checkpoint, rebuilt from its config (for :func:`agent.export_policy`).

    :raises UserError: no checkpoint, or one that does not load.
    """
    folder = find_checkpoint(run_dir)
    if folder is None:
        raise UserError(f"{run_dir} holds no checkpoint yet (ckpt/); let train run to its first one")
    space = json.loads((folder / STATE).read_text())["observation"]
    env = _Spaces(observation_space(space["max_nodes"], space["max_edges"]),
                  gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
    algo = build_algo(config, env, steps_per_episode=1)
    _load_parameters(algo, _tensors(folder), folder)
    return algo
