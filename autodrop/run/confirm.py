"""Confirmation: retrain the winners and baselines with fresh seeds until the lead can be judged.

One search runs each placement once, and one run's accuracy moves from seed to seed: the best of
many single runs is flattered by luck. Here candidates are trained again with the same fresh seeds,
so that differences can be tested pair by pair. The question is autodrop's own: does the best
searched placement beat no dropout? (And, beside it: does it beat the best of the usual recipes?)

By default seeds are added one at a time (to the searched winner, no dropout and the best recipe)
until the interval of the winner's lead over no dropout excludes zero, or lies within a stated
width of it (no difference that matters), or a cap is reached. The interval is widened for having
looked several times (Pocock), so that stopping when it looks decided does not flatter the winner.
Every run is stored with the study and reused on a rerun.

Where the search's pack rule packs trials (built-in models on a GPU, or ``--pack``), a placement's
missing seeds train together as one packed network, each member with its seed's initial weights,
batch order and augmentation draws, as it would have trained alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from autodrop.config import SearchConfig
from autodrop.errors import ConfigError, StorageError
from autodrop.nets.build import build_model, inspect_model
from autodrop.run.records import (
    CONFIRM_SEED_BASE,
    CONFIRMATION_KEY,
    CONFIRMATION_RUNS_KEY,
    MAX_CONFIRM_RUNS,
    StudyRecord,
    TrialRecord,
    describe_placement,
    placement_key,
    rank_key,
    read_confirmation_runs,
    read_study,
    read_trials,
)
from autodrop.run.search import worker_pack_sizes
from autodrop.run.storage import open_existing_study, storage_errors
from autodrop.run.trust import check_same_data, data_record, trusted_config
from autodrop.training.data import ImageData, load_data, place_data
from autodrop.training.device import resolve_device, resolve_precision
from autodrop.training.loop import Member, TrainingDiverged
from autodrop.training.normaliser import Normaliser
from autodrop.training.packed import PackTrainer
from autodrop.training.placement import build_placed_model, train_placement

# Confirmation seeds (CONFIRM_SEED_BASE + i, in records.py) never coincide with the search's trial
# seeds (seed * 1_000_003 + number).
SIGNIFICANCE = 0.05  # the chance of calling a difference real when there is none, over all looks
MIN_SEEDS = 3  # seeds every candidate gets before the first look
MAX_SEEDS = 10  # the cap of the sequential confirmation
MAX_PACK = 64  # the most seeds of one placement trained as one pack (the pack rule's own size is smaller)
DECISION_WIDTH = 0.01  # a lead whose interval lies within +-1 point makes no difference that matters


@dataclass(frozen=True)
class Candidate:
    """A placement to retrain: a searched trial or a baseline recipe."""

    label: str  # "trial 17" or the baseline's name
    trial: int
    baseline: str | None
    placement: dict[str, float | None]
    variants: dict[str, dict[str, str]]

    @property
    def key(self) -> str:
        return placement_key(self.placement, self.variants)


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's accuracy over the confirmation seeds it was trained with."""

    label: str
    trial: int
    baseline: str | None
    description: str
    seeds: list[int]
    accuracies: list[float]  # one per seed, in seed order
    gaps: list[float]  # train minus val accuracy, per seed
    mean: float
    ci_low: float  # 95% t interval of the mean
    ci_high: float
    mean_gap: float


@dataclass(frozen=True)
class Comparison:
    """One placement against another, paired by seed."""

    winner: str
    reference: str
    n_seeds: int
    mean_difference: float  # winner minus reference
    ci_low: float
    ci_high: float
    level: float  # the interval's confidence level (below 95% only after being widened for several looks)
    p_value: float | None  # paired t-test; None when every difference is zero
    significant: bool  # the interval excludes zero


