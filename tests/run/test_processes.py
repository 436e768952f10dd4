"""Worker processes: none is left running when the parent fails while watching them."""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path

import pytest

from autodrop.run import processes
from autodrop.run.processes import run_processes


def stubborn_sleep(ready: str, seconds: float) -> None:
    """A worker that ignores SIGTERM, so that only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(seconds)


def _run_until_poll_fails(target, args, ready: list[Path]) -> list[multiprocessing.Process]:
    """Run two workers, raise in ``poll`` once every ``ready`` file exists; check both have stopped."""
    children: list[multiprocessing.Process] = []

    def poll() -> None:
        if all(path.exists() for path in ready):
            children.extend(multiprocessing.active_children())
            raise RuntimeError("poll failed")

    try:
        with pytest.raises(RuntimeError, match="poll failed"):
            run_processes(target, args, poll=poll, poll_s=0.1)
        assert len(children) == 2
        assert not any(child.is_alive() for child in children), "workers left running"
    finally:
        for child in children:  # should run_processes leave any, do not leave them behind the test too
            if child.is_alive():
                child.kill()
                child.join()
    return children


def test_workers_are_terminated_when_polling_fails() -> None:
    children = _run_until_poll_fails(time.sleep, [(60,), (60,)], ready=[])
    assert [child.exitcode for child in children] == [-signal.SIGTERM, -signal.SIGTERM]


def test_workers_that_ignore_terminate_are_killed_after_the_grace(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(processes, "STOP_GRACE_S", 0.5)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    children = _run_until_poll_fails(stubborn_sleep, [(str(path), 60) for path in ready], ready)
    assert [child.exitcode for child in children] == [-signal.SIGKILL, -signal.SIGKILL]
