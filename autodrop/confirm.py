"""Confirmation: retrain the top placements and every baseline with fresh seeds, and test the lead.

One search runs each placement once, and on small data one run's accuracy moves by half a point or
more from seed to seed: the best of many single runs is flattered by luck. Here every candidate is
trained again with the same few fresh seeds, so that differences can be tested pair by pair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from autodrop.config import SearchConfig, config_from_options
from autodrop.data import ImageData, load_data
from autodrop.errors import ConfigError, StorageError
from autodrop.models import ModelShape, build_model
from autodrop.sites import apply_placement
from autodrop.space import describe_placement, placement_from_params, variants_from_params
from autodrop.study import CONFIG_ATTR, CONFIRM_ATTR, DATA_ATTR, SITES_ATTR, find_study, open_storage
from autodrop.train import Normaliser, TrainingDiverged, resolve_device, train_trial

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
    url = SearchConfig(storage=storage).storage_url
    study = find_study(open_storage(url, must_exist=True), study_name)
    config = _stored_config(study, url)
    candidates = select_candidates(study, top)
    data = load_data(config.data)
    _check_same_data(study, data)
    results = train_candidates(config, data, candidates, n_seeds=n_seeds, device=device, on_run=on_run)
    confirmation = summarize(results, seeds=[CONFIRM_SEED_BASE + i for i in range(n_seeds)])
    study.set_user_attr(CONFIRM_ATTR, confirmation.to_dict())
    return confirmation


def _stored_config(study: optuna.Study, url: str) -> SearchConfig:
    settings = study.user_attrs.get(CONFIG_ATTR)
    if not settings or not study.user_attrs.get(SITES_ATTR):
        raise StorageError(f"study {study.study_name!r} was not made by autodrop search; there is nothing to confirm.")
    return config_from_options({**settings, "study": study.study_name, "storage": url})


def _check_same_data(study: optuna.Study, data: ImageData) -> None:
    stored = study.user_attrs.get(DATA_ATTR) or {}
    now = {"n_train": len(data.train_labels), "n_val": len(data.val_labels)}
    if any(stored.get(key) != value for key, value in now.items()):
        raise ConfigError(
            f"the data of study {study.study_name!r} has changed since the search "
            f"(it had {stored.get('n_train')} train / {stored.get('n_val')} val images, now "
            f"{now['n_train']} / {now['n_val']}); confirm on the data the study searched."
        )


def select_candidates(study: optuna.Study, top: int) -> list[Candidate]:
    """Return the ``top`` best completed searched placements (distinct) and one trial per baseline."""
    sites = list(study.user_attrs.get(SITES_ATTR) or {})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        raise StorageError(f"study {study.study_name!r} has no completed trial to confirm.")
    chosen: list[Candidate] = []
    seen: list[tuple[Any, ...]] = []
    baselines: dict[str, Candidate] = {}
    for trial in sorted(complete, key=lambda t: (-t.value, t.number)):
        candidate = Candidate(
            label=trial.user_attrs.get("baseline") or f"trial {trial.number}",
            trial=trial.number,
            baseline=trial.user_attrs.get("baseline"),
            placement=placement_from_params(trial.params, sites),
            variants=variants_from_params(trial.params, sites),
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
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    results = []
    for candidate in candidates:
        accuracies, gaps = [], []
        for i in range(n_seeds):
            if on_run is not None:
                on_run(candidate.label, i)
            seed = CONFIRM_SEED_BASE + i
            torch.manual_seed(seed)  # the same seed gives every candidate the same initial weights
            model = build_model(config.model, shape, model_args=config.model_args)
            apply_placement(model, candidate.placement, candidate.variants)
            try:
                metrics = train_trial(model, on_device, normaliser, config.train, seed=seed, device=torch_device)
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
