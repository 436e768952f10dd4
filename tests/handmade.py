"""Studies made by hand, no training: the records a search writes, with trials whose figures a test plants."""

from __future__ import annotations

from typing import Callable

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from autodrop.config import SearchConfig, config_to_options
from autodrop.run import records
from autodrop.run.space import baseline_placements, placement_to_params

SITES = {"conv1": "conv", "conv2": "conv", "conv3": "conv", "fc1": "fc", "fc2": "fc"}
RATE_RANGE = (0.05, 0.7)


def handmade_study(
    accuracy: Callable[[dict[str, float | None], np.random.Generator], float],
    *,
    n_searched: int,
    n_val: int = 360,
    epochs: int = 4,
    seed: int = 0,
    storage: str | None = None,
) -> optuna.Study:
    """Return a study with autodrop's records, the four baselines and ``n_searched`` random
    placements, each completed with ``accuracy(placement, rng)`` (its curve rising to that value)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", storage=storage, study_name="handmade")
    config = SearchConfig(rate_range=RATE_RANGE, train=SearchConfig().train.__class__(epochs=epochs, precision="fp32"))
    options = config_to_options(config)
    study.set_user_attr(records.SETTINGS_KEY, {key: options[key] for key in records.TRIAL_SETTINGS})
    study.set_user_attr(records.SITES_KEY, SITES)
    study.set_user_attr(records.DATA_KEY, records.DataRecord("digits", tuple(str(d) for d in range(10)),
                                                             1437, n_val, 1, 32).to_stored())
    rng = np.random.default_rng(seed)
    placements = [(name, placement) for name, placement in baseline_placements(SITES, RATE_RANGE)]
    for _ in range(n_searched):
        placements.append((None, {site: (float(rng.uniform(*RATE_RANGE)) if rng.random() < 0.5 else None)
                                  for site in SITES}))
    for number, (baseline, placement) in enumerate(placements):
        value = float(np.clip(accuracy(placement, rng), 0.0, 1.0))
        params = placement_to_params(placement)
        distributions = {
            name: (FloatDistribution(*RATE_RANGE) if name.endswith(".p") else CategoricalDistribution(["off", "on"]))
            for name in params
        }
        curve = {e: value * (0.8 + 0.2 * e / epochs) for e in range(1, epochs + 1)}
        attrs = {records.SEED: number, records.TRAIN_ACCURACY: min(1.0, value + 0.02)}
        if baseline is not None:
            attrs[records.BASELINE] = baseline
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=value, params=params, distributions=distributions,
            intermediate_values=curve, user_attrs=attrs,
        ))
    return study


def binomial_noise(mean: float, n_val: int = 360) -> Callable[[np.random.Generator], float]:
    """Return a draw of an accuracy around ``mean`` with the binomial noise of ``n_val`` images."""
    return lambda rng: float(rng.binomial(n_val, mean) / n_val)
