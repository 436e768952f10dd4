"""Worker processes on this machine: spawned, each in its own process group, stop signals passed on."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

from autodrop.run.signals import STOP_SIGNALS, Interrupted

# How long workers told to stop because this process failed may take before they are killed.
STOP_GRACE_S = 5.0


def run_processes(
    target: Callable[..., None],
    args: Sequence[tuple[Any, ...]],
    *,
    poll: Callable[[], None] | None = None,
    poll_s: float = 1.0,
) -> list[int]:
    """Run ``target(*a)`` for each ``a`` in ``args`` in its own process; return their exit codes.

    Processes are spawned (never forked: CUDA and threads do not survive a fork). They run in
    process groups of their own, so a Ctrl-C in the terminal reaches only this process, which
    passes each SIGINT or SIGTERM on to them once: the first asks them to stop cleanly, a second
    to stop now. ``poll`` is called about every ``poll_s`` seconds while they run. Raises
    Interrupted after they have all stopped if a signal stopped them. If this function fails
    (``poll`` raises, say), the workers still running are stopped before the error passes on.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_in_own_group, args=(target, a), name=f"autodrop-worker-{i}")
        for i, a in enumerate(args)
    ]
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    install = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if install else {}
    try:
        for process in processes:
            process.start()
        while any(p.is_alive() for p in processes):
            for process in processes:
                process.join(timeout=poll_s / len(processes))
            if poll is not None:
                poll()
    except BaseException:
        # Workers would otherwise go on training, unwatched, after this process has failed.
        _stop(processes)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    return [int(p.exitcode or 0) for p in processes]


def _stop(processes: Sequence[Any]) -> None:
    """Ask every worker still running to stop (SIGTERM); kill those still running after STOP_GRACE_S."""
    alive = [p for p in processes if p.pid is not None and p.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in alive:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in alive:
        if process.is_alive():
            process.kill()
            process.join()


def _in_own_group(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    target(*args)
