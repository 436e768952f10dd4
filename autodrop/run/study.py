"""The study itself: created once with its settings, sampler and pruner, then loaded by every run."""

from __future__ import annotations

import warnings
from typing import Any, Collection, Mapping

import optuna
from optuna.trial import TrialState

from autodrop.errors import ConfigError, StorageError
from autodrop.run.records import METRIC_NAME, SETTINGS_KEY, TRIAL_SETTINGS, stored_settings

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Return the sampler called ``name``: grouped multivariate TPE (it models rates that exist only
    when their site is on), or random search."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name != "tpe":
        raise ConfigError(f"--sampler must be one of tpe, random, but got {name!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)


def create_or_load_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    *,
    settings: Mapping[str, Any],
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    follow: Collection[str] = (),
) -> optuna.Study:
    """Return the study ``name``, creating it if new; refuse one made with other trial settings.

    The settings named in ``follow`` were left to autodrop (``--precision auto``): a study that
    exists keeps its own value of them, and a new one stores the value given.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # autodrop prints its own progress
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner,
            load_if_exists=True,
        )
    except Exception as e:
        raise StorageError(f"cannot create or load study {name!r}: {e}") from e
    stored = stored_settings(study)
    wanted = {key: settings[key] for key in TRIAL_SETTINGS}
    if stored is None:
        study.set_user_attr(SETTINGS_KEY, wanted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])
        return study
    differing = [key for key in TRIAL_SETTINGS
                 if key not in follow and _normalise(stored.get(key)) != _normalise(wanted[key])]
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


def count_finished(study: optuna.Study) -> int:
    """Return how many trials finished (completed or pruned); failed ones do not count."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def best_value(study: optuna.Study) -> float | None:
    """Return the study's best value so far, or None before any trial has completed."""
    try:
        return study.best_value
    except ValueError:
        return None
