"""The one call that the CLI and notebooks share: data + model + space + training + study."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import optuna
import torch

from autodrop.config import SearchConfig, config_from_options, config_to_options, validate
from autodrop.data import ImageData, load_data
from autodrop.errors import ConfigError, ModelError
from autodrop.models import ModelShape, build_model, get_model_entry
from autodrop.report import BASELINE_ATTR, SearchResult, summarize_study
from autodrop.sites import apply_placement, site_kinds
from autodrop.space import baseline_placements, placement_to_params, suggest_placement
from autodrop.study import (
    DATA_ATTR,
    FINISHED_STATES,
    SITES_ATTR,
    count_finished,
    create_or_load_study,
    make_pruner,
    make_sampler,
    open_storage,
)
from autodrop.train import EpochMetrics, Normaliser, TrainingDiverged, resolve_device, train_trial
from autodrop.packed import PackTrainer, auto_pack_size, packing_problem

# A run that sees this many trials fail in a row stops: the cause is the settings, not bad luck.
MAX_CONSECUTIVE_FAILURES = 5


class Progress:
    """What a search reports while it runs; the default reports nothing."""

    def start(self, total: int, done: int) -> None: ...
    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None: ...
    def trial_done(self, best: float | None) -> None: ...
    def close(self) -> None: ...


class BarProgress(Progress):
    """A tqdm bar over trials showing the current trial, its epoch and the best accuracy so far."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._best: float | None = None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="trial", dynamic_ncols=True, leave=True)

    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None:
        best = "-" if self._best is None else f"{100 * self._best:.1f}%"
        self._bar.set_postfix_str(f"trial {trial} epoch {epoch}/{epochs} val {100 * val_accuracy:.1f}% best {best}")

    def trial_done(self, best: float | None) -> None:
        self._best = best
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def search(data: str | None = None, *, config: SearchConfig | None = None, progress: Progress | None = None,
           **options: Any) -> SearchResult:
    """Run (or resume) a search and return its answer.

    Either pass a ready ``config``, or ``data`` and any CLI option by its Python name
    (``trials=20``, ``image_size=16``, ``rate_range=(0.1, 0.5)``). The study ends with
    ``trials`` finished trials in total: a rerun adds only what is missing.
    """
    if config is None:
        if data is not None:
            options["data"] = str(data)
        config = config_from_options(options)
    elif data is not None or options:
        raise ConfigError("pass either config= or data and options, not both.")
    return run_search(validate(config), progress=progress or Progress())


def run_search(config: SearchConfig, *, progress: Progress) -> SearchResult:
    """Run the search ``config`` describes; the steps every entry point shares."""
    get_model_entry(config.model)  # an unknown name fails before any data is read
    device = resolve_device(config.train.device)
    _check_device(device)
    data = load_data(config.data)
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    sites = _probe_sites(config.model, shape)

    storage = open_storage(config.storage_url)
    study = create_or_load_study(
        storage,
        config.study_name,
        settings=config_to_options(config),
        sampler=make_sampler(config.seed),
        pruner=make_pruner(config.pruner, config.train.epochs),
    )
    _record_data_and_sites(study, data, sites)
    _enqueue_baselines(study, sites, config)

    remaining = config.trials - count_finished(study)
    if remaining > 0:
        pack = _pack_size(config, device, shape, remaining)
        if pack > 1:
            _run_packed_trials(study, config, data, sites, device, progress, pack)
        else:
            _run_trials(study, config, data, sites, device, progress)
    return summarize_study(study, config.storage_url)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this machine has no usable CUDA GPU; use --device cpu or auto.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for, but MPS is not available here; use --device cpu or auto.")


def _probe_sites(model_name: str, shape: ModelShape) -> dict[str, str]:
    """Build the model once to list its sites and check that it fits the data."""
    model = build_model(model_name, shape)
    kinds = site_kinds(model)
    if not kinds:
        raise ModelError(f"model {model_name!r} has no drop sites to search.")
    with torch.inference_mode():
        model.eval()
        try:
            out = model(torch.zeros(2, shape.channels, shape.image_size, shape.image_size))
        except RuntimeError as e:
            raise ModelError(
                f"model {model_name!r} cannot take {shape.channels}x{shape.image_size}x{shape.image_size} images: {e}"
            ) from e
    if tuple(out.shape) != (2, shape.n_classes):
        raise ModelError(
            f"model {model_name!r} gives outputs of shape {tuple(out.shape[1:])} per image, but the data has "
            f"{shape.n_classes} classes."
        )
    return kinds


