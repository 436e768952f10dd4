"""Opening a study's storage: the URL checked once, heartbeats set up, the study found by name."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import optuna

from autodrop.config import SearchConfig, sqlite_file, storage_dialect
from autodrop.errors import ConfigError, StorageError
from autodrop.run.records import PACKED

# A worker that stops beating for this long is taken for dead and its trial retried. Tests (and
# impatient users on one machine) shorten both through these environment variables.
HEARTBEAT_INTERVAL_S = 15
GRACE_PERIOD_S = 60
HEARTBEAT_ENV = "AUTODROP_HEARTBEAT_INTERVAL"
GRACE_ENV = "AUTODROP_GRACE_PERIOD"
# How often a trial whose worker died may be re-run with the same parameters before it is given up
# (stops on a signal do not count).
MAX_RETRY = 2
STOPS_ATTR = "autodrop:stopped"  # system attribute: the attempts of a trial that a signal stopped


def heartbeat_settings() -> tuple[int, int]:
    """Return (heartbeat interval, grace period) in seconds, from the environment or the defaults."""
    interval = _seconds_from_env(HEARTBEAT_ENV, HEARTBEAT_INTERVAL_S)
    grace = _seconds_from_env(GRACE_ENV, GRACE_PERIOD_S)
    if grace <= interval:
        raise ConfigError(
            f"{GRACE_ENV} must be longer than {HEARTBEAT_ENV}, but got {grace} and {interval} seconds: a live "
            "worker would be taken for dead between two heartbeats."
        )
    return interval, grace


def _seconds_from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"environment variable {name} must be a whole number of seconds >= 1, but got {text!r}.")
    return value


class RetryStaleTrial:
    """Queues a failed trial again with its parameters and user attributes, as Optuna's
    RetryHeartbeatStaleTrialCallback does (the same ``failed_trial`` and ``retry_history`` system
    attributes), at most ``max_retry`` times.

    Only failures count against that budget: a clean stop on a signal (a preempted worker, Ctrl-C)
    queues the trial again whatever the count (``counted=False``), so a long trial stopped many
    times still finishes. A lone trial's retry inherits the steps already reported and resumes
    after them from its checkpoint; a packed member (user attribute ``packed``) keeps no checkpoint
    and starts over, so its retry inherits no steps.
    """

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, *, counted: bool = True) -> bool:
        """Queue ``trial`` again; return whether it was (False: its failures used up the budget)."""
        attrs = trial.system_attrs
        earlier = earlier_trials(attrs.get("retry_history"), trial.number)
        history = [*earlier, trial.number]
        # Each stop is one earlier attempt, listed once: repeats or strangers never stretch the budget.
        stops = sorted(set(earlier_trials(attrs.get(STOPS_ATTR), trial.number)) & set(earlier))
        stops += [] if counted else [trial.number]
        if len(history) - len(stops) > self.max_retry:
            return False
        first = attrs.get("failed_trial")
        first = first if earlier_trials([first], trial.number) == [first] else trial.number
        system_attrs = {**attrs, "failed_trial": first, "retry_history": history, STOPS_ATTR: stops}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=trial.user_attrs, system_attrs=system_attrs,
            intermediate_values=None if trial.user_attrs.get(PACKED) else trial.intermediate_values,
        ))
        return True


# The most earlier attempts a retry record may list; a trial retried this often has long been given up.
MAX_RECORDED_ATTEMPTS = 1000


def earlier_trials(value: Any, number: int) -> list[int]:
    """Return ``value``, a stored list of earlier attempts of trial ``number`` (``retry_history``,
    the stopped ones), if it is one: trial numbers below ``number``, at most MAX_RECORDED_ATTEMPTS
    of them. Anything else, which autodrop and Optuna never write, counts as no earlier attempt."""
    if not (isinstance(value, list) and len(value) <= MAX_RECORDED_ATTEMPTS and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < number for n in value)):
        return []
    return list(value)


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Return the storage at ``url``, or raise StorageError saying why it cannot be reached.

    With ``must_exist`` (the commands that only read: report, export, dashboard) an SQLite file
    that is not there is an error rather than a new empty database left behind.
    """
    if must_exist:
        _require_sqlite_file(url)
    path = sqlite_file(url)
    if path is not None:
        if not path.parent.exists():
            raise StorageError(f"cannot create the study file {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    heartbeat_interval, grace_period = heartbeat_settings()
    engine_kwargs: dict[str, Any] = {}
    if storage_dialect(url) == "sqlite":
        # Several local workers and the heartbeat thread write to one file: wait for the lock.
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif storage_dialect(url) == "postgresql":
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryStaleTrial(MAX_RETRY),
            )
    except ImportError as e:
        raise StorageError(f"storage {safe_url(url)!r} needs a database driver that is not installed: {e}.") from e
    except Exception as e:  # SQLAlchemy raises a different type per dialect and failure
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open storage {safe_url(url)!r}: {reason}") from e


def _require_sqlite_file(url: str) -> None:
    database = sqlite_file(url)
    if database is not None and not database.is_file():
        raise StorageError(
            f"storage {url!r} names the SQLite file {str(database)!r}, which does not exist; run "
            "autodrop search first, or pass the --storage that the search used."
        )


def safe_url(url: str) -> str:
    """Return ``url`` with any password hidden, for messages and pages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Return the existing study ``name``, or raise StorageError listing the studies there."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        listing = ", ".join(names) if names else "none"
        raise StorageError(f"no study named {name!r} in this storage; studies there: {listing}.")
    return optuna.load_study(study_name=name, storage=storage)


def find_study(storage: optuna.storages.BaseStorage, name: str | None) -> optuna.Study:
    """Return the study ``name``, or the storage's only study when ``name`` is None.

    Raises StorageError listing the studies there when the name is unknown or is needed to choose.
    """
    names = optuna.get_all_study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise StorageError("this storage holds no study yet; run autodrop search first.")
        else:
            raise StorageError(f"this storage holds several studies; pick one with --study: {', '.join(names)}.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_study(storage, name)


@dataclass(frozen=True)
class OpenedStudy:
    """An existing study, the storage it is in, and that storage's URL."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    url: str


def open_existing_study(study: str | None, storage: str | None) -> OpenedStudy:
    """Return the study named ``study`` (or the storage's only one) in the storage at URL ``storage``
    (default: ./autodrop.db), for the commands that read a study; neither is ever created here."""
    url = SearchConfig(storage=storage).storage_url
    storage_obj = open_storage(url, must_exist=True)
    return OpenedStudy(find_study(storage_obj, study), storage_obj, url)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a storage hiccup worth retrying (a locked SQLite file, a dropped
    database connection) rather than a fault of the trial."""
    import sqlalchemy.exc

    if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return True
    return isinstance(error, sqlalchemy.exc.DBAPIError) and bool(error.connection_invalidated)


_F = TypeVar("_F", bound=Callable[..., Any])


def storage_errors(function: _F) -> _F:
    """Make ``function``, a command that reads a study, raise StorageError (one line) where the
    database fails under it (a dropped connection, a locked file, a schema it does not know),
    instead of the driver's traceback."""

    @functools.wraps(function)
    def reading(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as e:
            if not is_storage_failure(e):
                raise
            # The first line only: the driver's later lines quote the statement and its values.
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = "".join(c if c.isprintable() else "?" for c in text)[:300]
            raise StorageError(f"the study's storage failed while it was read: {reason}") from e

    return reading  # type: ignore[return-value]


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the database under a study (any SQLAlchemy or Optuna storage error)."""
    import sqlalchemy.exc

    return isinstance(error, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError))