@dataclass(frozen=True)
class Confirmation:
    seeds: list[int]  # every seed any candidate was trained with
    candidates: list[CandidateResult]
    comparison: Comparison | None  # the searched winner against no dropout (the question)
    against_best_baseline: Comparison | None  # the searched winner against the best recipe, if that is not none
    stopped: str  # "fixed", "decided", "settled" (within the width) or "cap"
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@storage_errors
def confirm_study(
    study_name: str | None,
    storage: str | None = None,
    *,
    n_seeds: int | None = None,
    max_seeds: int = MAX_SEEDS,
    top: int = 3,
    device: str = "auto",
    precision: str | None = None,
    pack: int | None = None,
    model: str | None = None,
    data: str | None = None,
    on_run: Callable[[str, int], None] | None = None,
    model_args: Sequence[str] | Mapping[str, Any] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Confirmation:
    """Retrain the study's ``top`` placements and its baselines with fresh seeds; store and return the verdict.

    ``n_seeds`` fixes the number of seeds for every candidate; None (the default) adds seeds until
    the lead is decided, settled within ``DECISION_WIDTH``, or ``max_seeds`` is reached. Runs
    already stored with the study are reused. ``study_name`` None picks the storage's only study.
    ``model`` and ``data`` name the study's own model and image folder, which autodrop never takes
    from the study itself (run/trust.py); a built-in model and the built-in digits need neither.
    ``precision`` None retrains in the study's own precision. ``pack`` is the search's ``--pack``:
    None packs a placement's seeds where a search would pack its trials. ``on_run`` hears of each
    seed trained alone, ``on_note`` of how the runs train (the precision, each pack).
    """
    if n_seeds is not None and n_seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 for a paired test, but got {n_seeds}.")
    if max_seeds < MIN_SEEDS:
        raise ConfigError(f"--max-seeds must be at least {MIN_SEEDS}, but got {max_seeds}.")
    if max(n_seeds or 0, max_seeds) > MAX_CONFIRM_RUNS:
        raise ConfigError(f"--seeds and --max-seeds must be at most {MAX_CONFIRM_RUNS}, but got "
                          f"{max(n_seeds or 0, max_seeds)}.")
    if top < 1:
        raise ConfigError(f"--top must be at least 1, but got {top}.")
    study = open_existing_study(study_name, storage).study
    record = read_study(study)
    candidates = select_candidates(record, read_trials(study, record), top)
    config = dataclasses.replace(trusted_config(record, model=model, model_args=model_args, data=data), pack=pack)
    if precision is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, precision=resolve_precision(precision, resolve_device(device))))
    images = load_data(config.data)
    check_same_data(record, data_record(images))
    # Every run is stored as soon as it is trained: a stopped or killed confirm loses none of them.
    trainer = CandidateTrainer(config, images, device=device, on_run=on_run, runs=read_confirmation_runs(study),
                               on_trained=lambda runs: study.set_user_attr(CONFIRMATION_RUNS_KEY, runs),
                               on_note=on_note)
    if on_note is not None:
        packing = (f"a placement's seeds {trainer.pack} at a time as one packed network" if trainer.pack > 1
                   else "one seed at a time")
        on_note(f"retraining with {config.train.describe()}, on {trainer.device}, {packing}")
    if n_seeds is not None:
        confirmation = confirm_fixed(trainer, candidates, n_seeds)
    else:
        confirmation = confirm_sequentially(trainer, candidates, max_seeds=max_seeds)
    study.set_user_attr(CONFIRMATION_KEY, confirmation.to_dict())
    return confirmation


def select_candidates(record: StudyRecord, trials: list[TrialRecord], top: int) -> list[Candidate]:
    """Return the ``top`` best completed searched placements (distinct) and one trial per baseline,
    each in the search's order of rank; raise StorageError when there is no searched placement or
    no completed no-dropout baseline to compare (nothing would be trained then)."""
    complete = [t for t in trials if t.state == "complete" and t.val_accuracy is not None]
    if not complete:
        raise StorageError(f"study {record.name!r} has no completed trial to confirm.")
    chosen: list[Candidate] = []
    # A searched placement equal to a baseline's (no dropout, say) is that baseline: not retrained twice.
    seen = {placement_key(t.placement, t.variants) for t in complete if t.baseline is not None}
    baselines: dict[str, Candidate] = {}
    for trial in sorted(complete, key=lambda t: rank_key(t.number, t.val_accuracy)):  # type: ignore[arg-type]
        candidate = Candidate(
            label=trial.baseline or f"trial {trial.number}",
            trial=trial.number,
            baseline=trial.baseline,
            placement=trial.placement,
            variants=trial.variants,
        )
        if candidate.baseline is not None:
            baselines.setdefault(candidate.baseline, candidate)
        elif candidate.key not in seen and len(chosen) < top:
            seen.add(candidate.key)
            chosen.append(candidate)
    if not chosen:
        raise StorageError(f"study {record.name!r} has no completed searched placement (other than the baselines) "
                           "to confirm; run more trials first.")
    if "none" not in baselines:
        raise StorageError(f"study {record.name!r} has no completed no-dropout baseline to compare with; rerun the "
                           "search so it completes.")
    return chosen + list(baselines.values())


