"""Training-time pruning: schedules that reach a per-group allocation while the model trains, then remove the
channels for real.

:func:`~pruning_core.finetune.finetune` calls a schedule around its training steps. ``oneshot`` needs none (the model
is pruned before training). :class:`SPPSchedule` (structured probabilistic pruning) and :class:`DriveSchedule`
(DRIVE's dual-gradient ranking, applied in rounds) start from the dense model, zero channels with masks during the
first ``prune_fraction`` of the training steps, then prune the model physically to the allocation; the rest of the
budget is plain fine-tuning. A masked channel is zeroed after its norm layer (or its conv, where it has none), which
is exactly what removing it does, so the physical removal changes no output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pruning_core.graph import ModelTrace
from pruning_core.importance import L1Importance, drive_score, drive_terms
from pruning_core.prune import kept_counts, prune

__all__ = ["SCHEDULES", "ChannelMasks", "DriveSchedule", "SPPSchedule", "Schedule", "make_schedule"]

SCHEDULES = ("oneshot", "spp", "drive")


class ChannelMasks:
    """Multiply each group's channels by a 0/1 mask in the forward pass, through forward hooks on the group's norm
    layers (its conv or linear outputs where it has none). Masked channels get no gradient.
    """

    def __init__(self, model: nn.Module, trace: ModelTrace, groups: list[str]):
        self.trace = trace
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.masks = {g: torch.ones(trace.group(g).channels, device=device) for g in groups}
        self._handles = []
        for name in groups:
            g = trace.group(name)
            outs = [m for m in g.members if m.dim == "out"]
            norms = [m for m in outs if trace.layers[m.module].kind in ("bn", "act")]
            for m in norms or [m for m in outs if trace.layers[m.module].weighted]:
                order = torch.tensor([idx[0] for idx in m.index], device=device)
                self._handles.append(modules[m.module].register_forward_hook(self._hook(name, order)))

    def _hook(self, group: str, order: torch.Tensor):
        def apply(_mod, _inp, out: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(out.shape[1], device=out.device, dtype=out.dtype)
            mask[order] = self.masks[group].to(out.dtype)
            return out * mask.view(1, -1, *([1] * (out.dim() - 2)))
        return apply

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Schedule:
    """Prune to ``ratios`` during training: masks for the first ``prune_fraction`` of the steps, then physical
    removal. Subclasses decide the masks in :meth:`update`, called after every optimiser step.
    """

    name = ""

    def __init__(self, trace: ModelTrace, ratios: dict[str, float], round_to: int | None = None,
                 prune_fraction: float = 0.5, seed: int = 0):
        self.trace, self.ratios, self.round_to = trace, dict(ratios), round_to
        self.prune_fraction = prune_fraction
        kept = kept_counts(trace, ratios, round_to)
        self.to_prune = {g.name: g.channels - kept[g.name] for g in trace.groups if kept[g.name] < g.channels}
        self.gen = torch.Generator().manual_seed(seed)
        self.done = False
        self.masks: ChannelMasks | None = None
        self.removal: dict[str, torch.Tensor] | None = None  # the scores the physical removal used

    def start(self, model: nn.Module) -> nn.Module:
        """Attach the masks to the dense ``model`` (trained in place) and return it."""
        self.masks = ChannelMasks(model, self.trace, sorted(self.to_prune))
        return model

    def step(self, model: nn.Module, step: int, total: int) -> nn.Module | None:
        """After optimiser step ``step`` of ``total``: update the masks, or at the end of the pruning phase return
        the physically pruned model (None otherwise).
        """
        if self.done:
            return None
        end = max(1, int(self.prune_fraction * total))
        if step < end:
            self.update(model, step, end)
            return None
        return self._remove(model)

    def update(self, model: nn.Module, step: int, end: int) -> None:
        raise NotImplementedError

    def final_masks(self) -> dict[str, torch.Tensor]:
        """Per group, 1 for the channels to keep: exactly the allocation's count (what :meth:`update` reached, made
        exact).
        """
        raise NotImplementedError

    def _remove(self, model: nn.Module) -> nn.Module:
        keep = self.final_masks()
        self.masks.remove()
        self.removal = {g: keep.get(g, torch.ones(self.trace.group(g).channels)).double().cpu()
                        for g in (g.name for g in self.trace.groups)}
        self.done = True
        return prune(model, self.ratios, self.removal, self.trace, self.round_to)

    def state_dict(self) -> dict:
        return {"done": self.done, "removal": self.removal, "generator": self.gen.get_state(),
                "masks": {g: m.cpu() for g, m in self.masks.masks.items()} if self.masks else None,
                **self._extra_state()}

    def load_state_dict(self, state: dict, model: nn.Module) -> nn.Module:
        """Restore from :meth:`state_dict` on the dense ``model``; return the model whose weights the checkpoint
        holds (the dense one with masks, or its pruned form).
        """
        self.done, self.removal = state["done"], state["removal"]
        self.gen.set_state(state["generator"])
        self._load_extra(state)
        if self.done:
            return prune(model, self.ratios, self.removal, self.trace, self.round_to)
        self.start(model)
        for g, m in state["masks"].items():
            self.masks.masks[g].copy_(m)
        return model

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, state: dict) -> None:
        pass


class SPPSchedule(Schedule):
    """Structured Probabilistic Pruning (Wang et al. 2017, arXiv 1709.06994), per output channel.

    Every channel has a pruning probability ``p``, first 0. Every ``interval`` steps the channels not yet pruned are
    ranked by the L1 norm of their filters (rank ``r`` = 0 the smallest) and ``p += delta(r)``, clipped to [0, 1]:
    ``delta(r) = A exp(-alpha r)`` for ``r <= N_c`` and ``2uA - A exp(-alpha (2 N_c - r))`` above, with ``alpha =
    ln(2/u) / R`` and ``N_c = -ln(u) / alpha`` for the ``R`` channels still to prune, so the smallest gain ``A``, the
    ``R``-th gains 0 and those above lose probability. Each step trains under a fresh mask, channel kept with
    probability ``1 - p``; a channel whose ``p`` reaches 1 is pruned for good. The paper prunes im2col columns
    and updates every 180 iterations with A = 0.05, u = 0.25 (as its authors' code has them); here a column is a
    whole output channel, and the updates are spread over the pruning phase (``updates`` of them) so that the
    allocation is reached within a fine-tuning budget. At the end of the phase the channels with the highest ``p``
    make up the count still missing.
    """

    name = "spp"

    def __init__(self, trace, ratios, round_to=None, prune_fraction=0.5, seed=0, A: float = 0.05, u: float = 0.25,
                 updates: int = 100):
        super().__init__(trace, ratios, round_to, prune_fraction, seed)
        self.A, self.u, self.updates = A, u, updates
        self.p = {g: torch.zeros(trace.group(g).channels, dtype=torch.float64) for g in self.to_prune}

    def update(self, model, step, end):
        interval = max(1, end // self.updates)
        if step % interval == 0:
            l1 = L1Importance()(model, None, self.trace)
            for g, n in self.to_prune.items():
                p = self.p[g]
                left = n - int((p >= 1).sum())
                if left <= 0:
                    continue
                alive = (p < 1).nonzero().flatten()
                order = alive[l1[g][alive].argsort()]
                alpha = math.log(2 / self.u) / left
                n_c = -math.log(self.u) / alpha
                r = torch.arange(len(order), dtype=torch.float64)
                delta = torch.where(r <= n_c, self.A * torch.exp(-alpha * r),
                                    2 * self.u * self.A - self.A * torch.exp(-alpha * (2 * n_c - r)))
                p[order] = (p[order] + delta).clamp(0, 1)
                if int((p >= 1).sum()) > n:  # more reached 1 than the allocation removes: keep the best of them
                    over = (p >= 1).nonzero().flatten()
                    p[over[l1[g][over].argsort(descending=True)[:len(over) - n]]] = 0.999
        for g, p in self.p.items():  # this step's mask: keep each channel with probability 1 - p
            keep = (torch.rand(len(p), generator=self.gen, dtype=torch.float64) >= p).float()
            self.masks.masks[g].copy_(keep)

    def final_masks(self):
        out = {}
        for g, n in self.to_prune.items():
            keep = torch.ones(len(self.p[g]))
            keep[self.p[g].argsort(descending=True, stable=True)[:n]] = 0
            out[g] = keep
        return out

    def _extra_state(self):
        return {"p": self.p}

    def _load_extra(self, state):
        self.p = state["p"]


class DriveSchedule(Schedule):
    """DRIVE (Saikumar and Varghese 2024, arXiv 2404.03687), per output channel: after a dense training phase
    (``dense_fraction`` of the pruning phase), ``rounds`` rounds each remove an equal share of every group's
    allocation, ranked by DRIVE's dual-gradient metric, with training in between; channels once removed stay
    removed.

    The metric combines the L1 norm, the connection sensitivity ``|w * dL/dw|`` (SNIP's) and the convergence
    sensitivity ``|dL/dw|`` (:func:`~pruning_core.importance.drive_terms`). The gradients are the training steps'
    own, averaged over the steps since the last round. The paper ranks single weights for unstructured pruning;
    here a channel's score sums its filter's weights, and the three terms are put on one scale by dividing each by
    its mean over the group (the paper's exact weighting was not available to us).
    """

    name = "drive"

    def __init__(self, trace, ratios, round_to=None, prune_fraction=0.5, seed=0, rounds: int = 5,
                 dense_fraction: float = 0.2):
        super().__init__(trace, ratios, round_to, prune_fraction, seed)
        self.rounds, self.dense_fraction = rounds, dense_fraction
        self.acc = {g: torch.zeros(3, trace.group(g).channels, dtype=torch.float64) for g in self.to_prune}
        self.round = 0

    def update(self, model, step, end):
        for g, t in drive_terms(model, self.trace, sorted(self.to_prune)).items():
            self.acc[g] += t
        start = int(self.dense_fraction * end)
        due = self.round < self.rounds and step >= start + (end - start) * self.round // self.rounds
        if not due:
            return
        self.round += 1
        for g, n in self.to_prune.items():
            mask = self.masks.masks[g]
            target = n * self.round // self.rounds
            alive = (mask > 0).nonzero().flatten().cpu()
            cut = target - (len(mask) - len(alive))
            if cut > 0:
                score = drive_score(self.acc[g])[alive]
                mask[alive[score.argsort()[:cut]].to(mask.device)] = 0
            self.acc[g].zero_()

    def final_masks(self):
        out = {}
        for g, n in self.to_prune.items():
            keep = self.masks.masks[g].cpu().clone()
            missing = n - int((keep == 0).sum())
            if missing > 0:  # rounds not all reached (a very short budget): rank the rest now
                alive = keep.nonzero().flatten()
                keep[alive[drive_score(self.acc[g])[alive].argsort()[:missing]]] = 0
            out[g] = keep
        return out

    def _extra_state(self):
        return {"acc": self.acc, "round": self.round}

    def _load_extra(self, state):
        self.acc, self.round = state["acc"], state["round"]


def make_schedule(name: str, session, ratios: dict[str, float], round_to: int | None = None,
                  seed: int = 0) -> Schedule | None:
    """The schedule ``name`` for ``session``'s model and this allocation (None for ``oneshot``)."""
    if name == "oneshot":
        return None
    cls = {"spp": SPPSchedule, "drive": DriveSchedule}.get(name)
    if cls is None:
        from pruning_core.errors import UserError
        raise UserError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    return cls(session.trace, ratios, round_to, seed=seed)
