"""The answer, read from storage alone: best placement, baselines, per-site importance, honest margin.

Nothing here trains or imports torch, so ``autodrop report`` answers from any machine that can
reach the study's storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna

from autodrop.outputs.importance import site_importances
from autodrop.run.noise import chance_lead, run_noise, spread_within_noise
from autodrop.run.records import (
    TrialRecord,
    best_trial,
    read_study,
    read_trials,
)
from autodrop.run.storage import open_existing_study, storage_errors

# A trial as the answer shows it (the name the Python API has always used).
TrialSummary = TrialRecord
# Importances come out of a handful of trials, but they mean little below about this many.
MIN_TRIALS_FOR_IMPORTANCE = 50


@dataclass(frozen=True)
class Margin:
    """How far the best trial leads no dropout, against how far the best of that many single runs
    would lead by luck alone."""

    lead: float  # best minus the "none" baseline, as a fraction
    chance: float  # the lead the best of n_runs equal placements reaches by luck (95%), as a fraction
    run_noise: float  # standard deviation of one run's accuracy (binomial and training wobble)
    n_runs: int  # the completed trials the best was picked from, no dropout left out
    n_val: int

    @property
    def within_noise(self) -> bool:
        return self.lead <= self.chance


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
    importances: dict[str, float] | None  # site -> share of the explained variation (rate, kind, slot)
    importance_note: str | None
    margin: Margin | None
    # site -> (low, high): 90% bootstrap interval of its share, resampling the completed trials
    importance_intervals: dict[str, tuple[float, float]] | None = None
    # whether the completed trials' accuracies vary more than one placement's runs would
    effect_measurable: bool | None = None
    n_searched_complete: int = 0  # completed trials the sampler chose (not baselines)
    trials: list[TrialSummary] = field(repr=False, default_factory=list)
    confirmation: dict[str, Any] | None = None  # written by autodrop confirm, as stored
    recipe: str = ""  # how every trial trained, in words (TrainConfig.describe); the answer holds for it

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


@storage_errors
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
    complete = [s for s in summaries if s.state == "complete" and s.val_accuracy is not None]
    accuracies = [float(s.val_accuracy) for s in complete]  # type: ignore[arg-type]
    epochs = record.config.train.epochs
    noise = run_noise(accuracies, [s.curve for s in complete], record.data.n_val, epochs)
    measurable = None if len(complete) < 3 else not spread_within_noise(accuracies, noise)
    n_searched = sum(s.baseline is None for s in complete)
    importances, intervals, note = _site_importances(summaries, record.sites, n_searched, len(complete) - n_searched)
    return SearchResult(
        study_name=study.study_name,
        storage_url=storage_url,
        sites=dict(record.sites),
        settings=record.settings,
        data=record.data.to_stored(),
        n_complete=len(complete),
        n_pruned=sum(s.state == "pruned" for s in summaries),
        n_failed=sum(s.state == "failed" for s in summaries),
        best=best,
        baselines=baselines,
        importances=importances,
        importance_note=note,
        margin=_margin(best, baselines, len(complete), noise, record.data.n_val),
        trials=summaries,
        confirmation=record.confirmation,
        importance_intervals=intervals,
        effect_measurable=measurable,
        n_searched_complete=n_searched,
        recipe=record.config.train.describe(),
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
    trials: list[TrialSummary], sites: Mapping[str, str], n_searched: int, n_baselines: int
) -> tuple[dict[str, float] | None, dict[str, tuple[float, float]] | None, str | None]:
    """Per-site importance (outputs/importance.py) from the completed trials, with 90% intervals,
    and a note that says what it was computed from."""
    n_complete = n_searched + n_baselines
    counted = f"{n_complete} completed trials ({n_searched} searched, {n_baselines} baselines)"
    if n_complete < 3:
        return None, None, f"need at least 3 completed trials; this study has {counted}."
    found = site_importances(trials, sites)
    if found is None:
        return None, None, f"cannot be told from {counted}: their accuracies are all equal."
    note = f"from {counted}"
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        note += (f"; rough below about {MIN_TRIALS_FOR_IMPORTANCE} (the intervals show how rough: raise "
                 "--trials and rerun to narrow them)")
    return found.shares, found.intervals, note + "."


def _margin(best: TrialSummary | None, baselines: list[TrialSummary], n_complete: int, noise: float,
            n_val: int) -> Margin | None:
    none = next((b for b in baselines if b.baseline == "none" and b.state == "complete"), None)
    if best is None or none is None or n_val <= 0 or none.val_accuracy is None or best.val_accuracy is None:
        return None
    n_runs = max(1, n_complete - 1)
    return Margin(lead=best.val_accuracy - none.val_accuracy, chance=chance_lead(n_runs) * noise, run_noise=noise,
                  n_runs=n_runs, n_val=n_val)


def _verdict(result: SearchResult) -> str:
    # Several seeds per placement beat one run per placement: once confirmed, that is the answer.
    if result.confirmation:
        return str(result.confirmation["verdict"])
    best, margin = result.best, result.margin
    if best is None:
        return "No trial has completed yet: there is no answer to give."
    placement = best.description
    if best.baseline == "none" or all(rate is None for rate in best.placement.values()):
        return "No dropout scored best: on this data and model, dropout does not help."
    if margin is None:
        return f"Best placement: {placement}. (The no-dropout baseline has not completed, so there is nothing to compare it with.)"
    lead, chance = 100 * margin.lead, 100 * margin.chance
    if margin.within_noise:
        return (
            f"Within noise: the best placement ({placement}) leads no dropout by {lead:+.1f} points, but the best "
            f"of {margin.n_runs} single runs leads by up to {chance:.1f} points by luck alone. No placement beats "
            "no dropout measurably here; no dropout is as good an answer."
        )
    return (
        f"Beyond noise: the best placement ({placement}) leads no dropout by {lead:+.1f} points, more than the "
        f"{chance:.1f} points the best of {margin.n_runs} single runs reaches by luck. It was trained once: "
        "autodrop confirm retrains it with fresh seeds before you rely on it."
    )
