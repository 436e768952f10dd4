"""Helpers for the scaling-out tests: run tiny ``autodrop search`` commands as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
from optuna.trial import TrialState

from autodrop.run.scheduler import Outcome, TrialRunner

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


class ObjectiveRunner(TrialRunner):
    """Runs each admitted trial as one step of ``objective(trial)`` through the real scheduler: the
    shape of the tests that pin the scheduler's rules (admission, signals, failures).

    ``last_step`` makes every step the trial's last (a first stop signal lets it finish).
    """

    def __init__(self, objective: Callable, *, catch: tuple = (), last_step: bool = False) -> None:
        self.objective, self.catch, self.last_step = objective, catch, last_step
        self.trial = None

    def running(self) -> list:
        return [] if self.trial is None else [self.trial]

    def start(self, trial):
        self.trial = trial
        return None

    def in_last_step(self) -> bool:
        return self.last_step

    def step(self) -> list:
        try:
            result = self.objective(self.trial)
        except optuna.TrialPruned as e:
            result = e
        return [(self.trial, result)]

    def record(self, trial, result):
        self.trial = None
        if isinstance(result, optuna.TrialPruned):
            return Outcome(TrialState.PRUNED)
        return Outcome(TrialState.COMPLETE, float(result))

    def forget(self, trial) -> None:
        self.trial = None


def run_objective(study, storage, url: str, objective: Callable, n_trials: int, *, catch: tuple = (),
                  last_step: bool = False, **kwargs) -> None:
    """Run ``objective`` as trials of ``study`` until it has ``n_trials`` finished, as a worker does."""
    from autodrop.run.locking import StorageLock
    from autodrop.run.scheduler import run_trials

    runner = ObjectiveRunner(objective, catch=catch, last_step=last_step)
    run_trials(study, storage, runner, n_trials=n_trials, lock=StorageLock(url, f"admit:{study.study_name}"), **kwargs)


def racing_worker(url: str, study_name: str, n_trials: int, seed: int) -> None:
    """A worker process for the admission tests: trials that sleep a little and report two steps."""
    import random

    import optuna

    from autodrop.run.storage import open_storage

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

    run_objective(study, storage, url, objective, n_trials)
