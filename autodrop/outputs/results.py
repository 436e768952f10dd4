"""The answer, read from storage alone: best placement, baselines, per-site importance, honest margin.

Nothing here trains or imports torch, so ``autodrop report`` answers from any machine that can
reach the study's storage.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna

from autodrop.run.records import (
    TrialRecord,
    best_trial,
    dropout_param,
    rate_param,
    read_study,
    read_trials,
    slot_param,
)
from autodrop.run.storage import open_existing_study

# A trial as the answer shows it (the name the Python API has always used).
TrialSummary = TrialRecord
# PED-ANOVA returns numbers from a handful of trials, but they mean little below about this many.
MIN_TRIALS_FOR_IMPORTANCE = 50


@dataclass(frozen=True)
class Margin:
    """How far the best trial leads no dropout, against the noise of one validation run."""

    lead: float  # best minus the "none" baseline, accuracy points as a fraction
    noise: float  # two standard errors of the difference between two accuracies on this val set
    standard_error: float  # binomial standard error of the best trial's accuracy
    n_val: int

    @property
    def within_noise(self) -> bool:
        return self.lead <= self.noise


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the same whether read just after searching or later from storage."""

    study_name: str
    storage_url: str
    sites: dict[str, str]  # site -> kind, in forward order
    settings: dict[str, Any]
    data: dict[str, Any]
    n_complete: int
    n_pruned: int
    n_failed: int
    best: TrialSummary | None
    baselines: list[TrialSummary]
    importances: dict[str, float] | None  # site -> share of the explained variance (on/off and rate)
    importance_note: str | None
    margin: Margin | None
    trials: list[TrialSummary] = field(repr=False, default_factory=list)
    confirmation: dict[str, Any] | None = None  # written by autodrop confirm, as stored

    @property
    def best_placement(self) -> dict[str, float | None] | None:
        return None if self.best is None else self.best.placement

    @property
    def n_finished(self) -> int:
        return self.n_complete + self.n_pruned

    @property
    def verdict(self) -> str:
        """The answer in one or two sentences of plain language."""
        return _verdict(self)


def load_results(study: str, storage: str | None = None) -> SearchResult:
    """Return the answer stored for the study named ``study`` (default storage: ./autodrop.db)."""
    opened = open_existing_study(study, storage)
    return summarize_study(opened.study, opened.url)


def summarize_study(study: optuna.Study, storage_url: str) -> SearchResult:
    """Return the answer a finished (or running) study gives, read from its storage."""
    record = read_study(study)
    summaries = read_trials(study, record)
    best = best_trial(summaries)
    baselines = _latest_baselines(summaries)
    n_complete = sum(s.state == "complete" for s in summaries)
    importances, note = _site_importances(study, record.sites, n_complete)
    return SearchResult(
        study_name=study.study_name,
        storage_url=storage_url,
        sites=dict(record.sites),
        settings=record.settings,
        data=record.data.to_stored(),
        n_complete=n_complete,
        n_pruned=sum(s.state == "pruned" for s in summaries),
        n_failed=sum(s.state == "failed" for s in summaries),
        best=best,
        baselines=baselines,
        importances=importances,
        importance_note=note,
        margin=_margin(best, baselines, record.data.n_val),
        trials=summaries,
        confirmation=record.confirmation,
    )


def _latest_baselines(summaries: list[TrialSummary]) -> list[TrialSummary]:
    """Return one trial per baseline recipe: a complete one if any (a retry replaces a failure)."""
    rank = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "failed": 4}
    chosen: dict[str, TrialSummary] = {}
    for s in summaries:
        if s.baseline is None:
            continue
        current = chosen.get(s.baseline)
        if current is None or rank[s.state] < rank[current.state]:
            chosen[s.baseline] = s
    return list(chosen.values())


def _site_importances(
    study: optuna.Study, sites: Mapping[str, str], n_complete: int
) -> tuple[dict[str, float] | None, str | None]:
    """Per-site importance: the PED-ANOVA shares of a site's on/off and its rate, added together."""
    if n_complete < 3:
        return None, f"importances need at least 3 completed trials; this study has {n_complete}."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return None, f"importances could not be computed: {e}"
    per_site = {
        site: sum(float(raw.get(name, 0.0)) for name in (site, rate_param(site), dropout_param(site), slot_param(site)))
        for site in sites
    }
    note = None
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        note = (
            f"only {n_complete} completed trials: importances are rough below about "
            f"{MIN_TRIALS_FOR_IMPORTANCE} (raise --trials and rerun to add more)."
        )
    return per_site, note


def _margin(best: TrialSummary | None, baselines: list[TrialSummary], n_val: int) -> Margin | None:
    none = next((b for b in baselines if b.baseline == "none" and b.state == "complete"), None)
    if best is None or none is None or n_val <= 0 or none.val_accuracy is None or best.val_accuracy is None:
        return None
    p_best, p_none = best.val_accuracy, none.val_accuracy
    se_best = math.sqrt(max(p_best * (1 - p_best), 0.25 / n_val) / n_val)
    se_none = math.sqrt(max(p_none * (1 - p_none), 0.25 / n_val) / n_val)
    return Margin(
        lead=p_best - p_none, noise=2 * math.hypot(se_best, se_none), standard_error=se_best, n_val=n_val
    )


def _verdict(result: SearchResult) -> str:
    # Several seeds per placement beat one run per placement: once confirmed, that is the answer.
    if result.confirmation:
        return str(result.confirmation["verdict"])
    best, margin = result.best, result.margin
    if best is None:
        return "No trial has completed yet: there is no answer to give."
    placement = best.description
    if best.baseline == "none":
        return "No dropout scored best: on this data and model, dropout does not help."
    if margin is None:
        return f"Best placement: {placement}. (The no-dropout baseline has not completed, so there is nothing to compare it with.)"
    lead, noise = 100 * margin.lead, 100 * margin.noise
    if margin.within_noise:
        return (
            f"Within noise: the best placement ({placement}) leads no dropout by {lead:+.1f} points, "
            f"inside the {noise:.1f}-point noise of one run on {margin.n_val} validation images. "
            "Dropout placement makes no measurable difference here; no dropout is as good an answer."
        )
    return (
        f"The best placement ({placement}) leads no dropout by {lead:+.1f} points, beyond the "
        f"{noise:.1f}-point noise of one run on {margin.n_val} validation images. It is the best of "
        f"{result.n_finished} trials with one seed each: confirm it with other seeds before relying on it."
    )
