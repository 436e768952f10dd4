"""The run loop shared by all workers: admission to exactly N, dead workers, stop signals, the lock."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autodrop.errors import ConfigError
from autodrop.run import records
from autodrop.run.locking import StorageLock
from autodrop.run.signals import Interrupted, critical
from autodrop.run.storage import heartbeat_settings, open_storage
from autodrop.run.study import FINISHED_STATES

from .scaling_helpers import racing_worker, run_objective


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODROP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("AUTODROP_GRACE_PERIOD", "2")


def _study(tmp_path: Path, name: str = "loop") -> tuple[optuna.Study, object, str]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    storage = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    return study, storage, url


def _run(study: optuna.Study, storage: object, url: str, objective, n_trials: int, **kwargs) -> None:
    run_objective(study, storage, url, objective, n_trials, **kwargs)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED_STATES)


def test_run_trials_stops_at_exactly_n_finished_counting_earlier_ones(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    _run(study, storage, url, lambda t: t.suggest_float("x", 0, 1), 3)
    _run(study, storage, url, lambda t: t.suggest_float("x", 0, 1), 5)
    assert len(_finished(study)) == 5
    assert len(study.trials) == 5


def test_stop_signal_fails_running_trial_with_reason_and_queues_its_retry(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        trial.report(0.5, 1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises out of this sleep
        return 1.0

    with pytest.raises(Interrupted) as stopped:
        _run(study, storage, url, objective, 3)
    assert stopped.value.exit_code == 130
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs[records.FAIL_REASON] == "interrupted by SIGINT"
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == failed.number
    assert retry.params == failed.params
    assert retry.intermediate_values == {1: 0.5}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_rerun_after_stop_signal_runs_the_queued_retry_first(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)

    def interrupted(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 1.0

    with pytest.raises(Interrupted):
        _run(study, storage, url, interrupted, 2)
    seen: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append({"number": trial.number, "fail_reason": trial.user_attrs.get(records.FAIL_REASON)})
        return trial.suggest_float("x", 0, 1)

    _run(study, storage, url, objective, 2)
    assert seen[0] == {"number": 1, "fail_reason": None}  # the retry, its inherited reason cleared
    assert study.trials[1].params == study.trials[0].params
    assert len(_finished(study)) == 2


def test_stop_signal_in_last_epoch_lets_the_trial_finish(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return trial.suggest_float("x", 0, 1)

    with pytest.raises(Interrupted) as stopped:
        _run(study, storage, url, objective, 3, last_step=True)
    assert stopped.value.exit_code == 143
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # finished, and no new one started


def test_second_stop_signal_stops_even_the_last_epoch(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.7)  # longer than one signal delivered twice
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return 1.0

    with pytest.raises(Interrupted):
        _run(study, storage, url, objective, 3, last_step=True)
    assert study.trials[0].state == TrialState.FAIL


def test_stop_signal_waits_for_the_end_of_a_critical_section(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    written: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        with critical():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            written.append("checkpoint")
        written.append("next epoch")
        return 1.0

    with pytest.raises(Interrupted):
        _run(study, storage, url, objective, 3)
    assert written == ["checkpoint"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_trial_left_without_heartbeat_is_failed_and_retried(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    # A worker that died between admitting a trial and its first heartbeat leaves this behind.
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    runs: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        runs.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    _run(study, storage, url, objective, 1)
    trials = study.trials
    assert trials[0].state == TrialState.FAIL
    assert trials[1].system_attrs["failed_trial"] == orphan.number
    assert trials[1].params == trials[0].params
    assert runs == [1]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_dead_workers_trial_is_retried_after_the_grace_period(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(dead._trial_id)  # then its worker died
    waits: list[int] = []
    runs: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        runs.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    # One trial is wanted and one is running: wait, rather than start a second one, until it is stale.
    _run(study, storage, url, objective, 1, on_wait=waits.append)
    assert waits and set(waits) == {1}
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[1].system_attrs["failed_trial"] == dead.number
    assert runs == [1]
    assert len(_finished(study)) == 1


def test_worker_goes_on_when_its_trial_was_given_up_for_stale(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    calls: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        if len(calls) == 1:
            # Another worker missed this one's heartbeats, failed it and queued its retry.
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            trial.report(0.1, 1)  # raises UpdateFinishedTrialError
        return trial.suggest_float("x", 0, 1)

    _run(study, storage, url, objective, 1)
    assert calls == [0, 1]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_failed_trials_do_not_count_and_errors_outside_catch_propagate(tmp_path: Path) -> None:
    study, storage, url = _study(tmp_path)
    calls = iter([ValueError("bad luck"), 0.3, 0.4])

    def objective(trial: optuna.Trial) -> float:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    _run(study, storage, url, objective, 2, catch=(ValueError,))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs[records.FAIL_REASON] == "ValueError: bad luck"

    def broken(trial: optuna.Trial) -> float:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        _run(study, storage, url, broken, 3)
    assert study.trials[-1].state == TrialState.FAIL


def test_sqlite_lock_keeps_a_second_holder_waiting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    first, second = StorageLock(url, "a"), StorageLock(url, "a")
    assert first.mechanism == "sqlite-file"
    events: list[str] = []
    held = threading.Event()

    def hold_first() -> None:
        with first.hold():
            held.set()
            time.sleep(0.3)
            events.append("first released")

    thread = threading.Thread(target=hold_first)
    thread.start()
    held.wait()
    with second.hold():
        events.append("second acquired")
    thread.join()
    assert events == ["first released", "second acquired"]


def test_in_memory_storage_uses_a_lock_within_the_process() -> None:
    assert StorageLock("sqlite://", "a").mechanism == "process"
    assert StorageLock("sqlite:///:memory:", "a").mechanism == "process"
    assert StorageLock("postgresql+psycopg://u@h/db", "a").mechanism == "postgresql"


def test_heartbeat_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODROP_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("AUTODROP_GRACE_PERIOD", "7")
    assert heartbeat_settings() == (2, 7)
    monkeypatch.delenv("AUTODROP_HEARTBEAT_INTERVAL")
    monkeypatch.delenv("AUTODROP_GRACE_PERIOD")
    assert heartbeat_settings() == (15, 60)


@pytest.mark.parametrize(
    ("interval", "grace", "message"),
    [("0", "5", "AUTODROP_HEARTBEAT_INTERVAL must be a whole number"), ("x", "5", "but got 'x'"),
     ("5", "5", "AUTODROP_GRACE_PERIOD must be longer")],
)
def test_bad_heartbeat_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, interval: str, grace: str,
                                                 message: str) -> None:
    monkeypatch.setenv("AUTODROP_HEARTBEAT_INTERVAL", interval)
    monkeypatch.setenv("AUTODROP_GRACE_PERIOD", grace)
    with pytest.raises(ConfigError, match=message):
        heartbeat_settings()


@pytest.mark.slow
def test_racing_worker_processes_end_with_exactly_n_finished_trials(tmp_path: Path) -> None:
    study, _, url = _study(tmp_path, "race")
    n_trials = 12
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=racing_worker, args=(url, "race", n_trials, seed)) for seed in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    trials = study.trials
    assert len([t for t in trials if t.state in FINISHED_STATES]) == n_trials
    assert len(trials) == n_trials  # nothing started beyond what was needed, nothing failed
    assert sorted(t.number for t in trials) == list(range(n_trials))
