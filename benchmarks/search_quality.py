"""How good are autodrop's answers? Planted cases made from the bundled digits, where the truth is known.

Cases (each made here, nothing downloaded):

- ``digits``: the full digits. No placement should beat no dropout beyond noise.
- ``scarce``: 20 training images per class. Dropout may help a little; the answer may be noise.
- ``noisy-labels``: 50 training images per class, 30% of them relabelled at random, trained long
  enough that the network memorises them without dropout. Dropout should help by several points.

For each case it runs, on the same budget: a search with no pruning (whose learning curves are
replayed to measure each pruner's regret: trials a pruner would have stopped that finished in the
top quartile), a search as the README runs it (noise pruner, grouped TPE), and the same with random
search; then ``confirm`` on the default search's study. It prints one table per question.

    PYTHONPATH=. python benchmarks/search_quality.py                 # all cases, the default sizes
    PYTHONPATH=. python benchmarks/search_quality.py --cases noisy-labels --trials 30
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from autodrop.api import search  # noqa: E402
from autodrop.run.pruning import NoisePruner, default_min_epoch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted import write_noisy_digits  # noqa: E402


@dataclass
class Case:
    """A planted case: the search options that make it, and what the right answer is."""

    name: str
    options: dict[str, Any]
    truth: str


def make_cases(root: Path, epochs: int, long_epochs: int) -> dict[str, Case]:
    """Return the planted cases; the noisy-labels one is written as an image folder under ``root``."""
    return {
        "digits": Case("digits", dict(data="digits", epochs=epochs), "no placement beats no dropout"),
        "scarce": Case("scarce", dict(data="digits", train_per_class=20, epochs=long_epochs),
                       "small data: any gain is modest"),
        "noisy-labels": Case("noisy-labels", dict(data=str(write_noisy_digits(root / "noisy-digits")),
                                                  epochs=long_epochs),
                             "dropout helps by several points"),
    }


@dataclass
class Run:
    """One search's outcome."""

    label: str
    seconds: float
    study: optuna.Study
    result: Any
    best_trial: int | None = None
    seconds_to_best: float | None = None
    epochs_trained: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_search(case: Case, storage: str, study: str, **overrides: Any) -> Run:
    options = dict(image_size=16, batch_size=64, seed=0, quiet=True, **case.options)
    options.update(overrides)
    options.pop("quiet")
    start = time.perf_counter()
    result = search(storage=storage, study=study, **options)
    seconds = time.perf_counter() - start
    loaded = optuna.load_study(study_name=study, storage=storage)
    trials = loaded.get_trials(deepcopy=False)
    run = Run(study, seconds, loaded, result, epochs_trained=sum(len(t.intermediate_values) for t in trials))
    if result.best is not None:
        best = next(t for t in trials if t.number == result.best.number)
        first = min(t.datetime_start for t in trials if t.datetime_start)
        run.best_trial = best.number
        run.seconds_to_best = (best.datetime_complete - first).total_seconds()
    return run


