"""Stopping a worker cleanly on SIGINT or SIGTERM: at a safe point, never in the middle of a write.

The first stop signal asks for a clean stop: a running trial is stopped at once (and queued again)
unless it is in its last epoch, which is let finish; a write to storage or a checkpoint (a critical
section) is never cut in half. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

_logger = logging.getLogger("autodrop")

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)
# One signal delivered twice (by the terminal to the whole process group, and forwarded by the
# parent) within this many seconds counts once, so that it asks for a clean stop, not an abrupt one.
SAME_SIGNAL_S = 0.5


class Interrupted(KeyboardInterrupt):
    """A worker stopped on SIGINT or SIGTERM; finished trials are kept and a rerun resumes."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal (130 for SIGINT)."""
        return 128 + self.signum


class StopGuard:
    """Turns the first stop signal into a clean stop at a safe point; a second one stops now.

    Inside a trial, the signal raises Interrupted at once, except in critical sections (writes to
    storage or a checkpoint), where it waits for the section's end, and in a trial's last epoch,
    which is let finish. Outside a trial, the run loop checks ``requested`` between trials.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.n_signals = 0
        self._last_signal_at = -1e9
        self.in_trial = False
        self.finishing = False  # the running trial is in its last epoch
        self.depth = 0  # nesting of critical sections
        self.wakeup = threading.Event()

    def on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now - self._last_signal_at < SAME_SIGNAL_S:
            return
        self._last_signal_at = now
        self.n_signals += 1
        if self.requested is None:
            self.requested = signum
            _logger.warning("%s received: stopping after the current step", signal.Signals(signum).name)
        self.wakeup.set()
        if self.in_trial and self.depth == 0:
            self.raise_if_stopping()

    def raise_if_stopping(self) -> None:
        """Raise Interrupted if a stop was asked for and the running trial may not finish first."""
        if self.requested is not None and (not self.finishing or self.n_signals > 1):
            raise Interrupted(self.requested)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.in_trial:
            self.raise_if_stopping()


_ACTIVE: StopGuard | None = None


@contextmanager
def critical() -> Iterator[None]:
    """Defer a stop signal to the end of this block (for writes that must not be cut in half)."""
    if _ACTIVE is None:
        yield
    else:
        with _ACTIVE.critical():
            yield


@contextmanager
def handle_stop_signals() -> Iterator[StopGuard]:
    global _ACTIVE
    guard = StopGuard()
    # Signal handlers can only be set from the main thread; elsewhere (a notebook's worker thread)
    # the default behaviour stays and Ctrl-C still fails the running trial through KeyboardInterrupt.
    install = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, guard.on_signal) for s in STOP_SIGNALS} if install else {}
    _ACTIVE = guard
    try:
        yield guard
    finally:
        _ACTIVE = None
        for s, handler in previous.items():
            signal.signal(s, handler)
