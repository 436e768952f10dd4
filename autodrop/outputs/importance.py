"""Which sites matter: each site's share of the variation in accuracy, with how sure that share is.

Every completed trial is described by one number per site, its dropout rate (0 where the site is
off), and, where the search chose them, the site's dropout kind and slot ("off" where it is off).
Every feature is present in every trial, so fANOVA (Optuna's random-forest evaluator) can take
them all; a site's share is the sum of its features'. On the 20 to 60 trials a search has, this
ranked a planted driving site first where PED-ANOVA on the raw conditional parameters did not
(it gave most of the importance to rates of unrelated sites). Resampling the trials with
replacement and computing the shares again gives each one an interval. Nothing here imports torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from autodrop.config import DROPOUT_KINDS, SLOTS
from autodrop.run.records import TrialRecord

N_TREES = 16  # per forest; enough for 5-20 features, and fast enough to refit for every resample
RESAMPLES = 40  # resamples of the completed trials behind each interval
OFF = "off"


@dataclass(frozen=True)
class SiteImportances:
    """Each site's share of the explained variation, and its 90% interval over resamples."""

    shares: dict[str, float]
    intervals: dict[str, tuple[float, float]]


def site_importances(trials: list[TrialRecord], sites: Mapping[str, str]) -> SiteImportances | None:
    """Return each site's importance over the completed ``trials``, or None when fewer than 3
    completed or their accuracies do not vary."""
    complete = [t for t in trials if t.state == "complete" and t.val_accuracy is not None]
    if len(complete) < 3 or len({t.val_accuracy for t in complete}) < 2:
        return None
    shares = _shares(complete, sites, seed=0)
    if shares is None:
        return None
    rng = np.random.default_rng(0)  # the same trials always give the same intervals
    draws: dict[str, list[float]] = {site: [] for site in sites}
    for i in range(RESAMPLES):
        sample = [complete[j] for j in rng.integers(0, len(complete), len(complete))]
        resampled = _shares(sample, sites, seed=i + 1)
        if resampled is not None:
            for site in sites:
                draws[site].append(resampled[site])
    intervals = {
        site: (float(np.percentile(values, 5)), float(np.percentile(values, 95))) if values else (0.0, 1.0)
        for site, values in draws.items()
    }
    return SiteImportances(shares, intervals)


def _shares(trials: list[TrialRecord], sites: Mapping[str, str], *, seed: int) -> dict[str, float] | None:
    """Return each site's fANOVA share in ``trials``, or None when their accuracies do not vary."""
    if len({t.val_accuracy for t in trials}) < 2:
        return None
    searched_variants = {key for t in trials for variant in t.variants.values() for key in variant}
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for site in sites:
        distributions[site] = FloatDistribution(0.0, 1.0)
        if "dropout" in searched_variants:
            distributions[f"{site}.kind"] = CategoricalDistribution([OFF, *DROPOUT_KINDS])
        if "slot" in searched_variants:
            distributions[f"{site}.slot"] = CategoricalDistribution([OFF, *SLOTS])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shadow = optuna.create_study(direction="maximize")
    for trial in trials:
        params: dict[str, object] = {}
        for site in sites:
            rate = trial.placement.get(site)
            variant = trial.variants.get(site, {})
            params[site] = 0.0 if rate is None else float(rate)
            if f"{site}.kind" in distributions:
                params[f"{site}.kind"] = OFF if rate is None else variant.get("dropout", DROPOUT_KINDS[0])
            if f"{site}.slot" in distributions:
                params[f"{site}.slot"] = OFF if rate is None else variant.get("slot", SLOTS[0])
        shadow.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=float(trial.val_accuracy), params=params,  # type: ignore[arg-type]
            distributions=distributions,
        ))
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=N_TREES, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = optuna.importance.get_param_importances(shadow, evaluator=evaluator, normalize=True)
    return {site: sum(float(raw.get(k, 0.0)) for k in (site, f"{site}.kind", f"{site}.slot")) for site in sites}