def replay(pruner: optuna.pruners.BasePruner, trials: list[optuna.trial.FrozenTrial], epochs: int) -> dict[str, Any]:
    """Replay ``pruner`` on the curves of a search that pruned nothing, trial by trial in order.

    Returns which trials it would have pruned (and at which epoch), how many of them finished in
    the top quartile of all trials, and the share of epochs it would have saved.
    """
    complete = [t for t in trials if t.state == TrialState.COMPLETE and len(t.intermediate_values) == epochs]
    finals = {t.number: t.value for t in complete}
    top_quartile = float(np.quantile(list(finals.values()), 0.75))
    ranked = sorted(finals.values(), reverse=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A fresh study run by the pruner, fed the recorded curves in their order: what it would have done.
    shadow = optuna.create_study(direction="maximize", pruner=pruner)
    pruned: dict[int, int] = {}
    for trial in complete:
        replayed = shadow.ask()
        baseline = "baseline" in trial.user_attrs
        for step in range(1, epochs + 1):
            replayed.report(trial.intermediate_values[step], step)
            # Baselines always run to the end, as in a search.
            if step < epochs and not baseline and replayed.should_prune():
                pruned[trial.number] = step
                shadow.tell(replayed, state=TrialState.PRUNED)
                break
        else:
            shadow.tell(replayed, trial.value)
    regret = [n for n in pruned if finals[n] >= top_quartile]
    lost_best = max(finals.values()) if not pruned else max(v for n, v in finals.items() if n not in pruned)
    saved = sum(epochs - at for at in pruned.values()) / (epochs * len(complete))
    return {"pruned": len(pruned), "of": len(complete) - sum("baseline" in t.user_attrs for t in complete),
            "top_quartile_pruned": len(regret), "saved": saved,
            "best_kept": lost_best, "best": ranked[0], "ranks_pruned": sorted(ranked.index(finals[n]) + 1 for n in pruned)}


def _lead(result: Any) -> float | None:
    none = next((b for b in result.baselines if b.baseline == "none" and b.state == "complete"), None)
    if none is None or result.best is None:
        return None
    return result.best.val_accuracy - none.val_accuracy


def _answer_row(label: str, run: Run) -> str:
    result = run.result
    lead = _lead(result)
    verdict = result.verdict.split(":", 1)[0] if ":" in result.verdict[:40] else result.verdict.split(".", 1)[0]
    searched = [t for t in result.trials if t.state == "complete" and t.baseline is None]
    best_searched = max((t.val_accuracy for t in searched), default=None)
    shown = "-" if best_searched is None else f"{100 * best_searched:.1f}%"
    return (f"  {label:<22} {run.seconds:>6.0f} {run.epochs_trained:>7} {100 * result.best.val_accuracy:>7.1f}% "
            f"{shown:>9} {'-' if lead is None else f'{100 * lead:+.1f}':>6} {str(run.best_trial):>6} "
            f"{run.seconds_to_best or 0:>7.0f}  {verdict:<17} {result.best.description}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits,scarce,noisy-labels")
    parser.add_argument("--trials", type=int, default=30, help="trials per search (baselines included)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial on the full digits")
    parser.add_argument("--long-epochs", type=int, default=12, help="epochs per trial on the small cases")
    parser.add_argument("--min-epochs", default="", help="also replay the noise pruner from these epochs (1,2,3)")
    parser.add_argument("--no-confirm", action="store_true", help="skip autodrop confirm (faster)")
    parser.add_argument("--augment", default="none",
                        help="train every search with this augmentation (e.g. crop; digits are not flipped)")
    parser.add_argument("--keep", default=None, help="folder to keep the studies in (default: a temporary one)")
    args = parser.parse_args()
    import torch

    from autodrop.run.confirm import confirm_study

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="autodrop-quality-"))
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / 'quality.db'}"
    started = time.perf_counter()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, optuna {optuna.__version__}; studies in {folder}")
    cases = make_cases(folder, args.epochs, args.long_epochs)
    if args.augment != "none":
        for case in cases.values():
            case.options["augment"] = args.augment
    for name in args.cases.split(","):
        case = cases[name]
        epochs = case.options["epochs"]
        print(f"\n== {name}: {case.truth} ({args.trials} trials, {epochs} epochs, 16x16 images, "
              f"augmentation {args.augment})")
        reference = run_search(case, storage, f"{name}-none", trials=args.trials, pruner="none")
        default = run_search(case, storage, f"{name}-default", trials=args.trials)
        # Another seed: TPE starts with random draws from its own seed, which would repeat these.
        random = run_search(case, storage, f"{name}-random", trials=args.trials, sampler="random", seed=1)
        print(f"  {'search':<22} {'sec':>6} {'epochs':>7} {'best':>8} {'searched':>9} {'lead':>6} {'trial':>6} "
              f"{'sec to':>7}  {'verdict':<17} best placement")
        print(_answer_row("TPE, noise pruner", default))
        print(_answer_row("random, noise pruner", random))
        print(_answer_row("TPE, no pruning", reference))
        print("  (searched: the best trial the sampler chose, baselines left out; lead: best minus its own no-dropout "
              "baseline, points; trial / sec to: when the best was found; one search each, so read TPE against "
              "random as one draw, not a verdict)")

        n_val = int(reference.result.data["n_val"])
        trials = reference.study.get_trials(deepcopy=False)
        half = max(1, math.ceil(epochs / 2))
        pruners = {
            f"noise (default, from epoch {default_min_epoch(epochs)})":
                NoisePruner(n_val, min_epoch=default_min_epoch(epochs)),
            f"noise from half the epochs (epoch {half})": NoisePruner(n_val, min_epoch=half),
            "median (5 start-up, warm-up epochs//4)": optuna.pruners.MedianPruner(
                n_startup_trials=5, n_warmup_steps=max(1, epochs // 4)),
            "hyperband (min 1, max epochs, factor 3)": optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=epochs, reduction_factor=3),
        }
        for k in [int(k) for k in args.min_epochs.split(",") if k]:
            pruners[f"noise from epoch {k}"] = NoisePruner(n_val, min_epoch=k)
        print(f"  {'pruner, replayed on the no-pruning run':<44} {'pruned':>9} {'top-quartile':>13} {'saved':>6}"
              f"  ranks pruned")
        for label, pruner in pruners.items():
            r = replay(pruner, trials, epochs)
            print(f"  {label:<44} {r['pruned']:>4} of {r['of']:<3} {r['top_quartile_pruned']:>13} "
                  f"{100 * r['saved']:>5.0f}%  {r['ranks_pruned']}")
        if not args.no_confirm:
            start = time.perf_counter()
            data = case.options["data"]
            confirmation = confirm_study(default.study.study_name, storage, top=3, device="cpu",
                                         data=None if data == "digits" else data)
            c = confirmation.comparison
            print(f"  confirm ({time.perf_counter() - start:.0f} s, {c.n_seeds} seeds, stopped: {confirmation.stopped}): "
                  f"lead over no dropout {100 * c.mean_difference:+.1f} points "
                  f"({100 * c.level:.1f}% CI {100 * c.ci_low:+.1f} to {100 * c.ci_high:+.1f})")
            print(f"  {confirmation.verdict}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