def _record_data_and_sites(study: optuna.Study, data: ImageData, sites: dict[str, str]) -> None:
    stored_sites = study.user_attrs.get(SITES_ATTR)
    if stored_sites is not None and list(stored_sites.items()) != list(sites.items()):
        raise ConfigError(
            f"study {study.study_name!r} was searched over sites {list(stored_sites)}, but the model now has "
            f"{list(sites)}; use --study NEW_NAME for the changed model."
        )
    if stored_sites is None:
        study.set_user_attr(SITES_ATTR, sites)
        study.set_user_attr(
            DATA_ATTR,
            {
                "name": data.name,
                "classes": list(data.classes),
                "n_train": len(data.train_labels),
                "n_val": len(data.val_labels),
                "channels": data.channels,
                "image_size": data.image_size,
            },
        )


def _enqueue_baselines(study: optuna.Study, sites: dict[str, str], config: SearchConfig) -> None:
    """Queue each baseline recipe once; a rerun finds them already present and adds nothing."""
    present = {t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False)}
    for name, placement in baseline_placements(sites, config.rate_range)[: config.trials]:
        if name in present:
            continue
        study.enqueue_trial(placement_to_params(placement), user_attrs={BASELINE_ATTR: name}, skip_if_exists=True)


def _run_trials(
    study: optuna.Study,
    config: SearchConfig,
    data: ImageData,
    sites: dict[str, str],
    device: torch.device,
    progress: Progress,
) -> None:
    data_on_device = data.to(device)
    normaliser = Normaliser(data.train_images).to(device)
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    site_names = list(sites)
    epochs = config.train.epochs

    def objective(trial: optuna.Trial) -> float:
        placement = suggest_placement(trial, site_names, config.rate_range)
        # A retried trial inherits its seed from the attempt it replaces.
        seed = int(trial.user_attrs.get("seed", (config.seed * 1_000_003 + trial.number) % 2**31))
        trial.set_user_attr("seed", seed)
        is_baseline = BASELINE_ATTR in trial.user_attrs
        torch.manual_seed(seed)
        model = build_model(config.model, shape)
        apply_placement(model, placement)

        def on_epoch(m: EpochMetrics) -> None:
            trial.report(m.val_accuracy, m.epoch)
            trial.set_user_attr("train_loss", m.train_loss)
            trial.set_user_attr("val_loss", m.val_loss)
            trial.set_user_attr("epochs_run", m.epoch)
            progress.epoch(trial.number, m.epoch, epochs, m.val_accuracy)
            # Baselines are the yardstick: they always run to the end.
            if not is_baseline and m.epoch < epochs and trial.should_prune():
                trial.set_user_attr("pruned_reason", f"val accuracy {m.val_accuracy:.4f} at epoch {m.epoch}")
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

        try:
            metrics = train_trial(
                model, data_on_device, normaliser, config.train, seed=seed, device=device, on_epoch=on_epoch
            )
        except TrainingDiverged as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        trial.set_user_attr("train_accuracy", metrics.train_accuracy)
        trial.set_user_attr("train_loss", metrics.train_loss)
        trial.set_user_attr("val_loss", metrics.val_loss)
        trial.set_user_attr("gap", metrics.gap)
        return metrics.val_accuracy

    consecutive_failures = 0

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal consecutive_failures
        if trial.state in FINISHED_STATES:
            consecutive_failures = 0
            try:
                best = study.best_value
            except ValueError:
                best = None
            progress.trial_done(best)
        elif trial.state == optuna.trial.TrialState.FAIL:
            consecutive_failures += 1
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                study.stop()

    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    progress.start(config.trials, count_finished(study))
    try:
        while (remaining := config.trials - count_finished(study)) > 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=left,
                catch=(TrainingDiverged,),
                callbacks=[optuna.study.MaxTrialsCallback(config.trials, states=FINISHED_STATES), after_trial],
            )
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                last = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))[-1]
                reason = last.user_attrs.get("fail_reason", "see the study's failed trials")
                raise ConfigError(
                    f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row ({reason}); finished trials are kept. "
                    "Lower --lr or check the data, then rerun to resume."
                )
    finally:
        progress.close()



def _pack_size(config: SearchConfig, device: torch.device, shape: ModelShape, remaining: int) -> int:
    """Return how many trials to train at once: ``--pack``, or by device when not given."""
    problem = packing_problem(build_model(config.model, shape))
    if config.pack is None:
        return 1 if problem else auto_pack_size(device, remaining)
    if config.pack > 1 and problem:
        raise ConfigError(f"--pack {config.pack} cannot pack model {config.model!r}: {problem}; use --pack 1.")
    return config.pack


