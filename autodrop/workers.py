"""Many workers, one study: admitting trials, heartbeats, stopping on signals, worker processes.

Every worker runs the same loop against the shared storage. A trial is admitted under the study's
lock (autodrop/locking.py) only while finished + running trials fall short of the target, so the
study ends with exactly that many finished trials however many workers race. Each running trial
beats a heartbeat; a worker that stops beating is taken for dead, its trial failed and re-queued
with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback), and a live worker resumes it.

Ctrl-C or SIGTERM stops a worker cleanly: the running trial is failed with a reason and re-queued
(its checkpoint lets the next run resume it), or finished first if it is in its last epoch.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autodrop.locking import StorageLock
from autodrop.study import FINISHED_STATES, PACKED_ATTR

_logger = logging.getLogger("autodrop")

FAIL_REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"  # user attribute: host and process id of the worker running the trial
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


class _StopGuard:
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


_ACTIVE: _StopGuard | None = None


@contextmanager
def critical() -> Iterator[None]:
    """Defer a stop signal to the end of this block (for writes that must not be cut in half)."""
    if _ACTIVE is None:
        yield
    else:
        with _ACTIVE.critical():
            yield


def entering_last_epoch() -> None:
    """Tell the run loop that the running trial has started its last epoch: a first stop signal
    lets it finish instead of failing it."""
    if _ACTIVE is not None:
        _ACTIVE.finishing = True


@contextmanager
def handle_stop_signals() -> Iterator[_StopGuard]:
    global _ACTIVE
    guard = _StopGuard()
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
            for trial_id in list(self._trial_ids()):
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
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    lock: StorageLock,
    timeout: float | None = None,
    catch: tuple[type[Exception], ...] = (),
    after_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    keep_going: Callable[[], bool] | None = None,
    on_wait: Callable[[int], None] | None = None,
    parent_pid: int | None = None,
) -> None:
    """Run trials of ``study`` until it has ``n_trials`` finished ones, shared with other workers.

    Returns early when ``timeout`` seconds have passed (no new trial starts), when ``keep_going``
    says no, or when the process that started this worker (``parent_pid``) is gone. While the
    trials still needed are all running elsewhere it waits, calling ``on_wait(n_running)``: one of
    them may yet fail and be retried here. Raises Interrupted on SIGINT or SIGTERM.
    """
    may_start = StartRule(timeout, keep_going, parent_pid)
    poll_s = poll_interval(storage)
    study_id = storage.get_study_id_from_name(study.study_name)
    with handle_stop_signals() as guard:
        while True:
            if guard.requested is not None:
                raise Interrupted(guard.requested)
            if not may_start():
                return
            with guard.critical():
                admitted, n_finished, n_running = admit_trials(study, storage, study_id, lock, n_trials, limit=1)
            if n_finished >= n_trials:
                return
            trial = admitted[0] if admitted else None
            if trial is None:
                if on_wait is not None:
                    on_wait(n_running)
                guard.wakeup.wait(poll_s)
                continue
            frozen = _run_one(study, storage, trial, objective, guard, lock, catch)
            if frozen is not None and after_trial is not None:
                after_trial(study, frozen)


def _run_one(
    study: optuna.Study,
    storage: Any,
    trial: optuna.Trial,
    objective: Callable[[optuna.Trial], float],
    guard: _StopGuard,
    lock: StorageLock,
    catch: tuple[type[Exception], ...],
) -> FrozenTrial | None:
    """Run one admitted trial and tell its outcome; returns the finished trial, or None if interrupted."""
    value: float | None = None
    error: BaseException | None = None
    claim_trial(trial)
    with Heartbeat(storage, lambda: [trial._trial_id]):
        guard.finishing = False
        try:
            guard.in_trial = True
            try:
                guard.raise_if_stopping()
                value = objective(trial)
            finally:
                guard.in_trial = False
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Interrupted as e:
            state, error = TrialState.FAIL, e
        except KeyboardInterrupt:  # no handler here (not the main thread): Ctrl-C came as usual
            state, error = TrialState.FAIL, Interrupted(signal.SIGINT)
        except Exception as e:
            state, error = TrialState.FAIL, e
            if isinstance(e, catch):
                _logger.warning("trial %d failed: %s", trial.number, e)
    if isinstance(error, Interrupted):
        with guard.critical(), lock.hold():
            fail_and_requeue(study, storage, trial, f"interrupted by {error.signal_name}")
        raise error
    with guard.critical():
        frozen = tell_trial(study, storage, trial, value, state, error, catch)
    if frozen is None:  # given up for stale while it ran: its retry replaces it (tell_trial raised otherwise)
        return None
    if error is not None and not isinstance(error, catch):
        raise error
    return frozen


def claim_trial(trial: optuna.Trial, *, packed: bool = False) -> None:
    """Mark ``trial`` as this worker's before it trains, and whether it trains in a pack."""
    # A retry inherits its predecessor's attributes: why that one failed, and whether it was packed.
    if trial.user_attrs.get(FAIL_REASON_ATTR) is not None:
        trial.set_user_attr(FAIL_REASON_ATTR, None)
    if packed or trial.user_attrs.get(PACKED_ATTR):
        trial.set_user_attr(PACKED_ATTR, packed)
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")


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
        if state == TrialState.FAIL and error is not None and trial.user_attrs.get(FAIL_REASON_ATTR) is None:
            trial.set_user_attr(FAIL_REASON_ATTR, f"{type(error).__name__}: {error}")
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


def fail_and_requeue(study: optuna.Study, storage: Any, trial: optuna.Trial, reason: str) -> None:
    """Fail ``trial`` with ``reason`` and queue a retry with its parameters, as for a dead worker."""
    if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return  # another worker took this one for dead already, and queued its retry
    trial.set_user_attr(FAIL_REASON_ATTR, reason)
    frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    retry = storage.get_heartbeat_stale_trial_callback() if hasattr(storage, "get_heartbeat_stale_trial_callback") else None
    if retry is not None:
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
    if lock.kind == "none":
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
