"""The search's live outputs: a progress bar with the best reward so far, and TensorBoard charts per episode."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SearchProgress"]


class SearchProgress:
    """A progress bar over episodes, or over distinct evaluations when ``evaluations`` caps the search (shown when
    ``show``), and charts in ``run_dir/tb/episodes`` (when ``run_dir``).

    :param episodes_done: where a resumed search starts: its bar starts there, and charts of later episodes, which
        it redoes, are dropped instead of drawn twice.
    """

    def __init__(self, algo: str, show: bool, run_dir: Path | None, episodes: int, evaluations: int | None,
                 episodes_done: int, evaluations_done: int):
        self.by_evaluations = evaluations is not None
        self._bar = self._writer = None
        if show:
            from tqdm.auto import tqdm
            total, done, unit = ((evaluations, evaluations_done, "eval") if self.by_evaluations
                                 else (episodes, episodes_done, "ep"))
            self._bar = tqdm(total=total, initial=done, desc=f"search {algo}", unit=unit, dynamic_ncols=True,
                             disable=None)
        if run_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(run_dir / "tb" / "episodes"), purge_step=episodes_done + 1)

    def episode(self, record: dict, best: dict, noise_sigma: float | None, evaluations_done: int) -> None:
        """Show one finished episode's ``record`` (as the history holds it) and the ``best`` so far."""
        step = record["episode"]
        if self._writer is not None:
            for key in ("reward", "acc", "flops_ratio"):
                self._writer.add_scalar(f"charts/episode_{key}", record[key], step)
            self._writer.add_scalar("charts/best_reward", best["reward"], step)
            if noise_sigma is not None:
                self._writer.add_scalar("charts/noise_sigma", noise_sigma, step)
        if self._bar is not None:
            self._bar.update(evaluations_done - self._bar.n if self.by_evaluations else 1)
            self._bar.set_postfix(best=f"{best['reward']:.4f}", acc=f"{best['acc']:.2f}",
                                  flops=f"{best['flops_ratio']:.3f}", ep=step)

    def close(self) -> None:
        for out in (self._bar, self._writer):
            if out is not None:
                out.close()
