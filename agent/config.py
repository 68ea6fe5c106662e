"""Training configuration: one dataclass, one docstring per field (the CLI flags mirror it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from envs import ACTION_CENTERS, FLOOR_METHODS, GRANULARITIES
from pruning_core.errors import UserError
from pruning_core.latency import BACKENDS
from pruning_core.latency_table import check_max_latency

ALGOS = ("ddpg", "td3", "sac", "ppo")
WARM_STARTS = ("sensitivity", "none")


BEFORE_FIELD = {"screen": 1, "uniform_z": 0.0}  # fields added after runs were recorded, at the value those runs used

# named budgets for train: the settings each changes from the defaults (flags given beside --preset win)
PRESETS: dict[str, dict[str, object]] = {
    "fast": {"episodes": 40, "sensitivity_points": 5, "rescore_top": 3},
    "default": {},
    "thorough": {"episodes": 300, "rescore_top": 10},
}


@dataclass
class TrainConfig:
    """Everything ``prunepilot train`` needs; saved as ``config.json`` in the run folder for ``--resume``."""

    preset: str = "default"
    """The named budget the other fields started from (``PRESETS``): fast, default or thorough."""
    model: str = "digits_cnn"
    """Zoo name, ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``."""
    weights: str | None = None
    """Checkpoint of the trained model (state_dict, loaded with ``weights_only=True``)."""
    data: str = "digits"
    """``cifar10:DIR``, ``imagefolder:DIR`` or ``digits``."""
    val_data: str | None = None
    """Folder of class folders the model was not trained on, for the reward and select images (default: the data's
    ``val/`` if it has one, else training images)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean subtracted from pixel * scale (default: the data set's)."""
    std: tuple[float, ...] | None = None
    """Per-channel std the centred pixels are divided by (default: the data set's)."""
    scale: float | None = None
    """Factor from 0-255 pixels to the model's input range (default: 1/255)."""
    image_size: int | None = None
    """Resize and centre-crop images to this many pixels square (default: their own size)."""
    loader_workers: int = 2
    """Processes decoding an image folder's images (0: none, decode in the main process)."""
    num_classes: int | None = None
    """Outputs of the model's head (default: the data's class count for torchvision/timm models, else as built)."""
    trust_pickle: bool = False
    """Let ``weights`` be a whole pickled model (unpickling runs code from the file)."""
    device: str = "auto"
    """Where the model is scored, pruned and evaluated: auto, cpu, cuda or cuda:N; the agent runs on the CPU."""
    flops: float = 0.5
    """FLOPs budget as a fraction of dense; every episode meets it."""
    episodes: int = 120
    """Episodes (one pruned-model evaluation each, cached repeats included); with ``evaluations``, their cap."""
    evaluations: int | None = None
    """A cap on the distinct pruned models evaluated, the floor's and the learned policy's final episode included
    (``episodes`` still caps the episodes). An episode that repeats an evaluated allocation reuses its cached reward,
    so evaluations are what a search costs."""
    workers: int = 1
    """Processes that evaluate pruned models in parallel, each with its own copy of the model and data: the floor's
    sensitivity table, random episodes and PPO's episodes of one rollout run together. The same seed finds the same
    allocations with any number."""
    ray: str | None = None
    """Run the ``workers`` as Ray actors on this cluster: ``auto`` (started with ``ray start``), ``local`` (started
    in this process) or ``HOST:PORT``; None: processes on this machine."""
    algo: str = "ppo"
    """SB3 algorithm: ppo, ddpg (AMC's choice), td3 or sac."""
    reward: str = "acc"
    """acc (accuracy under the enforced budget), acc_flops, or latency."""
    seed: int = 0
    """Seed for the agent, the exploration and the data splits."""
    out: str = "runs/train"
    """Run folder: config, best episode, checkpoints, TensorBoard logs, plots, final model and report."""
    max_ratio: float = 0.8
    """Largest pruning ratio of any one group."""
    granularity: str = "substage"
    """One step per stage (``stage``: consecutive groups of equal width and resolution share one ratio), per stage
    with each downsampling group a step of its own (``substage``), or per channel group (``group``)."""
    action_center: str = "remaining"
    """What action 0 means: the ratio that spends the budget left evenly over this and the later steps
    (``remaining``), the fixed uniform allocation (``uniform``), or half of max_ratio (``zero``)."""
    round_to: int | None = None
    """Round kept channels up to a multiple of this, such as the CPU conv kernels' channel block
    (``pruning_core.latency.cpu_channel_block()``; ``--round-to auto``). Groups no wider than it are not rounded."""
    drop_blocks: bool = False
    """Let the agent remove residual branches whole (``ModelTrace.droppable``). With ``stage`` or ``substage``
    granularity each run of groups gets a drop step after its width step, the share of its branches to remove,
    cheapest first (``PruningSession.drop_costs``); with ``group`` a width under half a block drops the branch."""
    max_latency: float | None = None
    """Also cap the pruned model's latency at this fraction of dense, as a latency table measured at the start
    on ``latency_backend`` at ``latency_batch`` predicts (saved as ``latency_table.json``). Every episode meets both
    budgets; pair it with ``round_to`` at the CPU's channel block."""
    latency_backend: str = "onnxruntime"
    """Runtime the latency table times: onnxruntime, torch-cl (eager, Conv+BN folded, channels-last) or torch."""
    latency_batch: int = 1
    """Batch size the latency table (and the ``latency`` reward) times."""
    reward_images: int = 1000
    """Training images in the reward split."""
    calib_batches: int = 10
    """Batches of 64 training images for adaptive BN in every episode."""
    importance: str = "taylor"
    """Channel ranking: ``taylor``, ``taylor2`` (second-order) or ``l1``."""
    reconstruct: bool = True
    """Score every candidate as the kept model is built: before adaptive BN, refit its conv and linear layers by least
    squares to the dense model's outputs on 256 calibration images (He et al. 2017; ``pruning_core.Reconstruction``).
    The refit reorders candidates, so a search without it ranks them by a proxy; it needs no labels or gradients.
    Off when ``finetune_epochs`` fine-tunes the kept model instead of refitting it."""
    reconstruct_final: bool | None = None
    """Refit the kept model the same way before it is evaluated on the test split and exported. None (the default):
    yes, unless ``finetune_epochs`` fine-tunes it, which after the refit gave lower accuracy than without it; the
    report's ``acc_before_reconstruct`` is the same allocation without the refit."""
    rescore_top: int = 5
    """After the search, re-score this many of the best distinct allocations on ``select_images`` more training
    images and keep the best over both splits (0: keep the best reward-split episode). The reward split's noise
    otherwise favours a lucky candidate among near-ties."""
    select_images: int = 1000
    """Training images, disjoint from the reward and calibration images, for that re-scoring."""
    uniform_z: float = 2.0
    """Keep the uniform allocation unless the best candidate leads it on the reward and select images by more than
    this many standard errors of the paired difference (0: keep the best score, however close)."""
    floor: tuple[str, ...] = FLOOR_METHODS
    """Cheap allocations scored beside the search's best candidates (``envs.floor_allocations``): uniform, the
    action space's centre, Taylor global ranking and greedy per-unit sensitivity. Whichever scores best on the
    reward and select images, built as the kept model is, is kept."""
    sensitivity_points: int = 10
    """Ratios per decision unit in the sensitivity table (one evaluation each)."""
    warm_start: str = "sensitivity"
    """PPO only: after ``warmup_episodes`` random episodes, fit the policy to the better of their best and the
    greedy sensitivity allocation (``sensitivity``), and search around it; ``none``: search around the action
    space's centre (random warm-up episodes only with ``clone_warmup``)."""
    warmup_episodes: int = 20
    """Episodes of uniformly random actions before learning starts (AMC: 100 of 400), which fill the replay buffer
    of DDPG, TD3 and SAC. PPO runs them when it has a warm start (``warm_start``) or ``clone_warmup``, then starts
    from the best of them and the warm start."""
    noise_sigma: float = 1.0
    """Std of the Gaussian exploration noise on the [-1, 1] action (AMC's 0.5 on [0, 1])."""
    noise_decay: float = 0.95
    """Noise std multiplier per episode after warm-up (AMC: 0.95)."""
    init_std: float = 0.3
    """Initial std of PPO's and SAC's Gaussian policy on the [-1, 1] action."""
    sde: bool = True
    """PPO only: generalized state-dependent exploration (gSDE), its noise matrix drawn once per episode, so that
    groups with similar embeddings move together."""
    clone_warmup: bool = False
    """PPO only: run the ``warmup_episodes`` random episodes first and fit the actor to the best of them, even
    without a ``warm_start``."""
    reexplore: bool = True
    """PPO only: after ``k`` rollouts in a row in which every episode repeated an evaluated allocation, re-centre
    the policy on the best episode so far and widen it to ``init_std * 2**k`` (at most 1)."""
    repeat_penalty: float = 0.0
    """Subtracted from the reward of an episode that repeats an evaluated allocation (accuracy as a fraction),
    steering the agent towards allocations it has not tried."""
    baseline: bool = True
    """Subtract a moving average of past episode rewards from the reward (AMC's baseline)."""
    hidden: int = 64
    """GNN embedding size (the features are twice this)."""
    gnn_layers: int = 3
    """GATv2 layers in the encoder."""
    net_arch: tuple[int, ...] = (300, 300)
    """Hidden layers of the actor and critic MLPs (AMC: 300, 300)."""
    learning_rate: float = 1e-3
    """Adam learning rate (for DDPG/TD3 actor and critic; SAC and PPO too)."""
    batch_size: int = 64
    """DDPG/TD3/SAC minibatch size (PPO's minibatch is one episode)."""
    gradient_steps: int = 8
    """Off-policy updates after each episode (bounded so that the agent's share of wall time stays small)."""
    buffer_size: int = 4000
    """Replay buffer transitions (AMC: 2000)."""
    rollout_episodes: int = 4
    """PPO only: episodes per rollout (per policy update). Their evaluations run together, so more workers than
    this wait; raising it changes the search itself, not only its speed."""
    screen: int = 8
    """PPO only: episodes the agent proposes per evaluation. A reward model fitted to every evaluation so far picks
    which to evaluate (highest upper confidence bound), and the agent learns from its predicted reward for the rest;
    1 evaluates every episode."""
    table_prior: bool = False
    """The reward model starts from the sensitivity table's additive prediction (a linear prior mean fitted to the
    evaluations) and models what it leaves; needs the ``sensitivity`` floor, which measures the table first."""
    checkpoint_every: int = 10
    """Episodes between checkpoints, each taken where the next rollout starts (every episode off-policy,
    every ``rollout_episodes`` for PPO), so a resumed run repeats the uninterrupted one."""
    max_nodes: int = 320
    """Observation padding: layer-graph nodes, grown to fit the model (changes only the padding)."""
    finetune_epochs: int = 0
    """Fine-tune epochs (KD from the dense model) for the final pruned model."""
    progress: bool = True
    """Show a progress bar with the best reward so far."""

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides) -> TrainConfig:
        """The defaults with ``preset``'s settings (``PRESETS``), then ``overrides``."""
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides, "preset": preset})

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if not isinstance(self.model, str):
            raise UserError(f"model must be a zoo name or 'package.module:factory', not a {type(self.model).__name__} "
                            "object: a run records it so that --resume can rebuild the model")
        if self.algo not in ALGOS:
            raise UserError(f"unknown algorithm {self.algo!r}; use one of {', '.join(ALGOS)}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.action_center not in ACTION_CENTERS:
            raise UserError(f"unknown action center {self.action_center!r}; use one of {', '.join(ACTION_CENTERS)}")
        if self.episodes < 1:
            raise UserError("--episodes must be at least 1")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.rollout_episodes < 1:
            raise UserError(f"--rollout-episodes must be at least 1, got {self.rollout_episodes}")
        if self.screen < 1:
            raise UserError(f"--screen must be at least 1, got {self.screen}")
        if self.evaluations is not None and self.evaluations < 1:
            raise UserError(f"--evaluations must be at least 1, got {self.evaluations}")
        if not 0.0 < self.flops <= 1.0:
            raise UserError(f"--flops {self.flops} must be in (0, 1]")
        if self.rescore_top < 0 or self.select_images < 0 or self.uniform_z < 0:
            raise UserError("--rescore-top, --select-images and --uniform-z must be >= 0")
        if self.max_latency is not None:
            check_max_latency(self.max_latency)
        if self.latency_backend not in BACKENDS:
            raise UserError(f"unknown latency backend {self.latency_backend!r}; use one of {', '.join(BACKENDS)}")
        if self.latency_batch < 1:
            raise UserError(f"--latency-batch must be >= 1, got {self.latency_batch}")
        if not self.repeat_penalty >= 0:  # NaN fails too
            raise UserError(f"--repeat-penalty must be >= 0, got {self.repeat_penalty}")
        unknown = [m for m in self.floor if m not in FLOOR_METHODS]
        if unknown:
            raise UserError(f"unknown --floor method {unknown[0]!r}; use any of {', '.join(FLOOR_METHODS)} or none")
        if self.warm_start not in WARM_STARTS:
            raise UserError(f"unknown --warm-start {self.warm_start!r}; use one of {', '.join(WARM_STARTS)}")
        if self.sensitivity_points < 1:
            raise UserError(f"--sensitivity-points must be at least 1, got {self.sensitivity_points}")
        if self.warmup_episodes < 0 or self.checkpoint_every < 1:
            raise UserError("--warmup-episodes must be >= 0 and --checkpoint-every >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net_arch"] = list(self.net_arch)
        d["floor"] = list(self.floor)
        d["mean"], d["std"] = (list(v) if v is not None else None for v in (self.mean, self.std))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        # a run recorded before a field existed ran without it: the value that reproduces that behaviour
        cfg = cls(**{**BEFORE_FIELD, **{k: v for k, v in d.items() if k in known}})
        cfg.net_arch = tuple(cfg.net_arch)
        cfg.floor = tuple(cfg.floor)
        cfg.mean, cfg.std = (tuple(v) if v is not None else None for v in (cfg.mean, cfg.std))
        return cfg
