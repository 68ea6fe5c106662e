"""The portable policy file: safetensors weights plus a JSON config; loading never unpickles.

A policy is a folder (or a ``.zip`` of it) holding ``policy.json`` and ``policy.safetensors``. The JSON
names the format and its version, the GNN and feature settings, the algorithm, the FLOPs target, the
training model, its best ratios and the prunepilot version, and the sha256 of the weights, so a
truncated or edited file is caught before any tensor is used.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from agent.algos import policy_modules
from agent.checkpoint import load_actor
from agent.config import TrainConfig
from agent.outputs import staged_dir
from graph_encoder import DYNAMIC_FEATURES, STATIC_FEATURES, GraphFeaturesExtractor, observation_space
from pruning_core import UserError, __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "PortablePolicy", "export_policy", "load_policy"]

FORMAT = "prunepilot-policy"
FORMAT_VERSION = 2  # 2: the drop_step dynamic feature
_ACTIVATIONS = {"ReLU": nn.ReLU, "Tanh": nn.Tanh}


class PortablePolicy(nn.Module):
    """The deterministic actor rebuilt from plain modules: GNN extractor -> MLP -> one output -> squash.

    :param config: the ``policy.json`` content (see :func:`export_policy`).
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        net = config["network"]
        space = observation_space(config["observation"]["max_nodes"], config["observation"]["max_edges"])
        self.extractor = GraphFeaturesExtractor(space, **net["extractor"])
        layers: list[nn.Module] = []
        width = self.extractor.features_dim
        for h in net["hidden"]:
            layers += [nn.Linear(width, h), _ACTIVATIONS[net["activation"]]()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.squash = net["squash"]

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.head(self.mlp(self.extractor(obs)))
        return torch.tanh(out) if self.squash == "tanh" else out.clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The action for one observation from :class:`envs.PruneEnv` (padding of any size)."""
        batch = {k: torch.as_tensor(np.asarray(v)).float().unsqueeze(0) for k, v in obs.items()}
        return self(batch)[0].numpy()

    @property
    def train_config(self) -> dict:
        return self.config["training"]


def export_policy(run_dir: str | Path, out: str | Path) -> Path:
    """Write the policy of a finished (or checkpointed) training run to ``out`` (a folder, or a ``.zip``).

    :raises UserError: ``run_dir`` holds no run or no checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a training run (no config.json); run prunepilot train --out first")
    config = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    algo = load_actor(run_dir, config)
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else None
    return save_policy(algo, config, best, out)


LOCAL_SETTINGS = ("out", "progress", "workers", "ray", "device", "loader_workers")  # this machine's, not the policy's


def save_policy(algo, config: TrainConfig, best: dict | None, out: str | Path) -> Path:
    """Write an SB3 model's actor as a portable policy (see :func:`export_policy`)."""
    extractor, mlp, head, squash = policy_modules(algo, config.algo)
    activations = [type(m).__name__ for m in mlp if not isinstance(m, nn.Linear)]
    space = algo.observation_space
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "prunepilot_version": __version__,
        "algorithm": config.algo,
        "network": {"extractor": dict(extractor.config), "hidden": [m.out_features for m in mlp
                                                                    if isinstance(m, nn.Linear)],
                    "activation": activations[0] if activations else "ReLU", "squash": squash},
        "observation": {"max_nodes": int(space["node_mask"].shape[0]), "max_edges": int(space["edge_mask"].shape[0]),
                        "static_features": list(STATIC_FEATURES), "dynamic_features": list(DYNAMIC_FEATURES),
                        "action": f"Box(-1, 1) -> ratio in [0, max_ratio], action 0 at the {config.action_center!r} "
                                  f"centre, one step per {config.granularity}"
                                  + (", residual branches may be dropped" if config.drop_blocks else "")
                                  + " (see envs.PruneEnv)"},
        "training": {"model": config.model, "data": config.data, "flops": config.flops,
                     "max_ratio": config.max_ratio, "reward": config.reward, "episodes": config.episodes,
                     "evaluations": config.evaluations, "seed": config.seed, "round_to": config.round_to,
                     # the action space the policy learned in; apply must replay the same one
                     "granularity": config.granularity, "action_center": config.action_center,
                     "drop_blocks": config.drop_blocks,
                     # the latency budget it searched under (a table is measured again for each new model)
                     "max_latency": config.max_latency, "latency_backend": config.latency_backend,
                     "latency_batch": config.latency_batch,
                     # how its rewards were scored: apply scores its candidates the same way by default
                     "reconstruct": config.reconstruct,
                     # every setting the run resolved, its preset included, for the record
                     "preset": config.preset,
                     "settings": {k: v for k, v in config.to_dict().items() if k not in LOCAL_SETTINGS}},
        "best": best,
    }
    state = {f"extractor.{k}": v for k, v in extractor.state_dict().items()}
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()})
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["sha256"] = _checksum(meta, blob)
    text = json.dumps(meta, indent=2) + "\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".zip":
        tmp = out.with_name(out.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("policy.json", text)
            z.writestr("policy.safetensors", blob)
        tmp.replace(out)
    else:
        with staged_dir(out) as tmp:
            (tmp / "policy.json").write_text(text)
            (tmp / "policy.safetensors").write_bytes(blob)
    return out


def _checksum(meta: dict, blob: bytes) -> str:
    """sha256 over the canonical JSON of the config (all but this checksum) and the weights, so that an edited
    setting fails to load as an edited weight does.
    """
    config = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + blob).hexdigest()


def load_policy(path: str | Path) -> PortablePolicy:
    """Load a portable policy without unpickling anything.

    :raises UserError: the file is missing, truncated, edited, of another format or format version.
    """
    path = Path(path)
    try:
        if path.is_dir():
            text, blob = (path / "policy.json").read_text(), (path / "policy.safetensors").read_bytes()
        elif path.is_file():
            with zipfile.ZipFile(path) as z:
                text, blob = z.read("policy.json").decode(), z.read("policy.safetensors")
        else:
            raise UserError(f"policy not found: {path}")
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise UserError(f"cannot read policy {path}: {e} (expected policy.json and policy.safetensors)") from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: policy.json is corrupted ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a prunepilot policy (format {meta.get('format')!r})"
                        if isinstance(meta, dict) else f"{path}: policy.json is not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has policy format version {meta.get('format_version')} (written by prunepilot "
                        f"{meta.get('prunepilot_version')}); this prunepilot {__version__} reads version "
                        f"{FORMAT_VERSION}: re-export the run with this version")
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise UserError(f"{path}: policy.safetensors does not match the checksum in policy.json "
                        "(the file is truncated, corrupted or was edited)")
    if meta.get("sha256") != _checksum(meta, blob):
        raise UserError(f"{path}: policy.json does not match its checksum (it was edited, or exported before "
                        "prunepilot checksummed the config: re-export the run)")
    try:
        state = load_safetensors(blob)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise UserError(f"{path}: policy.safetensors is not a valid safetensors file: {e}") from e
    try:
        policy = PortablePolicy(meta)
        policy.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: weights do not fit the network described in policy.json: {e}") from e
    return policy.eval()
