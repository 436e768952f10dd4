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
from optuna.trial import FrozenTrial, TrialState

from autodrop.errors import StorageError
from autodrop.space import (
    describe_placement,
    kind_param,
    order_param,
    placement_from_params,
    rate_param,
    variants_from_params,
)
from autodrop.config import SearchConfig
from autodrop.study import CONFIG_ATTR, CONFIRM_ATTR, DATA_ATTR, SITES_ATTR, load_study, open_storage

BASELINE_ATTR = "baseline"
# PED-ANOVA returns numbers from a handful of trials, but they mean little below about this many.
MIN_TRIALS_FOR_IMPORTANCE = 50


@dataclass(frozen=True)
class TrialSummary:
    """One trial as the answer shows it."""

    number: int
    state: str  # complete, pruned, failed, running or waiting
    placement: dict[str, float | None]
    val_accuracy: float | None  # the objective: last epoch's validation accuracy
    train_accuracy: float | None
    baseline: str | None  # the recipe's name, for baseline trials
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # site -> kind / order, where chosen

    @property
    def description(self) -> str:
        return describe_placement(self.placement, self.variants)

    @property
    def gap(self) -> float | None:
        if self.val_accuracy is None or self.train_accuracy is None:
            return None
        return self.train_accuracy - self.val_accuracy


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
    url = SearchConfig(storage=storage).storage_url
    return summarize_study(load_study(open_storage(url, must_exist=True), study), url)


def summarize_study(study: optuna.Study, storage_url: str) -> SearchResult:
    """Return the answer a finished (or running) study gives, read from its storage."""
    sites: dict[str, str] = study.user_attrs.get(SITES_ATTR) or {}
    if not sites:
        raise StorageError(f"study {study.study_name!r} was not made by autodrop search (it has no drop sites).")
    trials = study.get_trials(deepcopy=False)
    summaries = [_summarize_trial(t, list(sites)) for t in trials]
    by_number = {s.number: s for s in summaries}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = by_number[max(complete, key=lambda t: (t.value, -t.number)).number] if complete else None
    baselines = _latest_baselines(summaries)
    importances, note = _site_importances(study, sites, len(complete))
    settings = dict(study.user_attrs.get(CONFIG_ATTR) or {})
    data = dict(study.user_attrs.get(DATA_ATTR) or {})
    return SearchResult(
        study_name=study.study_name,
        storage_url=storage_url,
        sites=dict(sites),
        settings=settings,
        data=data,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        best=best,
        baselines=baselines,
        importances=importances,
        importance_note=note,
        margin=_margin(best, baselines, int(data.get("n_val", 0))),
        trials=summaries,
        confirmation=study.user_attrs.get(CONFIRM_ATTR),
    )


def _summarize_trial(trial: FrozenTrial, sites: list[str]) -> TrialSummary:
    placement = placement_from_params(trial.params, sites) if trial.params else {s: None for s in sites}
    value = trial.value if trial.state == TrialState.COMPLETE else _last_intermediate(trial)
    train_accuracy = trial.user_attrs.get("train_accuracy")
    return TrialSummary(
        number=trial.number,
        state=_STATE_WORDS[trial.state],
        placement=placement,
        val_accuracy=value,
        train_accuracy=train_accuracy if isinstance(train_accuracy, (int, float)) else None,
        baseline=trial.user_attrs.get(BASELINE_ATTR),
        variants=variants_from_params(trial.params, sites),
    )


