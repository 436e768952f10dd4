"""Many workers on one PostgreSQL study: exactly N finished trials, dead workers' trials resumed.

These run real ``autodrop search`` processes against the server named by
AUTODROP_TEST_POSTGRES_URL, each test in a fresh database.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autodrop.run import records
from autodrop.run.study import FINISHED_STATES

from .scaling_helpers import autodrop_env, search_args, start, stop_all, wait_for

pytestmark = pytest.mark.slow


def _load(url: str, name: str = "scale") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def _trials(url: str, name: str = "scale") -> list[optuna.trial.FrozenTrial]:
    try:
        return _load(url, name).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []


def _summary(trials: list[optuna.trial.FrozenTrial]) -> str:
    return json.dumps([
        {"n": t.number, "state": t.state.name, "retry_of": t.system_attrs.get("failed_trial"),
         "resumed_at": t.user_attrs.get(records.RESUMED_AT), "steps": sorted(t.intermediate_values)}
        for t in trials
    ])


def _dashboard_get(storage_url: str, path: str) -> dict:
    """Ask optuna-dashboard's app for ``path`` on the study's storage, without starting a server."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    environ: dict = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(optuna_dashboard.wsgi(storage_url)(environ, lambda s, headers, exc=None: status.append(s)))
    assert status[0].startswith("200"), status
    return json.loads(body)


def test_three_workers_end_with_exactly_n_finished_trials(postgres_url: str, tiny_images: Path,
                                                          tmp_path: Path) -> None:
    n_trials = 8
    log = tmp_path / "workers.log"
    process = start(search_args(tiny_images, postgres_url, trials=n_trials, epochs=2, extra=("--workers", "3")), log)
    try:
        # The report reads the study while the workers write to it.
        wait_for(lambda: any(t.state == TrialState.COMPLETE for t in _trials(postgres_url)), timeout=240,
                 what="a first finished trial")
        from autodrop.outputs.results import load_results

        live = load_results("scale", postgres_url)
        assert 1 <= live.n_finished <= n_trials
        studies = _dashboard_get(postgres_url, "/api/studies")
        assert [s["study_name"] for s in studies["study_summaries"]] == ["scale"]
        assert process.wait(timeout=300) == 0, log.read_text()
    finally:
        stop_all([process])
    trials = _trials(postgres_url)
    finished = [t for t in trials if t.state in FINISHED_STATES]
    assert len(finished) == n_trials, _summary(trials)
    assert len({t.number for t in trials}) == len(trials)
    # Three processes shared the work.
    assert len({t.user_attrs[records.WORKER] for t in finished}) == 3, _summary(trials)
    assert "Stored as study 'scale'" in log.read_text()


def test_killed_worker_trial_is_resumed_by_another_worker(postgres_url: str, tiny_images: Path,
                                                          tmp_path: Path) -> None:
    n_trials, epochs = 6, 4
    args = search_args(tiny_images, postgres_url, trials=n_trials, epochs=epochs,
                       extra=("--checkpoint-dir", str(tmp_path / "checkpoints")))
    # Three separate commands, as on three machines; the first creates the study, the others join.
    workers = [start(args, tmp_path / f"worker{i}.log") for i in range(3)]
    try:
        def victim() -> optuna.trial.FrozenTrial | None:
            for t in _trials(postgres_url):
                # Mid-trial, with a checkpoint on disk: at least one epoch done, at least one to go.
                if t.state == TrialState.RUNNING and 1 <= t.user_attrs.get("epochs_run", 0) < epochs - 1:
                    return t
            return None

        killed = wait_for(victim, timeout=240, what="a trial in the middle of its epochs", step=0.05)
        pid = int(killed.user_attrs[records.WORKER].rsplit(":", 1)[1])
        by_pid = {w.pid: w for w in workers}
        assert pid in by_pid
        by_pid[pid].send_signal(signal.SIGKILL)
        finished_before_kill = {t.number for t in _trials(postgres_url) if t.state in FINISHED_STATES}
        survivors = [w for w in workers if w.pid != pid]
        for worker in survivors:
            assert worker.wait(timeout=300) == 0
    finally:
        stop_all(workers)
    trials = _trials(postgres_url)
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == TrialState.FAIL, _summary(trials)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, _summary(trials)
    retry = retries[0]
    assert retry.state in FINISHED_STATES
    assert retry.params == killed.params
    assert retry.user_attrs[records.RESUMED_AT] > 1  # resumed from its checkpoint, not from scratch
    assert retry.user_attrs[records.WORKER] != killed.user_attrs[records.WORKER]
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))  # every step, each once
    assert not Path(retry.user_attrs[records.CHECKPOINT]).exists()  # cleaned up once finished
    finished = {t.number for t in trials if t.state in FINISHED_STATES}
    assert len(finished) == n_trials, _summary(trials)
    assert finished_before_kill <= finished  # no finished trial lost
    print(f"\nkill test (PostgreSQL): 1 kill, trial {killed.number} killed after epoch "
          f"{killed.user_attrs['epochs_run']}, retried as trial {retry.number} resuming at epoch "
          f"{retry.user_attrs[records.RESUMED_AT]}; {len(finished)} finished, "
          f"{sum(t.state == TrialState.FAIL for t in trials)} failed, 0 lost")


