"""One machine, an SQLite file: kill and rerun, Ctrl-C and resume, --workers with SIGTERM."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from autodrop.cli import main
from autodrop.run import records
from autodrop.run.study import FINISHED_STATES

from .scaling_helpers import run_to_end, search_args, start, stop_all, wait_for


def _trials(url: str, name: str = "scale") -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except KeyError:
        return []


def _finished(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    return {t.number for t in trials if t.state in FINISHED_STATES}


def test_create_only_queues_the_baselines_and_runs_nothing(tiny_images: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    result = CliRunner().invoke(main, ["search", "--data", str(tiny_images), "--image-size", "16", "--trials", "5",
                                       "--storage", url, "--study", "scale", "--create-only"])
    assert result.exit_code == 0, result.output
    assert "Study 'scale' is ready" in result.output
    trials = _trials(url)
    assert [t.state for t in trials] == [TrialState.WAITING] * 4
    # Settings, data facts and sites are stored, so workers started later only check and join.
    assert {"autodrop.config", "autodrop.data", "autodrop.sites"} <= set(
        optuna.load_study(study_name="scale", storage=url).user_attrs
    )


def test_workers_need_a_storage_other_processes_can_open(tiny_images: Path) -> None:
    result = CliRunner().invoke(main, ["search", "--data", str(tiny_images), "--workers", "2", "--storage", "sqlite://"])
    assert result.exit_code == 2
    assert "--workers 2 needs a storage every process can open" in result.output


@pytest.mark.slow
def test_killed_and_rerun_search_ends_with_exactly_n_finished_trials(tiny_images: Path, tmp_path: Path) -> None:
    n_trials, epochs, n_kills = 6, 3, 3
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    args = search_args(tiny_images, url, trials=n_trials, epochs=epochs)
    rng = random.Random(2)
    log = tmp_path / "runs.log"
    finished_before: set[int] = set()
    processes = []
    try:
        for _ in range(n_kills):
            process = start(args, log)
            processes.append(process)
            # A random point of this run's first trial: after 0 to epochs-1 finished epochs, plus up to 1 s.
            mine, after_epochs = f":{process.pid}", rng.randint(0, epochs - 1)
            wait_for(lambda: process.poll() is not None or any(
                t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(mine)
                and t.user_attrs.get("epochs_run", 0) >= after_epochs for t in _trials(url)
            ), timeout=240, what="the rerun to start a trial", step=0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
            finished_before |= _finished(_trials(url))
        final = start(args, log)
        processes.append(final)
        assert final.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        stop_all(processes)
    trials = _trials(url)
    finished = _finished(trials)
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    resumed = [t for t in retries if t.user_attrs.get(records.RESUMED_AT, 1) > 1]
    print(f"\nkill-and-rerun (SQLite): {n_kills} kills, {len(retries)} retries "
          f"({len(resumed)} resumed from a checkpoint), {len(finished)} finished, "
          f"{sum(t.state == TrialState.FAIL for t in trials)} failed, {len(finished_before - finished)} lost")
    assert len(finished) == n_trials
    assert finished_before <= finished  # no finished trial lost
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in retries:  # each retry has its predecessor's parameters and every step once
        # (a kill while the trial was still choosing its parameters leaves only the first few)
        assert trials[t.system_attrs["failed_trial"]].params.items() <= t.params.items()
        if t.state in FINISHED_STATES:
            assert sorted(t.intermediate_values) == list(range(1, epochs + 1))


@pytest.mark.slow
def test_ctrl_c_fails_the_running_trial_and_the_same_command_resumes_it(tiny_images: Path, tmp_path: Path) -> None:
    n_trials, epochs = 3, 20  # many short epochs: the stop lands well before the last one, even on a busy box
    url = f"sqlite:///{tmp_path / 'int.db'}"
    args = search_args(tiny_images, url, trials=n_trials, epochs=epochs)
    log = tmp_path / "run.log"
    process = start(args, log)
    try:
        running = wait_for(
            lambda: next((t for t in _trials(url) if t.state == TrialState.RUNNING
                          and t.user_attrs.get("epochs_run", 0) >= 2), None),
            timeout=240, what="a trial two epochs in", step=0.05,
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        stop_all([process])
    assert "Interrupted" in log.read_text()
    trials = _trials(url)
    stopped = trials[running.number]
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs[records.FAIL_REASON] == "interrupted by SIGINT"
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # the storage is consistent
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == stopped.number)
    assert retry.state == TrialState.WAITING

    run_to_end(args, log, timeout=300)
    trials = _trials(url)
    retry = trials[retry.number]
    assert retry.state in FINISHED_STATES
    assert retry.user_attrs[records.RESUMED_AT] >= 3  # after the two (or more) epochs already done
    assert retry.user_attrs[records.FAIL_REASON] is None
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    assert len(_finished(trials)) == n_trials


@pytest.mark.slow
def test_sigterm_stops_local_workers_cleanly_and_a_rerun_finishes(tiny_images: Path, tmp_path: Path) -> None:
    n_trials, epochs = 6, 4
    url = f"sqlite:///{tmp_path / 'term.db'}"
    args = search_args(tiny_images, url, trials=n_trials, epochs=epochs, extra=("--workers", "2"))
    log = tmp_path / "run.log"
    process = start(args, log)
    try:
        wait_for(lambda: sum(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1
                             for t in _trials(url)) >= 1, timeout=240, what="workers training", step=0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        stop_all([process])
    trials = _trials(url)
    assert not [t for t in trials if t.state == TrialState.RUNNING], [(t.number, t.state) for t in trials]
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs[records.FAIL_REASON] == "interrupted by SIGTERM"
    finished_before = _finished(trials)

    run_to_end(args, log, timeout=400)
    trials = _trials(url)
    assert len(_finished(trials)) == n_trials
    assert finished_before <= _finished(trials)
    assert len({t.user_attrs["worker"] for t in trials if t.state in FINISHED_STATES}) >= 2


@pytest.mark.slow
def test_ctrl_c_requeues_every_member_of_a_pack_and_a_rerun_finishes(tiny_images: Path, tmp_path: Path) -> None:
    n_trials, epochs = 5, 12  # the stop must land before the pack's last epoch, even on a busy box
    url = f"sqlite:///{tmp_path / 'pack.db'}"
    args = search_args(tiny_images, url, trials=n_trials, epochs=epochs, extra=("--pack", "3"))
    log = tmp_path / "run.log"
    process = start(args, log)
    try:
        wait_for(lambda: sum(t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1
                             for t in _trials(url)) == 3, timeout=240, what="a pack of three training", step=0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        stop_all([process])
    trials = _trials(url)
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(t.user_attrs[records.FAIL_REASON] == "interrupted by SIGINT" for t in stopped)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") in {s.number for s in stopped}]
    assert len(retries) == 3 and all(t.state == TrialState.WAITING for t in retries)

    run_to_end(args, log, timeout=300)
    trials = _trials(url)
    assert len(_finished(trials)) == n_trials
    assert all(trials[t.number].state in FINISHED_STATES for t in retries)
    assert all(sorted(trials[t.number].intermediate_values) == list(range(1, epochs + 1)) for t in retries)


@pytest.mark.slow
def test_workers_each_train_a_pack_and_share_exactly_n_trials(tiny_images: Path, tmp_path: Path) -> None:
    n_trials, epochs = 8, 2
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    log = tmp_path / "run.log"
    process = start(search_args(tiny_images, url, trials=n_trials, epochs=epochs,
                                extra=("--workers", "2", "--pack", "2")), log)
    try:
        # Both workers hold a pack of two at once.
        wait_for(lambda: len({t.user_attrs.get("worker") for t in _trials(url) if t.state == TrialState.RUNNING}) == 2
                 and sum(t.state == TrialState.RUNNING for t in _trials(url)) == 4,
                 timeout=240, what="two workers with two members each", step=0.05)
        assert process.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        stop_all([process])
    trials = _trials(url)
    assert len(trials) == n_trials and len(_finished(trials)) == n_trials
    assert len({t.user_attrs["worker"] for t in trials}) == 2