_STATE_WORDS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def _last_intermediate(trial: FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


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
        site: sum(float(raw.get(name, 0.0)) for name in (site, rate_param(site), kind_param(site), order_param(site)))
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


def format_result(result: SearchResult) -> str:
    """Return the answer as the terminal shows it at the end of a search."""
    lines: list[str] = []
    settings, data = result.settings, result.data
    lines.append(
        f"Study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed trials; model {settings.get('model', '?')}, data {data.get('name', '?')} "
        f"({data.get('n_train', '?')} train / {data.get('n_val', '?')} val images)."
    )
    lines.append("")
    best = result.best
    if best is not None:
        title = f"Best placement (trial {best.number}"
        title += f", baseline {best.baseline})" if best.baseline else ")"
        lines.append(title + f": val accuracy {_pct(best.val_accuracy)}, train {_pct(best.train_accuracy)}, gap {_pts(best.gap)}")
    else:
        lines.append("Best placement: none yet (no completed trial).")
    lines.append("")
    header = f"  {'site':<14} {'kind':<5} {'best':>8} {'importance':>11}  variant"
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for site, kind in result.sites.items():
        rate = best.placement.get(site) if best else None
        shown = "off" if rate is None else f"{rate:.2f}"
        importance = "-" if result.importances is None else f"{result.importances.get(site, 0.0):.2f}"
        variant = best.variants.get(site, {}) if best and rate is not None else {}
        variant_words = ", ".join(variant[key] for key in ("kind", "order") if key in variant)
        lines.append(f"  {site:<14} {kind:<5} {shown:>8} {importance:>11}  {variant_words}".rstrip())
    if result.importance_note:
        lines.append(f"  Note: {result.importance_note}")
    lines.append("")
    lines.append("Baselines (the usual recipes):")
    lines.append(f"  {'recipe':<15} {'val acc':>8} {'train acc':>10} {'gap':>7}  placement")
    for b in result.baselines:
        if b.state == "complete":
            figures = f"{_pct(b.val_accuracy):>8} {_pct(b.train_accuracy):>10} {_pts(b.gap):>7}"
        else:
            figures = f"{b.state:>8} {'':>10} {'':>7}"
        lines.append(f"  {b.baseline:<15} {figures}  {b.description}")
    if best is not None and result.margin is not None:
        m = result.margin
        lines.append("")
        lines.append(
            f"Lead over no dropout: {100 * m.lead:+.1f} points; validation standard error "
            f"{100 * m.standard_error:.1f} points (n={m.n_val}), noise band for a difference {100 * m.noise:.1f} points."
        )
    if result.confirmation:
        lines.append("")
        lines.extend(format_confirmation(result.confirmation).splitlines()[:-1])
    lines.append("")
    lines.append(result.verdict)
    return "\n".join(lines)


def format_confirmation(confirmation: Mapping[str, Any]) -> str:
    """Return a stored confirmation as a table of candidates and the verdict."""
    seeds = confirmation["seeds"]
    lines = [f"Confirmation ({len(seeds)} fresh seeds per placement, the same seeds for each):"]
    lines.append(f"  {'placement':<15} {'mean val':>9} {'95% interval':>15} {'gap':>6}  what")
    for c in confirmation["candidates"]:
        interval = f"{100 * c['ci_low']:.1f}-{100 * c['ci_high']:.1f}%"
        lines.append(
            f"  {c['label']:<15} {100 * c['mean']:>8.1f}% {interval:>15} {_pts(c['mean_gap']):>6}  {c['description']}"
        )
    lines.append(str(confirmation["verdict"]))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pts(value: float | None) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a zero gap never prints as "-0.0".
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"


# A site whose share of the importance is at least this much "matters"; below the lower bound it
# "hardly matters". Shares sum to 1 over all sites (on/off and rate together).
MATTERS_SHARE = 0.2
NEGLIGIBLE_SHARE = 0.05


def site_story(result: SearchResult) -> str:
    """Return which sites matter and which do not, in plain language, from the importances."""
    if result.importances is None:
        return f"Which sites matter cannot be told yet: {result.importance_note or 'no importances.'}"
    shares = sorted(result.importances.items(), key=lambda item: -item[1])
    best = result.best.placement if result.best is not None else {}

    def state(site: str) -> str:
        rate = best.get(site)
        return "off in the best trial" if rate is None else f"best at about {rate:.2f}"

    matter = [(site, share) for site, share in shares if share >= MATTERS_SHARE]
    negligible = [site for site in result.sites if result.importances.get(site, 0.0) < NEGLIGIBLE_SHARE]
    parts: list[str] = []
    if matter:
        described = "; ".join(f"{site} ({100 * share:.0f}% of the importance, {state(site)})" for site, share in matter)
        lead = "Most of the effect comes from" if len(matter) == 1 else "The effect comes mostly from"
        parts.append(f"{lead} {described}.")
    else:
        parts.append("No single site dominates: the effect is spread over the sites.")
    if negligible:
        each = "" if len(negligible) == 1 else " each"
        parts.append(
            f"Dropout at {_join_words(negligible)} does not matter here (under "
            f"{100 * NEGLIGIBLE_SHARE:.0f}% of the importance{each})."
        )
    if result.importance_note:
        parts.append(f"Note: {result.importance_note}")
    return " ".join(parts)


def _join_words(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]
