"""Gymnasium environment: choose a pruning ratio for each prunable channel group of a trained CNN."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from torch import nn

from envs.decisions import ACTION_CENTERS, GRANULARITIES, DecisionSpace
from envs.evaluator import EVALUATION_TIMINGS, Evaluator
from graph_encoder.features import DYNAMIC_FEATURES, NUM_FEATURES, STATIC_FEATURES, LayerGraph, observation_space
from pruning_core.data import ImageData
from pruning_core.errors import UserError
from pruning_core.latency_table import LatencyBudget
from pruning_core.parallel import EvaluationPool
from pruning_core.session import PruningSession
from pruning_core.session_config import SessionConfig

__all__ = ["ACTION_CENTERS", "DEFAULT_MAX_NODES", "GRANULARITIES", "REWARDS", "PruneEnv"]

DEFAULT_MAX_NODES = 320  # ResNet-110 has 274 layer-graph nodes, MobileNetV2 116, ResNet-56 139
REWARDS = ("acc", "acc_flops", "latency")


class PruneEnv(gym.Env):
    """## Description

    AMC-style channel pruning (He et al., ECCV 2018) over a graph view of the network. The agent visits
    the prunable channel groups of a trained CNN in topological order and picks a pruning ratio for each
    stage: a run of consecutive groups with the same width and resolution, such as the blocks of one ResNet
    stage (`granularity="stage"`: few, decisive steps), for each stage with its downsampling (strided) group
    as a step of its own (`granularity="substage"`, the default), or for each group (`granularity="group"`).
    At the end of the episode the pruning core removes the lowest-Taylor-scored channels for real,
    recalibrates BN statistics on training images (adaptive BN) and measures accuracy on a fixed reward
    split of training images. The FLOPs budget, and an optional budget on the latency a measured
    `LatencyTable` predicts, are enforced by clamping actions, so every finished episode meets them.

    ## Action Space

    `Box(-1, 1, (1,), float32)` (symmetric, as SB3 recommends), mapped monotonically onto a pruning ratio in
    `[0, max_ratio]` for the current step. The map is piecewise linear through a centre `c`: `a = -1 -> 0`,
    `a = 0 -> c`, `a = 1 -> max_ratio`. With `action_center="remaining"` (default) `c` is recomputed at every
    step as the ratio that, applied to this and every later group, spends exactly the budget left; so `a = 0`
    always fills the budget, and a deviation early in the episode is balanced by the later steps rather than
    wasting or overdrawing FLOPs. With `action_center="uniform"`, `c` is the fixed uniform allocation that
    meets the budget. Either way an untrained policy (outputs near 0) starts from uniform pruning and learns
    deviations from it, which also carry over between models. With `action_center="zero"` the map is
    linear, `(a + 1) / 2 * max_ratio`. Before it is applied, the ratio is raised, if needed, to the smallest
    one that keeps the budget reachable when every later group is pruned at `max_ratio` (AMC's
    resource-constrained clamp). A stage's ratio applies to each of its groups.

    With `drop=True`, a residual branch (a group in `ModelTrace.droppable`) keeps a whole number of `round_to`
    blocks, possibly none; removing a branch leaves its block's shortcut. Narrowing a layer to part of a SIMD
    block saves no time in blocked CPU kernels (ONNX Runtime pads the width on AVX-512); removing the branch
    saves all of it. With `granularity="group"` a ratio that leaves a branch under half a block removes it.
    With `stage` or `substage`, each run's width step (whole blocks, at least one) is followed by a drop step
    whose ratio is the share of the run's branches to remove, cheapest first (`drop_order` by
    `PruningSession.drop_costs`: by default the calibration loss with that branch alone removed); a width step
    with a single choice is left out. On ResNet-56 with 16-channel blocks that is 9 steps (`substage`) instead
    of 27, and the centre (action 0 on every step) is one ratio for every width and drop share that spends the
    budget.

    ## Observation Space

    A fixed-size `spaces.Dict` of 1-D boxes (SB3 wants 1-D vectors), padded to `max_nodes` nodes and
    `max_edges` edges, so one policy runs on any model whose graph fits:

    | key          | shape                       | dtype   | meaning                                     |
    |--------------|-----------------------------|---------|---------------------------------------------|
    | `x`          | (max_nodes * NUM_FEATURES,) | float32 | node features, row-major (node, feature):   |
    |              |                             |         | static, then dynamic; clipped to [-10, 10]  |
    | `edge_index` | (2 * max_edges,)            | int64   | max_edges sources, then max_edges targets   |
    | `edge_mask`  | (max_edges,)                | float32 | 1 for real edges                            |
    | `node_mask`  | (max_nodes,)                | float32 | 1 for real nodes                            |
    | `cursor`     | (1,)                        | int64   | node index of the current group's root      |
    | `graph_id`   | (1,)                        | int64   | fingerprint of the static graph (24 bits)   |

    Dynamic features, per node: the ratio chosen for its group so far, whether it is in the current group,
    whether its group is decided, the FLOPs share removed so far and still to remove (all nodes), the
    clamped minimum ratio for the current step (all nodes), and whether the current step is a drop step (all
    nodes). "Current" covers every group of the current stage.
    See `graph_encoder.features` for static ones.

    ## Rewards

    0 on every intermediate step. At the end, with `acc` the reward-split accuracy in [0, 1]:

    - `acc` (default): `acc` (resource-constrained: the budget is enforced, so accuracy alone is optimised)
    - `acc_flops`: `-(1 - acc) * log(FLOPs)` (AMC's FLOPs-aware reward)
    - `latency`: `-(1 - acc) * log(latency_us)`, the pruned model's median latency measured on this machine

    ## Starting State

    Every group unpruned, cursor on the first group in topological order. Deterministic.

    ## Episode End

    Terminates after `num_steps` steps: one per prunable group, stage or substage, plus the drop steps. Never
    truncates.
    `info` then holds `acc`, `flops_ratio`, `params_ratio`, `ratios`, `eval_s` (plus `prune_s`, `reconstruct_s`,
    `adapt_s`, `cached`, `episode`). Every step's `info` holds `action_applied`: the action after the budget clamp,
    in the action space (agents should learn from it, not from the action they proposed).

    ## Arguments

    ```python
    gymnasium.make("prunepilot/ChannelPrune-v0", model="resnet20", weights=PATH, data="cifar10:DIR", flops=0.5)
    ```

    - `model`: zoo name, `package.module:factory`, or an `nn.Module` (not modified).
    - `weights`, `data`: as on the CLI (`data` may also be an `ImageData`).
    - `flops`: FLOPs budget as a fraction of dense. `max_ratio`: largest ratio per group.
    - `latency_budget`: optional `LatencyBudget`, a cap on the latency a `LatencyTable` measured on this machine
      predicts, as a fraction of dense; every episode meets it as well as the FLOPs budget (`info` then holds
      `latency_ratio`).
    - `reward`: one of `acc`, `acc_flops`, `latency`. `round_to`: round kept channels up to a multiple.
    - `drop`: let residual branches be removed whole, see Action Space.
    - `reward_images`, `calib_batches`, `seed`: the reward split, adaptive-BN batches, split seed.
    - `max_nodes`, `max_edges`: observation padding (default 320 and 2 * max_nodes).
    - `action_center`: `remaining` (default), `uniform` or `zero`, see Action Space.
    - `granularity`: `substage` (default), `stage` or `group` (one step per channel group), see Description.
    - `session`: an existing `PruningSession`, to share its trace, scores and splits between envs.

    Taylor scores are computed once per env. An episode whose rounded channel counts were already
    evaluated reuses the cached reward.

    ## Version History

    - v0: initial version (before the first release it gained the `drop_step` feature and drop steps; policy
      files of format 1 do not load).
    """

    metadata = {"render_modes": []}

    def __init__(self, model: str | nn.Module | None = None, weights: str | None = None,
                 data: str | ImageData | None = None, flops: float = 0.5, reward: str = "acc",
                 max_ratio: float = 0.8, round_to: int | None = None, reward_images: int = 1000,
                 calib_batches: int = 10, seed: int = 0, max_nodes: int = DEFAULT_MAX_NODES,
                 max_edges: int | None = None, session: PruningSession | None = None, latency_batch: int = 1,
                 action_center: str = "remaining", granularity: str = "substage",
                 latency_budget: LatencyBudget | None = None, drop: bool = False):
        super().__init__()
        if reward not in REWARDS:
            raise UserError(f"unknown reward {reward!r}; use one of {', '.join(REWARDS)}")
        if session is None:
            if model is None or data is None:
                raise UserError("PruneEnv needs model= and data= (or session=)")
            session = PruningSession(model, weights, data, SessionConfig(reward_images=reward_images,
                                                                         calib_batches=calib_batches, seed=seed))
        self.session = session
        self.trace = session.trace
        self.target, self.reward_kind, self.max_ratio, self.round_to = flops, reward, max_ratio, round_to
        self.latency_batch, self.latency_budget = latency_batch, latency_budget
        self.graph = LayerGraph.from_trace(self.trace, session.scores)
        self.max_nodes = max_nodes
        self.max_edges = max_edges if max_edges is not None else 2 * max_nodes
        name = session.model_name
        if self.graph.num_nodes > self.max_nodes:
            raise UserError(f"{name} has {self.graph.num_nodes} layer-graph nodes but max_nodes={self.max_nodes}; "
                            f"pass max_nodes >= {self.graph.num_nodes} (--max-nodes on the CLI)")
        if self.graph.num_edges > self.max_edges:
            raise UserError(f"{name} has {self.graph.num_edges} layer-graph edges but max_edges={self.max_edges}; "
                            f"pass max_edges >= {self.graph.num_edges}")
        self.space = space = DecisionSpace(session, flops, max_ratio, round_to, granularity, action_center,
                                           latency_budget, drop)
        self.groups, self.granularity, self.action_center, self.drop = space.groups, granularity, action_center, drop
        # fixed for the env's life; center's entries change at each step with action_center "remaining"
        self.decisions, self.drop_steps, self.ratio_grid, self.center = (space.decisions, space.drop_steps,
                                                                         space.ratio_grid, space.center)
        self.dense_flops, self.budget, self.min_kept = space.dense_flops, space.budget, space.min_kept
        self._index = space.index

        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = observation_space(self.max_nodes, self.max_edges)
        n, e = self.graph.num_nodes, self.graph.num_edges
        self._x = np.zeros((self.max_nodes, NUM_FEATURES), np.float32)
        self._x[:n, :len(STATIC_FEATURES)] = self.graph.x_static
        self._edges = np.zeros((2, self.max_edges), np.int64)
        self._edges[:, :e] = self.graph.edge_index
        self._edge_mask = np.zeros(self.max_edges, np.float32)
        self._edge_mask[:e] = 1
        self._node_mask = np.zeros(self.max_nodes, np.float32)
        self._node_mask[:n] = 1
        self._graph_id = np.array([self.graph.fingerprint() % 2**24], np.int64)
        self._dyn = {name: len(STATIC_FEATURES) + i for i, name in enumerate(DYNAMIC_FEATURES)}
        self.evaluator = Evaluator(session, round_to, reward, latency_batch, latency_budget)
        self.episodes = 0
        self.defer = False  # end episodes without evaluating them (a pending info); see step()
        self._step_s = 0.0
        self._reset_state()

    @property
    def num_steps(self) -> int:
        """Steps per episode: the number of decisions (groups, or stages)."""
        return len(self.decisions)

    # ---- episode state -------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.t = 0
        self.kept = {g.name: g.channels for g in self.groups}
        self.ratios = {g.name: 0.0 for g in self.groups}
        self._x[:, len(STATIC_FEATURES):] = 0.0

    def _observation(self) -> dict[str, np.ndarray]:
        d = self._dyn
        flops_now = self.trace.flops(self.kept)
        self._x[:self.graph.num_nodes, d["flops_removed"]] = 1 - flops_now / self.dense_flops
        self._x[:self.graph.num_nodes, d["flops_to_remove"]] = max(0.0, flops_now - self.budget) / self.dense_flops
        self._x[:, d["is_current"]] = 0.0
        cursor = 0
        if self.t < self.num_steps:
            decision = self.decisions[self.t]
            for i in decision:
                self._x[self.graph.group_nodes[i], d["is_current"]] = 1.0
            self._x[:self.graph.num_nodes, d["drop_step"]] = float(self.drop_steps[self.t])
            self._min_ratio = self.space.min_ratio(self.kept, self.t)
            if self.action_center == "remaining":
                self.center[self.t] = self.space.fill_ratio(self.kept, self.t)
            self._x[:self.graph.num_nodes, d["min_ratio_now"]] = self._min_ratio / self.max_ratio
            cursor = int(self.graph.group_roots[min(decision)])
        else:
            self._x[:, d["drop_step"]] = 0.0
            cursor = int(self.graph.group_roots[-1])
        return {"x": self._x.reshape(-1).copy(), "edge_index": self._edges.reshape(-1).copy(),
                "edge_mask": self._edge_mask.copy(), "node_mask": self._node_mask.copy(),
                "cursor": np.array([cursor], np.int64), "graph_id": self._graph_id.copy()}

    def action_to_ratio(self, t: int, a: float) -> float:
        """Map an action in [-1, 1] to a pruning ratio in [0, max_ratio] through step ``t``'s centre."""
        return self.space.action_to_ratio(t, a)

    def ratio_to_action(self, t: int, ratio: float) -> float:
        """The inverse of :meth:`action_to_ratio` (clipped to the action box)."""
        return self.space.ratio_to_action(t, ratio)

    # ---- gymnasium API -------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._reset_state()
        return self._observation(), {}

    def step(self, action):
        if self.t >= self.num_steps:
            raise RuntimeError("step() called after the episode ended; call reset()")
        t0 = time.perf_counter()
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        kept = self.space.apply(self.kept, self.t, max(self.action_to_ratio(self.t, a), self._min_ratio))
        d = self._dyn
        for name, k in kept.items():
            i = self._index[name]
            self.kept[name] = k
            self.ratios[name] = 1.0 - k / self.groups[i].channels
            nodes = self.graph.group_nodes[i]
            self._x[nodes, d["ratio"]] = self.ratios[name] / self.max_ratio
            self._x[nodes, d["decided"]] = 1.0
        if self.drop_steps[self.t]:
            ratio = sum(k == 0 for k in kept.values()) / len(kept)
        else:
            ratio = 1.0 - sum(kept.values()) / sum(self.groups[self._index[name]].channels for name in kept)
        applied = {"action_applied": np.array([self.ratio_to_action(self.t, ratio)], np.float32)}
        self.t += 1
        self._step_s += time.perf_counter() - t0
        if self.t < self.num_steps:
            return self._observation(), 0.0, False, False, applied
        self.episodes += 1
        if self.defer:
            info = {"pending": True, "kept": dict(self.kept), "cached": self.evaluator.hold(self.kept)}
            return self._observation(), 0.0, True, False, {**info, "episode": self.episodes, **applied}
        reward, info = self.evaluate(self.kept)
        return self._observation(), reward, True, False, {**info, "episode": self.episodes, **applied}

    def feasible_allocations(self, limit: int = 10_000) -> list[dict[str, int]]:
        """Every allocation of the action space that meets the budgets
        (:meth:`DecisionSpace.feasible_allocations <envs.decisions.DecisionSpace.feasible_allocations>`).
        """
        return self.space.feasible_allocations(limit)

    def allocation(self, step_ratios: Iterable[float]) -> dict[str, int]:
        """Channels kept per group with decision ``t`` at ``step_ratios[t]``, as the steps apply them, without the
        budget clamp (check it with :meth:`fits`).
        """
        return self.space.allocation(step_ratios)

    def fits(self, kept: dict[str, int]) -> bool:
        """Whether the allocation ``kept`` meets the FLOPs budget (and the predicted-latency budget, if any)."""
        return self.space.fits(kept)

    # ---- evaluation, through the shared cached evaluator ------------------------------------------------
    @property
    def cache(self) -> dict[tuple[int, ...], tuple[float, dict]]:
        """(reward, info) of every allocation evaluated, by :meth:`key` (:attr:`Evaluator.cache`)."""
        return self.evaluator.cache

    @cache.setter
    def cache(self, value: dict[tuple[int, ...], tuple[float, dict]]) -> None:
        self.evaluator.cache = value

    @property
    def pool(self) -> EvaluationPool | None:
        """The worker pool evaluations run on, or None (:meth:`use_pool`)."""
        return self.evaluator.pool

    @property
    def evaluations(self) -> int:
        """Distinct allocations evaluated so far, those of deferred episodes included."""
        return self.evaluator.evaluations

    @property
    def evaluation_s(self) -> float:
        """Seconds spent building (pruning, reconstructing), recalibrating and evaluating pruned models so far."""
        return self.evaluator.evaluation_s

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent so far: the evaluator's (:data:`EVALUATION_TIMINGS`) and the steps' own (``step_s``)."""
        return {**self.evaluator.timings, "step_s": self._step_s}

    @timings.setter
    def timings(self, value: dict[str, float]) -> None:
        self.evaluator.timings = {k: value.get(k, 0.0) for k in EVALUATION_TIMINGS}
        self._step_s = value.get("step_s", 0.0)

    def evaluate(self, kept: dict[str, int]) -> tuple[float, dict]:
        """Reward and info of an allocation, evaluated once (:meth:`Evaluator.evaluate`); not checked against the
        budgets.
        """
        return self.evaluator.evaluate(kept)
