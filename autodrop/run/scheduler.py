"""Many workers, one study: the one loop every worker runs, whatever it trains.

A worker admits trials under the study's lock (autodrop/run/locking.py) only while finished +
running trials fall short of the target, so the study ends with exactly that many finished trials
however many workers race. It trains what it admitted an epoch (a step) at a time through a
:class:`TrialRunner`: one trial at a time, or a pack of several; a trial that ends (complete,
pruned, failed) is told at once and its place goes to the next admitted trial. Each running trial
beats a heartbeat; a worker that stops beating is taken for dead, its trials failed and queued
again with the same parameters (Optuna's retry callback), and a live worker picks them up.

Ctrl-C or SIGTERM stops a worker cleanly (autodrop/run/signals.py): its running trials are failed
with the reason and queued again, or finished first when they are all in their last step.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autodrop.run.locking import StorageLock
from autodrop.run.records import FAIL_REASON, PACKED, WORKER
from autodrop.run.signals import Interrupted, StopGuard, critical, handle_stop_signals
from autodrop.run.storage import RetryStaleTrial, is_transient
from autodrop.run.study import FINISHED_STATES

_logger = logging.getLogger("autodrop")


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: its state, its value if it completed, and the error if it failed."""

    state: TrialState
    value: float | None = None
    error: BaseException | None = None


class TrialRunner(ABC):
    """The trials one worker trains, advanced together a step (an epoch) at a time.

    The scheduler admits trials and calls :meth:`start` for each, then :meth:`step` to train every
    running trial one step, then :meth:`record` for each trial's step; a trial for which
    ``start`` or ``record`` returns an :class:`Outcome` has ended and leaves the runner.
    """

    capacity: int = 1  # trials trained at once
    packed: bool = False  # the trials train as one pack (recorded on each: a packed trial keeps no checkpoint)
    catch: tuple[type[Exception], ...] = ()  # errors that fail one trial and let the worker go on

    @abstractmethod
    def running(self) -> list[optuna.Trial]:
        """The trials training now."""

    @abstractmethod
    def start(self, trial: optuna.Trial) -> Outcome | None:
        """Set up a newly admitted trial; an Outcome if it ended already (a retry that had finished)."""

    @abstractmethod
    def in_last_step(self) -> bool:
        """Whether every running trial is about to train its last step (a first stop signal lets them finish)."""

    @abstractmethod
    def step(self) -> list[tuple[optuna.Trial, Any]]:
        """Train every running trial one step; return each trial with what its step gave."""

    @abstractmethod
    def record(self, trial: optuna.Trial, result: Any) -> Outcome | None:
        """Put ``trial``'s step on record; an Outcome if the trial ends here."""

    @abstractmethod
    def forget(self, trial: optuna.Trial) -> None:
        """Drop ``trial`` (it failed, or was queued again, outside :meth:`record`)."""

    def after(self, trial: FrozenTrial) -> None:
        """Hear that ``trial`` was told how it ended (the study has its final state)."""

    def keep_going(self) -> bool:
        """Whether new trials may start (False after too many failures in a row)."""
        return True


class Heartbeat:
    """Records the heartbeats of the running trials every interval from a thread.

    ``trial_ids`` is called at each beat, so a pack of trials whose members change between epochs
    beats for exactly the trials it holds.
    """

    def __init__(self, storage: Any, trial_ids: Callable[[], Sequence[int]]) -> None:
        self._storage = storage
        self._trial_ids = trial_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="autodrop-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = self._storage.get_heartbeat_interval()
        while not self._stop.wait(interval):
            try:
                trial_ids = list(self._trial_ids())
            except Exception as e:  # the trials changed under us: beat for them at the next interval
                _logger.debug("heartbeat: the running trials could not be read: %s", e)
                continue
            for trial_id in trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as e:  # a database hiccup: keep beating, the next one may get through
                    _logger.warning("heartbeat of trial id %s not recorded: %s", trial_id, e)


