"""Confirmation: retrain the top placements and every baseline with fresh seeds, and test the lead.

One search runs each placement once, and on small data one run's accuracy moves by half a point or
more from seed to seed: the best of many single runs is flattered by luck. Here every candidate is
trained again with the same few fresh seeds, so that differences can be tested pair by pair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from autodrop.config import SearchConfig
from autodrop.errors import ConfigError, StorageError
from autodrop.run.records import (
    CONFIRMATION_KEY,
    StudyRecord,
    TrialRecord,
    describe_placement,
    rank_key,
    read_study,
    read_trials,
)
from autodrop.run.storage import open_existing_study
from autodrop.training.data import ImageData, load_data
from autodrop.training.device import resolve_device
from autodrop.training.loop import TrainingDiverged
from autodrop.training.normaliser import Normaliser
from autodrop.training.placement import train_placement

# Confirmation seeds never coincide with the search's trial seeds (seed * 1_000_003 + number).
CONFIRM_SEED_BASE = 900_000_000
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Candidate:
    """A placement to retrain: a searched trial or a baseline recipe."""

    label: str  # "trial 17" or the baseline's name
    trial: int
    baseline: str | None
    placement: dict[str, float | None]
    variants: dict[str, dict[str, str]]


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's accuracy over the confirmation seeds."""

    label: str
    trial: int
    baseline: str | None
    description: str
    accuracies: list[float]  # one per seed, in seed order
    gaps: list[float]  # train minus val accuracy, per seed
    mean: float
    ci_low: float  # 95% t interval of the mean
    ci_high: float
    mean_gap: float


@dataclass(frozen=True)
class Comparison:
    """The best searched placement against the best baseline, paired by seed."""

    winner: str
    reference: str
    mean_difference: float  # winner minus reference
    ci_low: float
    ci_high: float
    p_value: float | None  # paired t-test; None when every difference is zero
    significant: bool


@dataclass(frozen=True)
class Confirmation:
    seeds: list[int]
    candidates: list[CandidateResult]
    comparison: Comparison | None
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def confirm_study(
    study_name: str | None,
    storage: str | None = None,
    *,
    n_seeds: int = 5,
    top: int = 3,
    device: str = "auto",
    on_run: Callable[[str, int], None] | None = None,
) -> Confirmation:
    """Retrain the study's ``top`` placements and its baselines with ``n_seeds`` seeds; store and return the result.

    ``study_name`` None picks the storage's only study.
    """
    if n_seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 for a paired test, but got {n_seeds}.")
    if top < 1:
        raise ConfigError(f"--top must be at least 1, but got {top}.")
    study = open_existing_study(study_name, storage).study
    record = read_study(study)
    candidates = select_candidates(record, read_trials(study, record), top)
    data = load_data(record.config.data)
    _check_same_data(record, data)
    results = train_candidates(record.config, data, candidates, n_seeds=n_seeds, device=device, on_run=on_run)
    confirmation = summarize(results, seeds=[CONFIRM_SEED_BASE + i for i in range(n_seeds)])
    study.set_user_attr(CONFIRMATION_KEY, confirmation.to_dict())
    return confirmation


def _check_same_data(record: StudyRecord, data: ImageData) -> None:
    stored = record.data
    if (stored.n_train, stored.n_val) != (len(data.train_labels), len(data.val_labels)):
        raise ConfigError(
            f"the data of study {record.name!r} has changed since the search "
            f"(it had {stored.n_train} train / {stored.n_val} val images, now "
            f"{len(data.train_labels)} / {len(data.val_labels)}); confirm on the data the study searched."
        )


def select_candidates(record: StudyRecord, trials: list[TrialRecord], top: int) -> list[Candidate]:
    """Return the ``top`` best completed searched placements (distinct) and one trial per baseline."""
    complete = [t for t in trials if t.state == "complete" and t.val_accuracy is not None]
    if not complete:
        raise StorageError(f"study {record.name!r} has no completed trial to confirm.")
    chosen: list[Candidate] = []
    seen: list[tuple[Any, ...]] = []
    baselines: dict[str, Candidate] = {}
    for trial in sorted(complete, key=lambda t: rank_key(t.number, t.val_accuracy)):  # type: ignore[arg-type]
        candidate = Candidate(
            label=trial.baseline or f"trial {trial.number}",
            trial=trial.number,
            baseline=trial.baseline,
            placement=trial.placement,
            variants=trial.variants,
        )
        key = (tuple(sorted(candidate.placement.items())), repr(sorted(candidate.variants.items())))
        if candidate.baseline is not None:
            baselines.setdefault(candidate.baseline, candidate)
        elif key not in seen and len(chosen) < top:
            seen.append(key)
            chosen.append(candidate)
    return chosen + list(baselines.values())