def _run_packed_trials(
    study: optuna.Study,
    config: SearchConfig,
    data: ImageData,
    sites: dict[str, str],
    device: torch.device,
    progress: Progress,
    pack: int,
) -> None:
    """Run trials ``pack`` at a time as one packed model, each asked and told as its own trial.

    Members share batches; at every epoch end each member is reported, and pruned, on its own.
    A finished, pruned or failed member's slot goes to the next asked trial, or the pack shrinks.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

    data_on_device = data.to(device)
    normaliser = Normaliser(data.train_images).to(device)
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    site_names = list(sites)
    epochs = config.train.epochs
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    first_number = len(study.get_trials(deepcopy=False))
    trainer = PackTrainer(
        data_on_device, normaliser, config.train, device=device,
        seed=(config.seed * 1_000_003 + first_number) % 2**31,
        build=lambda: build_model(config.model, shape),
    )
    active: dict[optuna.Trial, Any] = {}  # trial -> its heartbeat thread
    consecutive_failures = 0

    def may_ask() -> bool:
        if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return count_finished(study) + len(active) < config.trials

    def start_trial() -> tuple[optuna.Trial, torch.nn.Module, dict[str, float | None]]:
        with warnings.catch_warnings():
            # This loop beats for its trials itself, as Study.optimize does (hence the filter).
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if is_heartbeat_enabled(study._storage):
                optuna.storages.fail_stale_trials(study)
            trial = study.ask()
        placement = suggest_placement(trial, site_names, config.rate_range)
        seed = int(trial.user_attrs.get("seed", (config.seed * 1_000_003 + trial.number) % 2**31))
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("pack_size", pack)
        heartbeat = get_heartbeat_thread(trial._trial_id, study._storage)
        heartbeat.start()
        active[trial] = heartbeat
        torch.manual_seed(seed)  # the member's initial weights are those it would have alone
        return trial, build_model(config.model, shape), placement

    def finish(trial: optuna.Trial, state: optuna.trial.TrialState, value: float | None = None) -> None:
        nonlocal consecutive_failures
        active.pop(trial).join()
        study.tell(trial, value, state=state)
        if state == optuna.trial.TrialState.FAIL:
            consecutive_failures += 1
            return
        consecutive_failures = 0
        try:
            best = study.best_value
        except ValueError:
            best = None
        progress.trial_done(best)

    progress.start(config.trials, count_finished(study))
    try:
        members = []
        while len(members) < pack and may_ask():
            members.append(start_trial())
        if not members:
            return
        trainer.set_members(members)
        while len(trainer):
            epoch_metrics = trainer.epoch_metrics(trainer.train_epoch())
            done: list[optuna.Trial] = []
            last: dict[object, EpochMetrics] = {}
            for trial, m in zip(list(trainer.tags), epoch_metrics):
                assert isinstance(trial, optuna.Trial)
                if not math.isfinite(m.train_loss):
                    trial.set_user_attr("fail_reason", f"training loss became {m.train_loss} in epoch {m.epoch}")
                    finish(trial, optuna.trial.TrialState.FAIL)
                    done.append(trial)
                    continue
                trial.report(m.val_accuracy, m.epoch)
                trial.set_user_attr("train_loss", m.train_loss)
                trial.set_user_attr("val_loss", m.val_loss)
                trial.set_user_attr("epochs_run", m.epoch)
                progress.epoch(trial.number, m.epoch, epochs, m.val_accuracy)
                last[trial] = m
                if m.epoch >= epochs:
                    done.append(trial)
                elif BASELINE_ATTR not in trial.user_attrs and trial.should_prune():
                    # Baselines are the yardstick: they always run to the end.
                    trial.set_user_attr("pruned_reason", f"val accuracy {m.val_accuracy:.4f} at epoch {m.epoch}")
                    finish(trial, optuna.trial.TrialState.PRUNED)
                    done.append(trial)
            complete = [t for t in done if t in active]
            if complete:
                for trial, metrics in trainer.final_metrics(complete, last).items():
                    assert isinstance(trial, optuna.Trial)
                    trial.set_user_attr("train_accuracy", metrics.train_accuracy)
                    trial.set_user_attr("train_loss", metrics.train_loss)
                    trial.set_user_attr("val_loss", metrics.val_loss)
                    trial.set_user_attr("gap", metrics.gap)
                    finish(trial, optuna.trial.TrialState.COMPLETE, metrics.val_accuracy)
            leaving = []
            for trial in done:
                if may_ask():
                    new_trial, model, placement = start_trial()
                    trainer.replace(trial, new_trial, model, placement)
                else:
                    leaving.append(trial)
            if leaving:
                trainer.remove(leaving)
        if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            last_failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))[-1]
            reason = last_failed.user_attrs.get("fail_reason", "see the study's failed trials")
            raise ConfigError(
                f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row ({reason}); finished trials are kept. "
                "Lower --lr or check the data, then rerun to resume."
            )
    finally:
        # Interrupted or crashed: the members still training are failed, as optimize() would.
        for trial in list(active):
            try:
                finish(trial, optuna.trial.TrialState.FAIL)
            except Exception:  # the storage may be what failed; leave the trial to the heartbeat
                pass
        progress.close()
