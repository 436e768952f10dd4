"""What a search reports while it runs: nothing by default, or a progress bar in the terminal."""

from __future__ import annotations

from typing import Any


class Progress:
    """What a search reports while it runs; the default reports nothing."""

    def start(self, total: int, done: int) -> None: ...
    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None: ...
    def trial_done(self, best: float | None) -> None: ...
    def waiting(self, n_running: int) -> None: ...
    def close(self) -> None: ...


class BarProgress(Progress):
    """A tqdm bar over trials showing the current trial, its epoch and the best accuracy so far."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._best: float | None = None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="trial", dynamic_ncols=True, leave=True)

    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None:
        best = "-" if self._best is None else f"{100 * self._best:.1f}%"
        self._bar.set_postfix_str(f"trial {trial} epoch {epoch}/{epochs} val {100 * val_accuracy:.1f}% best {best}")

    def trial_done(self, best: float | None) -> None:
        self._best = best
        self._bar.update(1)

    def waiting(self, n_running: int) -> None:
        self._bar.set_postfix_str(f"waiting for {n_running} running trial(s) of other workers")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
