"""Worker processes on this machine: spawned, each in its own process group, stop signals passed on."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Sequence

from autodrop.run.signals import STOP_SIGNALS, Interrupted


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
    Interrupted after they have all stopped if a signal stopped them.
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
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    return [int(p.exitcode or 0) for p in processes]


def _in_own_group(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    target(*args)