class CandidateTrainer:
    """Trains candidates on confirmation seeds, each (placement, seed) once: earlier runs, stored
    with the study, are reused."""

    def __init__(self, config: SearchConfig, data: ImageData, *, device: str = "auto",
                 on_run: Callable[[str, int], None] | None = None,
                 runs: dict[str, dict[str, list[float]]] | None = None,
                 on_trained: Callable[[dict[str, dict[str, list[float]]]], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_trained = on_trained
        self.device = resolve_device(device)
        self.data = place_data(data, self.device, config.train.data_on_device)
        self.normaliser = Normaliser(data.train_images).to(self.device)
        self.on_run, self.on_note = on_run, on_note
        self.runs: dict[str, dict[str, list[float]]] = runs or {}  # placement key -> seed -> [val, gap]
        # Packed members each take their own batches, so they need the inputs of augmented members.
        problem = inspect_model(config.model, data.shape, config.model_args, member_inputs=True,
                                in_block=config.in_block).packing_problem
        if config.pack is not None and config.pack > 1 and problem is not None:
            raise ConfigError(f"--pack {config.pack}: this model's runs cannot be packed ({problem}); use --pack 1.")
        # The search's rule, which caps a pack at the trials to run: here train() caps it at the seeds missing.
        (self.pack,) = worker_pack_sizes(dataclasses.replace(config, trials=MAX_PACK), [self.device], problem)

    def train(self, candidate: Candidate, n_seeds: int) -> None:
        """Make sure ``candidate`` has runs for the first ``n_seeds`` confirmation seeds."""
        done = self.runs.setdefault(candidate.key, {})
        missing = [CONFIRM_SEED_BASE + i for i in range(n_seeds) if str(CONFIRM_SEED_BASE + i) not in done]
        for start in range(0, len(missing), self.pack):
            seeds = missing[start : start + self.pack]
            if len(seeds) > 1:
                self._train_pack(candidate, seeds, done)
            else:
                self._train_alone(candidate, seeds[0], done)
            if self.on_trained is not None:
                self.on_trained(self.runs)

    def _train_alone(self, candidate: Candidate, seed: int, done: dict[str, list[float]]) -> None:
        if self.on_run is not None:
            self.on_run(candidate.label, seed - CONFIRM_SEED_BASE)
        # The same seed gives every candidate the same initial weights and batch order.
        try:
            metrics, _ = train_placement(self.config, self.data, self.normaliser, candidate.placement,
                                         candidate.variants, seed=seed, device=self.device)
            done[str(seed)] = [metrics.val_accuracy, metrics.gap]
        except TrainingDiverged:
            done[str(seed)] = [0.0, 0.0]

    def _train_pack(self, candidate: Candidate, seeds: list[int], done: dict[str, list[float]]) -> None:
        """Train ``candidate`` on ``seeds`` at once: each member built from its seed as its lone run
        is, and taking its batches in its seed's order, so the runs pair across candidates as lone
        runs do (only the dropout masks come from another stream, as they differ between placements
        anyway)."""
        if self.on_note is not None:
            first, last = seeds[0] - CONFIRM_SEED_BASE + 1, seeds[-1] - CONFIRM_SEED_BASE + 1
            self.on_note(f"training {candidate.label}, seeds {first}-{last} as one pack")
        members = [Member(seed, build_placed_model(self.config, self.data, candidate.placement, candidate.variants,
                                                   seed=seed), seed) for seed in seeds]
        trainer = PackTrainer(self.data, self.normaliser, self.config.train, device=self.device, seed=seeds[0],
                              build=self._build, capacity=len(seeds), own_batches=True)
        trainer.set_members(members)
        diverged: set[int] = set()
        last = []
        for _ in range(self.config.train.epochs):
            last = trainer.run_epoch()
            diverged |= {seed for seed, metrics in zip(seeds, last) if metrics.diverged}
        for seed, metrics in zip(seeds, last):
            if seed in diverged:  # as a lone run that diverged is scored
                done[str(seed)] = [0.0, 0.0]
            else:
                final, _ = trainer.finish(seed, metrics)
                done[str(seed)] = [final.val_accuracy, final.gap]

    def _build(self) -> Any:
        """Return a fresh network of the study's model (for a pack's members to be loaded into)."""
        return build_model(self.config.model, self.data.shape, model_args=self.config.model_args,
                           in_block=self.config.in_block)

    def result(self, candidate: Candidate, n_seeds: int | None = None) -> CandidateResult:
        """Return ``candidate``'s figures over its first ``n_seeds`` seeds (all it has by default)."""
        done = self.runs.get(candidate.key, {})
        seeds = sorted(int(s) for s in done)
        seeds = [s for s in seeds if s - CONFIRM_SEED_BASE < (n_seeds if n_seeds is not None else math.inf)]
        accuracies = [done[str(s)][0] for s in seeds]
        gaps = [done[str(s)][1] for s in seeds]
        mean, low, high = _mean_interval(accuracies)
        return CandidateResult(
            label=candidate.label, trial=candidate.trial, baseline=candidate.baseline,
            description=describe_placement(candidate.placement, candidate.variants), seeds=seeds,
            accuracies=accuracies, gaps=gaps, mean=mean, ci_low=low, ci_high=high,
            mean_gap=sum(gaps) / len(gaps) if gaps else 0.0,
        )


def _chosen_in_advance(candidates: list[Candidate]) -> tuple[Candidate, Candidate, Candidate | None]:
    """Return the placements the verdict compares, chosen from the search's ranking before any
    confirmation run: the best searched placement, no dropout, and the best other recipe.

    Choosing them from the confirmation's own runs would test the luckiest of several on the seeds
    that made it look best, and confirm placements that are no better more often than the stated
    rate; the other candidates are retrained to be shown, not to be chosen among.
    """
    searched = [c for c in candidates if c.baseline is None]
    recipes = [c for c in candidates if c.baseline not in (None, "none")]
    none = next(c for c in candidates if c.baseline == "none")
    return searched[0], none, (recipes[0] if recipes else None)


def confirm_fixed(trainer: CandidateTrainer, candidates: list[Candidate], n_seeds: int) -> Confirmation:
    """Train every candidate on ``n_seeds`` seeds and compare the search's best placement with no
    dropout and with the best recipe."""
    winner, _, recipe = _chosen_in_advance(candidates)
    for candidate in candidates:
        trainer.train(candidate, n_seeds)
    return summarize([trainer.result(c, n_seeds) for c in candidates], stopped="fixed", winner=winner.label,
                     recipe=None if recipe is None else recipe.label)


def confirm_sequentially(trainer: CandidateTrainer, candidates: list[Candidate], *,
                         max_seeds: int = MAX_SEEDS) -> Confirmation:
    """Train every candidate on MIN_SEEDS seeds, then add seeds to the search's best placement, no
    dropout and the best recipe until the winner's lead over no dropout is decided (its interval
    excludes zero), settled (its interval lies within DECISION_WIDTH), or ``max_seeds`` is reached."""
    winner, none, recipe = _chosen_in_advance(candidates)
    for candidate in candidates:
        trainer.train(candidate, MIN_SEEDS)
    followed = list({c.key: c for c in (winner, none, recipe) if c is not None}.values())
    level = 1.0 - pocock_alpha(MIN_SEEDS, max_seeds)
    n = MIN_SEEDS
    while True:
        stopped = _stopping_rule(compare(trainer.result(winner, n), trainer.result(none, n), level=level), n,
                                 max_seeds)
        if stopped is not None:
            break
        n += 1
        for candidate in followed:
            trainer.train(candidate, n)
    final = [trainer.result(c, n if c in followed else MIN_SEEDS) for c in candidates]
    return summarize(final, stopped=stopped, winner=winner.label, recipe=None if recipe is None else recipe.label,
                     level=level)


def _stopping_rule(comparison: Comparison, n: int, max_seeds: int) -> str | None:
    if comparison.significant:
        return "decided"
    if -DECISION_WIDTH < comparison.ci_low and comparison.ci_high < DECISION_WIDTH:
        return "settled"
    if n >= max_seeds:
        return "cap"
    return None


@lru_cache(maxsize=32)
def pocock_alpha(first: int, last: int, overall: float = SIGNIFICANCE, draws: int = 20000) -> float:
    """Return the two-sided level each look uses so that, looking after every seed from ``first`` to
    ``last`` and stopping at the first paired t-interval that excludes zero, a placement no better
    than its reference is called different with probability ``overall`` (Pocock's constant nominal
    level, found by simulating the looks with a fixed seed)."""
    from scipy import stats

    if last <= first:
        return overall
    rng = np.random.default_rng(0)
    differences = rng.standard_normal((draws, last))
    ns = np.arange(first, last + 1)
    t_values = [
        np.abs(differences[:, :n].mean(axis=1)) / (differences[:, :n].std(axis=1, ddof=1) / math.sqrt(n)) for n in ns
    ]

    def false_calls(alpha: float) -> float:
        crossed = np.zeros(draws, dtype=bool)
        for n, t in zip(ns, t_values):
            crossed |= t > stats.t.ppf(1 - alpha / 2, n - 1)
        return float(crossed.mean())

    # Bonferroni over the looks is always safe; one look's own level never is.
    low, high = overall / len(ns), overall
    for _ in range(30):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if false_calls(middle) < overall else (low, middle)
    return low


def _mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Return the mean and its Student-t interval at ``level``."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else 0.0
    return mean, mean - half, mean + half


def compare(winner: CandidateResult, reference: CandidateResult, *, level: float = 1 - SIGNIFICANCE) -> Comparison:
    """Paired t-test, over the seeds both have, of ``winner`` against ``reference``."""
    from scipy import stats

    common = [s for s in winner.seeds if s in reference.seeds]
    a = [winner.accuracies[winner.seeds.index(s)] for s in common]
    b = [reference.accuracies[reference.seeds.index(s)] for s in common]
    differences = [x - y for x, y in zip(a, b)]
    mean, low, high = _mean_interval(differences, level)
    if all(d == differences[0] for d in differences):
        # No spread: a t-test is undefined. Identical runs differ by nothing; a constant nonzero
        # difference over several seeds is as consistent as a difference can be.
        p_value = None if differences[0] == 0 else 0.0
    else:
        p_value = float(stats.ttest_rel(a, b).pvalue)
    significant = (low > 0 or high < 0) if p_value is not None else False
    return Comparison(winner.label, reference.label, len(common), mean, low, high, level, p_value, significant)


def summarize(results: list[CandidateResult], *, stopped: str, winner: str | None = None, recipe: str | None = None,
              level: float = 1 - SIGNIFICANCE) -> Confirmation:
    """Compare the searched winner with no dropout and with the best recipe, and say what it means."""
    seeds = sorted({s for r in results for s in r.seeds})
    searched = [r for r in results if r.baseline is None]
    none = next((r for r in results if r.baseline == "none"), None)
    if not searched or none is None:
        only = ", ".join(r.label for r in results) or "nothing"
        return Confirmation(seeds, results, None, None, stopped,
                            f"Nothing to compare: a searched placement and no dropout are both needed, but only "
                            f"{only} were retrained.")
    best = next((r for r in searched if r.label == winner), searched[0])
    comparison = compare(best, none, level=level)
    best_recipe = next((r for r in results if r.label == recipe and r.baseline not in (None, "none")), None)
    against = None if best_recipe is None else compare(best, best_recipe, level=level)
    return Confirmation(seeds, results, comparison, against, stopped, _verdict(comparison, best, against, stopped))


def _interval(c: Comparison) -> str:
    return f"{100 * c.level:.1f}% CI {100 * c.ci_low:+.1f} to {100 * c.ci_high:+.1f}"


def _verdict(c: Comparison, winner: CandidateResult, against: Comparison | None, stopped: str) -> str:
    diff = 100 * c.mean_difference
    how = {
        "decided": "the interval excludes zero",
        "settled": f"the interval lies within +-{100 * DECISION_WIDTH:.0f} point of zero",
        "cap": f"undecided at the cap of {c.n_seeds} seeds: autodrop confirm --seeds N with more would narrow it",
        "fixed": "as many seeds as asked",
    }[stopped]
    figures = f"{_interval(c)}, {c.n_seeds} seeds; {how}"
    if c.significant and c.mean_difference > 0:
        verdict = f"Confirmed: {winner.description} beats no dropout by {diff:+.1f} points ({figures})."
    elif c.significant:
        verdict = (f"Not confirmed: no dropout beats the best searched placement ({winner.description}) by "
                   f"{-diff:.1f} points ({figures}); its search score was luck.")
    else:
        verdict = (f"Within noise: the best searched placement ({winner.description}) and no dropout differ by "
                   f"{diff:+.1f} points ({figures}). No dropout is as good an answer.")
    if against is not None:
        recipe = against.reference
        gap = 100 * against.mean_difference
        if against.significant and against.mean_difference > 0:
            verdict += f" It also beats the best usual recipe, {recipe}, by {gap:+.1f} points ({_interval(against)})."
        elif against.significant:
            verdict += (f" The usual recipe {recipe} does better still, by {-gap:.1f} points ({_interval(against)}): "
                        "prefer it.")
        else:
            verdict += (f" Against the best usual recipe, {recipe}: {gap:+.1f} points ({_interval(against)}), "
                        "within noise: the simpler recipe is as good.")
    return verdict