def test_many_workers_racing_to_start_on_a_new_study_all_succeed(postgres_url: str, tiny_images: Path,
                                                                 tmp_path: Path) -> None:
    n_trials = 3
    args = search_args(tiny_images, postgres_url, trials=n_trials, epochs=1)
    processes = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=autodrop_env(), cwd=tmp_path)
        for _ in range(5)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0].decode() for p in processes]
    finally:
        stop_all(processes)
    assert [p.returncode for p in processes] == [0] * 5, "\n".join(outputs)
    assert optuna.get_all_study_names(postgres_url) == ["scale"]
    trials = _trials(postgres_url)
    assert len(trials) == n_trials, _summary(trials)
    assert all(t.state in FINISHED_STATES for t in trials)
    # The baselines were queued once, whoever got there first.
    assert sorted(t.user_attrs["baseline"] for t in trials) == ["everywhere-low", "head", "none"]


def test_killed_packed_workers_members_are_retried_by_another_worker(postgres_url: str, tiny_images: Path,
                                                                     tmp_path: Path) -> None:
    n_trials, epochs = 8, 4
    args = search_args(tiny_images, postgres_url, trials=n_trials, epochs=epochs, extra=("--pack", "2"))
    workers = [start(args, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        def victims() -> list[optuna.trial.FrozenTrial]:
            running = [t for t in _trials(postgres_url)
                       if t.state == TrialState.RUNNING and 1 <= t.user_attrs.get("epochs_run", 0) < epochs - 1]
            by_worker: dict[str, list] = {}
            for t in running:
                by_worker.setdefault(t.user_attrs[records.WORKER], []).append(t)
            return next((pack for pack in by_worker.values() if len(pack) == 2), [])

        killed = wait_for(victims, timeout=240, what="a pack of two in the middle of its epochs", step=0.05)
        pid = int(killed[0].user_attrs[records.WORKER].rsplit(":", 1)[1])
        by_pid = {w.pid: w for w in workers}
        by_pid[pid].send_signal(signal.SIGKILL)
        finished_before_kill = {t.number for t in _trials(postgres_url) if t.state in FINISHED_STATES}
        survivor = next(w for w in workers if w.pid != pid)
        assert survivor.wait(timeout=400) == 0, (tmp_path / "worker0.log").read_text()[-2000:]
    finally:
        stop_all(workers)
    trials = _trials(postgres_url)
    finished = {t.number for t in trials if t.state in FINISHED_STATES}
    assert len(finished) == n_trials, _summary(trials)
    assert finished_before_kill <= finished
    assert not [t for t in trials if t.state == TrialState.RUNNING], _summary(trials)
    for member in killed:
        assert {t.number: t for t in trials}[member.number].state == TrialState.FAIL
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == member.number)
        assert retry.state in FINISHED_STATES and retry.params == member.params
        assert retry.user_attrs[records.WORKER] != member.user_attrs[records.WORKER]
        if retry.state == TrialState.COMPLETE:  # packed members start again from their first epoch
            assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))
    print(f"\npacked kill test (PostgreSQL): trials {[t.number for t in killed]} killed together, both retried "
          f"by the other worker; {len(finished)} finished, 0 lost")
