"""Pruners: which trials stop early. The default prunes only trials clearly behind, and late.

Dropout slows early learning, so a pruner that judges trials after an epoch or two selects against
exactly the trials autodrop exists to measure. :class:`NoisePruner` waits until the trials that
will catch up have had time to (``min_epoch``, by default two thirds of the epochs), then stops a
trial only when its best validation accuracy so far is below the typical trial's at that epoch by
more than ``z`` (2) standard deviations of that difference: the binomial noise of both accuracies
on this validation set, and the epoch-to-epoch wobble of the completed trials' own curves (large
when training has not settled).
"""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autodrop.errors import ConfigError
from autodrop.run.noise import binomial_variance, curve_wobble


def default_min_epoch(epochs: int) -> int:
    """Return the first epoch the default pruner may prune at: two thirds of the epochs, rounded up,
    and never the last (a trial there is as cheap to finish as to judge).

    Replayed on searches that pruned nothing (benchmarks/search_quality.py), pruning from half the
    epochs stopped the eventual best trial on the digits; from two thirds it stopped none of the
    top quartile there.
    """
    return max(1, min(math.ceil(2 * epochs / 3), epochs - 1))


class NoisePruner(optuna.pruners.BasePruner):
    """Prune a trial at an epoch only when it is behind by more than the validation set's noise.

    At epoch ``s >= min_epoch`` a trial with validation accuracy ``a`` is pruned when
    ``a < r - z * sqrt(var(a) + var(r))``, where ``r`` is the ``quantile`` of the completed trials'
    accuracies at epoch ``s`` (the median by default) and ``var`` the binomial variance of an
    accuracy on ``n_val`` images. Nothing is pruned before ``n_startup_trials`` completed trials
    have reported epoch ``s``.
    """

    def __init__(self, n_val: int, *, min_epoch: int, quantile: float = 0.5, z: float = 2.0,
                 n_startup_trials: int = 4) -> None:
        if n_val < 1:
            raise ValueError(f"n_val must be at least 1, but got {n_val=}.")
        if min_epoch < 1:
            raise ValueError(f"min_epoch must be at least 1, but got {min_epoch=}.")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be between 0 and 1, but got {quantile=}.")
        if not (math.isfinite(z) and z >= 0.0):
            raise ValueError(f"z must be a finite number at least 0, but got {z=}.")
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be at least 1, but got {n_startup_trials=}.")
        self.n_val, self.min_epoch, self.quantile, self.z = n_val, min_epoch, quantile, z
        self.n_startup_trials = n_startup_trials

    def threshold(self, reference_values: list[float], wobble: float = 0.0) -> float | None:
        """Return the accuracy below which a trial is pruned, given the completed trials' accuracies
        at its epoch and the standard deviation of one epoch's reading around a curve's trend;
        None when there are too few of them to judge."""
        if len(reference_values) < self.n_startup_trials:
            return None
        reference = float(np.quantile(np.asarray(reference_values, dtype=float), self.quantile))
        # The binomial noise depends on the accuracy compared: solve for the accuracy at the boundary.
        bound = reference
        for _ in range(20):
            spread = binomial_variance(bound, self.n_val) + binomial_variance(reference, self.n_val) + wobble**2
            bound = reference - self.z * math.sqrt(spread)
        return bound

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.min_epoch:
            return False
        values = [v for s, v in trial.intermediate_values.items() if s <= step]
        if not all(math.isfinite(v) for v in values):
            return True
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        at_step = [t.intermediate_values[step] for t in completed if step in t.intermediate_values]
        curves = [t.intermediate_values for t in completed]
        bound = self.threshold([v for v in at_step if math.isfinite(v)], curve_wobble(curves, self.min_epoch))
        # The trial's best so far: a curve that wobbles is judged by its good epochs, not its worst.
        return bound is not None and max(values) < bound


def make_pruner(name: str, epochs: int, *, n_val: int) -> optuna.pruners.BasePruner:
    """Return the pruner called ``name`` for trials of ``epochs`` epochs judged on ``n_val`` images."""
    if name == "noise":
        return NoisePruner(n_val, min_epoch=default_min_epoch(epochs))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner must be one of noise, median, hyperband, none, but got {name!r}.")
