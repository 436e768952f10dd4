"""Helpers for the scaling-out tests: run tiny ``autodrop search`` commands as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
# Short heartbeats, so that a killed worker's trial is retried within seconds, not a minute. The grace
# stays well above the interval: on a loaded 2-core machine a live worker's beats were seen 3.3 s apart
# while its main thread imported torch's compiler stack.
FAST_HEARTBEAT = {"AUTODROP_HEARTBEAT_INTERVAL": "1", "AUTODROP_GRACE_PERIOD": "10"}


def autodrop_env(**extra: str) -> dict[str, str]:
    """The environment for an ``autodrop`` subprocess: this checkout first, fast heartbeats, 1 thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(FAST_HEARTBEAT)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def search_args(data: Path, storage: str, *, trials: int, epochs: int = 3, study: str = "scale", extra: tuple = ()) -> list[str]:
    """The command line of a tiny search."""
    return [
        sys.executable, "-m", "autodrop", "search", "--data", str(data), "--image-size", "16",
        "--epochs", str(epochs), "--trials", str(trials), "--batch-size", "32", "--pruner", "none",
        "--storage", storage, "--study", study, "--device", "cpu", "--quiet", *extra,
    ]


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``args`` with its output going to ``log``."""
    handle = open(log, "ab")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=autodrop_env(**env), cwd=log.parent)


def run_to_end(args: list[str], log: Path, *, timeout: float = 400) -> None:
    """Run ``args`` (output to ``log``) and fail the test unless it ends with exit code 0 in time."""
    process = start(args, log)
    try:
        assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        stop_all([process])


def wait_for(condition: Callable[[], object], *, timeout: float, what: str, step: float = 0.1) -> object:
    """Return ``condition()``'s first true value, polling; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Kill whatever is still running (after a failed test), so no worker outlives it."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()


def racing_worker(url: str, study_name: str, n_trials: int, seed: int) -> None:
    """A worker process for the admission tests: trials that sleep a little and report two steps."""
    import random

    import optuna

    from autodrop.locking import StorageLock
    from autodrop.study import open_storage
    from autodrop.workers import run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    storage = open_storage(url)
    study = optuna.load_study(study_name=study_name, storage=storage)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in (1, 2):
            time.sleep(rng.uniform(0.0, 0.05))
            trial.report(x * step, step)
        if rng.random() < 0.2:
            raise optuna.TrialPruned()
        return x

    run_trials(study, storage, objective, n_trials=n_trials, lock=StorageLock(url, f"admit:{study_name}"))