class StartRule:
    """Whether a worker may start another trial: not after ``timeout`` seconds from now, not once
    ``keep_going`` says no, not once the process that started it (``parent_pid``) is gone."""

    def __init__(self, timeout: float | None, keep_going: Callable[[], bool] | None, parent_pid: int | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.keep_going = keep_going
        self.parent_pid = parent_pid
        self.orphaned = False

    def __call__(self) -> bool:
        if self.keep_going is not None and not self.keep_going():
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            if not self.orphaned:
                _logger.warning("the process that started this worker is gone: no new trials")
            self.orphaned = True
            return False
        return True


def poll_interval(storage: Any) -> float:
    """Seconds between looks at the study while the trials still needed run elsewhere."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    return 1.0 if interval is None else max(0.2, min(2.0, interval / 2))


def run_trials(
    study: optuna.Study,
    storage: Any,
    runner: TrialRunner,
    *,
    n_trials: int,
    lock: StorageLock,
    timeout: float | None = None,
    on_wait: Callable[[int], None] | None = None,
    parent_pid: int | None = None,
) -> None:
    """Train trials of ``study`` through ``runner`` until it has ``n_trials`` finished ones, shared
    with other workers.

    Stops starting trials after ``timeout`` seconds, when ``runner.keep_going()`` says no, or when
    the process that started this worker (``parent_pid``) is gone; trials already running finish.
    While the trials still needed all run elsewhere it waits, calling ``on_wait(n_running)``: one
    of them may yet fail and be retried here. Raises Interrupted on SIGINT or SIGTERM, after
    queueing its running trials again.
    """
    may_start = StartRule(timeout, runner.keep_going, parent_pid)
    poll_s = poll_interval(storage)
    with handle_stop_signals() as guard, Heartbeat(storage, lambda: [t._trial_id for t in runner.running()]):
        worker = _Worker(study, storage, runner, lock, guard)
        try:
            while True:
                if guard.requested is not None:
                    # A first stop signal lets trials that are all about to train their last step
                    # finish; nothing new starts.
                    if not (runner.running() and runner.in_last_step() and guard.n_signals == 1):
                        raise Interrupted(guard.requested)
                    worker.train_and_record()
                    continue
                starting = may_start()
                n_finished, n_running, n_ended = worker.admit(n_trials) if starting else (0, 0, 0)
                if runner.running():
                    worker.train_and_record()
                elif not starting or n_finished >= n_trials:
                    return
                elif n_ended == 0:  # (a trial that ended as it started frees its place at once)
                    if on_wait is not None:
                        on_wait(n_running)  # the trials still needed run elsewhere
                    guard.wakeup.wait(poll_s)
        except BaseException as e:
            worker.requeue_running(e)
            raise


class _Worker:
    """One pass of the loop at a time: admit trials, train a step, put each trial's step on record."""

    def __init__(self, study: optuna.Study, storage: Any, runner: TrialRunner, lock: StorageLock,
                 guard: StopGuard) -> None:
        self.study, self.storage, self.runner, self.lock, self.guard = study, storage, runner, lock, guard
        self.study_id = storage.get_study_id_from_name(study.study_name)

    def end(self, trial: optuna.Trial, outcome: Outcome, *, catch: tuple[type[Exception], ...] | None = None) -> None:
        """Tell the study how ``trial`` ended, and the runner that it was told."""
        catch = self.runner.catch if catch is None else catch
        if isinstance(outcome.error, self.runner.catch):
            _logger.warning("trial %d failed: %s", trial.number, outcome.error)
        try:
            frozen = tell_trial(self.study, self.storage, trial, outcome.value, outcome.state, outcome.error, catch)
        except Exception as e:
            if not is_transient(e):
                raise
            # A locked database or a dropped connection while telling: the trial's work is not
            # lost (a lone trial's checkpoint holds its last epoch, and its retry only has to be
            # told), and it is no fault of the trial, so its retries are not used up.
            _logger.warning("trial %d is queued again: telling how it ended hit a storage error: %s", trial.number, e)
            self.runner.forget(trial)
            with self.lock.hold():
                fail_and_requeue(self.study, self.storage, trial, f"storage error: {type(e).__name__}", counted=False)
            return
        if frozen is not None:
            self.runner.after(frozen)

    def admit(self, n_trials: int) -> tuple[int, int, int]:
        """Admit and set up trials for the runner's free places; return the finished and running
        counts seen (0, 0 when it had no free place) and how many admitted trials ended at once."""
        free = self.runner.capacity - len(self.runner.running())
        if free <= 0:
            return 0, 0, 0
        n_ended = 0
        with self.guard.critical():
            started, n_finished, n_running = admit_trials(self.study, self.storage, self.study_id, self.lock,
                                                          n_trials, limit=free)
            for trial in started:
                claim_trial(trial, packed=self.runner.packed)
            for i, trial in enumerate(started):
                try:
                    outcome = self.runner.start(trial)
                except Exception as e:
                    # This one fails; the others admitted with it go back to the queue first (the
                    # running ones are queued by run_trials's handler).
                    with self.lock.hold():
                        for other in started[i + 1 :]:
                            fail_and_requeue(self.study, self.storage, other,
                                             f"its pack stopped on {type(e).__name__}: {e}")
                    self.end(trial, Outcome(TrialState.FAIL, error=e), catch=(Exception,))
                    raise
                if outcome is not None:
                    self.end(trial, outcome)
                    n_ended += 1
        return n_finished, n_running, n_ended

    def train_and_record(self) -> None:
        """Train every running trial one step, then put each one's step on record."""
        guard, runner = self.guard, self.runner
        # A first stop signal lets trials that are all in their last step finish.
        guard.finishing = runner.in_last_step()
        guard.in_trial = True
        try:
            guard.raise_if_stopping()
            results = runner.step()
        except Exception as e:
            if runner.packed:
                raise  # trained together: run_trials's handler queues every member again
            (trial,) = runner.running()  # a lone trial's error is its own
            runner.forget(trial)
            with guard.critical():
                self.end(trial, Outcome(TrialState.FAIL, error=e))
            if not _caught(e, runner):
                raise
            return
        finally:
            guard.in_trial = False
        for trial, result in results:
            with guard.critical():
                try:
                    outcome = runner.record(trial, result)
                except Exception as e:
                    if runner.packed:
                        raise  # the pack's members go back to the queue together, as above
                    runner.forget(trial)
                    if is_transient(e):
                        # A locked database or a dropped connection is no fault of the trial: it is
                        # queued again (its retries are bounded), and this worker goes on.
                        _logger.warning("trial %d is queued again after a storage error: %s", trial.number, e)
                        with self.lock.hold():
                            fail_and_requeue(self.study, self.storage, trial, f"storage error: {type(e).__name__}")
                        continue
                    outcome = Outcome(TrialState.FAIL, error=e)
                if outcome is not None:
                    self.end(trial, outcome)
            if outcome is not None and outcome.error is not None and not _caught(outcome.error, runner):
                raise outcome.error

    def requeue_running(self, error: BaseException) -> None:
        """Queue the running trials again when the loop stops on ``error``, with the reason: a stop
        signal, or an error that cannot be pinned on one of them (a trial admitted beside them that
        could not be set up, a failure of the pack they train in)."""
        running = self.runner.running()
        if not running:
            return
        stop = error if isinstance(error, Interrupted) else (
            Interrupted(signal.SIGINT) if isinstance(error, KeyboardInterrupt) else None
        )
        reason = f"interrupted by {stop.signal_name}" if stop is not None else (
            f"its pack stopped on {type(error).__name__}: {error}"
        )
        with critical(), self.lock.hold():
            for trial in running:
                self.runner.forget(trial)
                fail_and_requeue(self.study, self.storage, trial, reason, counted=stop is None)
        if stop is not None and stop is not error:
            raise stop from error


def _caught(error: BaseException, runner: TrialRunner) -> bool:
    return isinstance(error, (optuna.exceptions.UpdateFinishedTrialError, *runner.catch))


def claim_trial(trial: optuna.Trial, *, packed: bool = False) -> None:
    """Mark ``trial`` as this worker's before it trains, and whether it trains in a pack."""
    # A retry inherits its predecessor's attributes: why that one failed, and whether it was packed.
    if trial.user_attrs.get(FAIL_REASON) is not None:
        trial.set_user_attr(FAIL_REASON, None)
    if packed or trial.user_attrs.get(PACKED):
        trial.set_user_attr(PACKED, packed)
    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")


def tell_trial(
    study: optuna.Study,
    storage: Any,
    trial: optuna.Trial,
    value: float | None,
    state: TrialState,
    error: BaseException | None = None,
    catch: tuple[type[Exception], ...] = (),
) -> FrozenTrial | None:
    """Tell the study how ``trial`` ended; returns the finished trial, or None if it was no longer
    this worker's (taken for dead while it ran, and replaced by a retry)."""

    def given_up() -> None:
        # Another worker took this one for dead (its heartbeats came too late) and queued a
        # retry, which now owns the trial's parameters and checkpoint. Writing to the trial
        # since then raised UpdateFinishedTrialError: not this worker's fault, so go on.
        _logger.warning("trial %d was given up for stale while it ran; its retry replaces it", trial.number)
        if error is not None and not isinstance(error, (optuna.exceptions.UpdateFinishedTrialError, *catch)):
            raise error
        return None

    if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return given_up()
    try:
        if state == TrialState.FAIL and error is not None and trial.user_attrs.get(FAIL_REASON) is None:
            trial.set_user_attr(FAIL_REASON, f"{type(error).__name__}: {error}")
        return study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # the same, between the check and the write
        return given_up()


def admit_trials(
    study: optuna.Study, storage: Any, study_id: int, lock: StorageLock, n_trials: int, *, limit: int
) -> tuple[list[optuna.Trial], int, int]:
    """Start up to ``limit`` trials while finished + running ones fall short of ``n_trials``.

    Runs under the study's lock, after failing (and re-queueing) the trials of dead workers.
    Returns the started trials and the finished and running counts before they started.
    """
    with lock.hold():
        _fail_dead_trials(study, storage, study_id, lock)
        n_finished, n_running = _count_trials(study)
        started: list[optuna.Trial] = []
        while len(started) < limit and n_finished + n_running + len(started) < n_trials:
            with warnings.catch_warnings():
                # Optuna assumes heartbeats come from Study.optimize; this loop beats itself.
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                trial = study.ask()
            # Beat once while holding the lock: a RUNNING trial without any heartbeat
            # can then only be one whose worker died right here (see _fail_dead_trials).
            storage.record_heartbeat(trial._trial_id)
            started.append(trial)
    return started, n_finished, n_running


def fail_and_requeue(study: optuna.Study, storage: Any, trial: optuna.Trial, reason: str, *,
                     counted: bool = True) -> None:
    """Fail ``trial`` with ``reason`` and queue a retry with its parameters, as for a dead worker;
    ``counted=False`` (a clean stop) does not use up the trial's retries."""
    if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return  # another worker took this one for dead already, and queued its retry
    trial.set_user_attr(FAIL_REASON, reason)
    frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    retry = storage.get_heartbeat_stale_trial_callback() if hasattr(storage, "get_heartbeat_stale_trial_callback") else None
    if isinstance(retry, RetryStaleTrial):
        retry(study, copy.deepcopy(frozen), counted=counted)
    elif retry is not None:
        retry(study, copy.deepcopy(frozen))


def _count_trials(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
    n_running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - n_running, n_running


def _fail_dead_trials(study: optuna.Study, storage: Any, study_id: int, lock: StorageLock) -> None:
    """Fail (and queue retries of) trials whose worker died; call with the study's lock held."""
    if not hasattr(storage, "get_heartbeat_interval") or storage.get_heartbeat_interval() is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if lock.mechanism == "none":
        return
    # Optuna never takes a trial without any heartbeat for stale. Every worker beats once before
    # it lets go of the lock, so under the lock such a trial was left by a worker that died
    # between admitting it and that first beat: it would stay RUNNING, and block the study, forever.
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in _running_without_heartbeat(storage, study_id):
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def _running_without_heartbeat(storage: Any, study_id: int) -> list[int]:
    import sqlalchemy

    # Optuna's own schema (tables trials and trial_heartbeats); read-only.
    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t WHERE t.study_id = :study_id AND t.state = 'RUNNING' "
        "AND NOT EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)"
    )
    try:
        with storage.engine.connect() as connection:
            return [row[0] for row in connection.execute(query, {"study_id": study_id})]
    except Exception as e:  # a schema autodrop does not know: skip this check, never the search
        _logger.debug("cannot look for trials without heartbeat: %s", e)
        return []