def train_candidates(
    config: SearchConfig,
    data: ImageData,
    candidates: list[Candidate],
    *,
    n_seeds: int,
    device: str = "auto",
    on_run: Callable[[str, int], None] | None = None,
) -> list[CandidateResult]:
    """Train every candidate once per seed, all candidates with the same seeds, and collect accuracies."""
    torch_device = resolve_device(device)
    on_device = data.to(torch_device)
    normaliser = Normaliser(data.train_images).to(torch_device)
    results = []
    for candidate in candidates:
        accuracies, gaps = [], []
        for i in range(n_seeds):
            if on_run is not None:
                on_run(candidate.label, i)
            # The same seed gives every candidate the same initial weights and batch order.
            seed = CONFIRM_SEED_BASE + i
            try:
                metrics, _ = train_placement(config, on_device, normaliser, candidate.placement, candidate.variants,
                                             seed=seed, device=torch_device)
                accuracies.append(metrics.val_accuracy)
                gaps.append(metrics.gap)
            except TrainingDiverged:
                accuracies.append(0.0)
                gaps.append(0.0)
        mean, low, high = _mean_interval(accuracies)
        results.append(
            CandidateResult(
                label=candidate.label,
                trial=candidate.trial,
                baseline=candidate.baseline,
                description=describe_placement(candidate.placement, candidate.variants),
                accuracies=accuracies,
                gaps=gaps,
                mean=mean,
                ci_low=low,
                ci_high=high,
                mean_gap=sum(gaps) / len(gaps),
            )
        )
    return results


def _mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Return the mean and its 95% Student-t interval."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else 0.0
    return mean, mean - half, mean + half


def compare(winner: CandidateResult, reference: CandidateResult) -> Comparison:
    """Paired t-test across seeds of ``winner`` against ``reference``."""
    from scipy import stats

    differences = [a - b for a, b in zip(winner.accuracies, reference.accuracies)]
    mean, low, high = _mean_interval(differences)
    if all(d == differences[0] for d in differences):
        # No spread: a t-test is undefined. Identical runs differ by nothing; a constant nonzero
        # difference over several seeds is as consistent as a difference can be.
        p_value = None if differences[0] == 0 else 0.0
    else:
        p_value = float(stats.ttest_rel(winner.accuracies, reference.accuracies).pvalue)
    significant = p_value is not None and p_value < SIGNIFICANCE
    return Comparison(winner.label, reference.label, mean, low, high, p_value, significant)


def summarize(results: list[CandidateResult], *, seeds: list[int]) -> Confirmation:
    """Compare the best searched placement with the best baseline and say what it means."""
    searched = [r for r in results if r.baseline is None]
    baselines = [r for r in results if r.baseline is not None]
    if not searched or not baselines:
        only = results[0].label if results else "nothing"
        return Confirmation(seeds, results, None, f"Nothing to compare: only {only} was retrained.")
    winner = max(searched, key=lambda r: r.mean)
    reference = max(baselines, key=lambda r: r.mean)
    comparison = compare(winner, reference)
    return Confirmation(seeds, results, comparison, _verdict(comparison, winner, reference, len(seeds)))


def _verdict(c: Comparison, winner: CandidateResult, reference: CandidateResult, n_seeds: int) -> str:
    diff = 100 * c.mean_difference
    interval = f"95% CI {100 * c.ci_low:+.1f} to {100 * c.ci_high:+.1f}"
    p = "p undefined, identical runs" if c.p_value is None else f"paired t-test p={c.p_value:.3f}"
    reference_words = "no dropout" if reference.baseline == "none" else f"the {reference.label} baseline"
    if not c.significant:
        return (
            f"Within noise: the best searched placement ({winner.description}) and {reference_words} differ by "
            f"{diff:+.1f} points ({interval}, {p}, {n_seeds} seeds). {n_seeds} seeds cannot tell them apart; "
            f"{reference_words} is as good an answer."
        )
    if c.mean_difference > 0:
        return (
            f"Confirmed: {winner.description} beats {reference_words} by {diff:+.1f} points "
            f"({interval}, {p}, {n_seeds} seeds)."
        )
    return (
        f"Not confirmed: {reference_words} beats the best searched placement ({winner.description}) by "
        f"{-diff:.1f} points ({interval}, {p}, {n_seeds} seeds); its search score was luck."
    )
