"""Storage, sampler, pruner and the study itself: created once, then loaded by every run."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState

from autodrop.errors import ConfigError, StorageError

# The study keeps the settings its trials were trained with, so that a rerun with other settings
# cannot mix incomparable trials into it, and so report and export can rebuild a trial's network
# from storage alone.
CONFIG_ATTR = "autodrop.config"
DATA_ATTR = "autodrop.data"
SITES_ATTR = "autodrop.sites"
CONFIRM_ATTR = "autodrop.confirmation"
# Settings that change what a trial's number means; the rest (trials, timeout, device, pruner)
# may differ between runs of one study.
TRIAL_SETTINGS = (
    "data", "image-size", "channels", "val-fraction", "train-per-class",
    "model", "model-args", "epochs", "batch-size", "lr", "rate-range", "kinds", "orders", "schedule", "seed",
)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
METRIC_NAME = "val_accuracy"
# A worker that stops beating for this long is taken for dead and its trial retried. Tests (and
# impatient users on one machine) shorten both through these environment variables.
HEARTBEAT_INTERVAL_S = 15
GRACE_PERIOD_S = 60
HEARTBEAT_ENV = "AUTODROP_HEARTBEAT_INTERVAL"
GRACE_ENV = "AUTODROP_GRACE_PERIOD"
# How often a trial whose worker died may be re-run with the same parameters before it is given up.
MAX_RETRY = 2
PACKED_ATTR = "packed"  # user attribute: the trial trains as a member of a pack (no checkpoint)


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
    """Queues a stale (or stopped) trial again with its parameters and user attributes, as
    Optuna's RetryHeartbeatStaleTrialCallback does, at most ``max_retry`` times.

    A lone trial's retry also inherits the steps already reported: it resumes after them from the
    checkpoint named in its user attributes. A packed member (user attribute ``packed``) keeps no
    checkpoint and starts over, so its retry inherits no steps and reports each one afresh.
    """

    def __init__(self, max_retry: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._resume = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)
            self._restart = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        (self._restart if trial.user_attrs.get(PACKED_ATTR) else self._resume)(study, trial)


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Return the storage at ``url``, or raise StorageError saying why it cannot be reached.

    With ``must_exist`` (the commands that only read: report, export, dashboard) an SQLite file
    that is not there is an error rather than a new empty database left behind.
    """
    if must_exist:
        _require_sqlite_file(url)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if path.name and not path.parent.exists():
            raise StorageError(f"cannot create the study file {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    heartbeat_interval, grace_period = heartbeat_settings()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers and the heartbeat thread write to one file: wait for the lock.
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
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
        raise StorageError(f"storage {_safe_url(url)!r} needs a database driver that is not installed: {e}.") from e
    except Exception as e:  # SQLAlchemy raises a different type per dialect and failure
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open storage {_safe_url(url)!r}: {reason}") from e


def _require_sqlite_file(url: str) -> None:
    if not url.startswith("sqlite"):
        return
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception as e:
        raise StorageError(f"storage {url!r} is not a valid database URL: {e}.") from e
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    if not Path(database).is_file():
        raise StorageError(
            f"storage {url!r} names the SQLite file {database!r}, which does not exist; run "
            "autodrop search first, or pass the --storage that the search used."
        )


def _safe_url(url: str) -> str:
    """Return ``url`` with any password hidden, for error messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """Return grouped multivariate TPE, which models rates that exist only when their site is on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Return the pruner called ``name``, its warm-up fitted to ``epochs``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner must be one of median, hyperband, none, but got {name!r}.")


def create_or_load_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    *,
    settings: Mapping[str, Any],
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Return the study ``name``, creating it if new; refuse one made with other trial settings."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # autodrop prints its own progress
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner,
            load_if_exists=True,
        )
    except Exception as e:
        raise StorageError(f"cannot create or load study {name!r}: {e}") from e
    stored = study.user_attrs.get(CONFIG_ATTR)
    wanted = {key: settings[key] for key in TRIAL_SETTINGS}
    if stored is None:
        study.set_user_attr(CONFIG_ATTR, wanted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])
        return study
    differing = [key for key in TRIAL_SETTINGS if _normalise(stored.get(key)) != _normalise(wanted[key])]
    if differing:
        details = ", ".join(f"{key} {stored.get(key)!r} (now {wanted[key]!r})" for key in differing)
        raise ConfigError(
            f"study {name!r} was made with other settings: {details}. Use the same settings to resume "
            "it, or --study NEW_NAME to start another."
        )
    return study


def _normalise(value: Any) -> Any:
    if isinstance(value, dict) and not value:
        return None  # studies made before model arguments existed store none
    return list(value) if isinstance(value, tuple) else value


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Return the existing study ``name``, or raise StorageError listing the studies there."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        listing = ", ".join(names) if names else "none"
        raise StorageError(f"no study named {name!r} in this storage; studies there: {listing}.")
    return optuna.load_study(study_name=name, storage=storage)


def count_finished(study: optuna.Study) -> int:
    """Return how many trials finished (completed or pruned); failed ones do not count."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


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
