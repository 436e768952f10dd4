"""The one call that the CLI and notebooks share: data + model + space + training + study.

Named pipeline, not search, so that the module never shadows the function ``autodrop.search``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import warnings
from typing import Any, Callable

import optuna
import torch
from torch import nn

from autodrop.artifacts import keep_weights_if_top, prepare_records, save_trial_note
from autodrop.checkpoint import CHECKPOINT_ATTR, TrialCheckpoint, remove_checkpoint
from autodrop.config import SearchConfig, config_from_options, config_to_options, validate
from autodrop.data import ImageData, load_data
from autodrop.errors import AutodropError, AutodropWarning, ConfigError, ModelError
from autodrop.locking import StorageLock
from autodrop.models import ModelShape, build_model, check_model
from autodrop.packed import PackTrainer, auto_pack_size, packing_problem
from autodrop.usermodel import is_user_model
from autodrop.report import BASELINE_ATTR, SearchResult, summarize_study
from autodrop.sites import apply_placement, site_kinds, site_orders
from autodrop.space import (
    Placement,
    Variants,
    baseline_placements,
    default_variants,
    placement_to_params,
    suggest_placement,
    suggest_variants,
    variant_choices,
)
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
from autodrop.train import EpochMetrics, Normaliser, TrainingDiverged, TrialMetrics, resolve_device, train_trial
from autodrop.workers import (
    Heartbeat,
    Interrupted,
    StartRule,
    admit_trials,
    claim_trial,
    critical,
    entering_last_epoch,
    fail_and_requeue,
    handle_stop_signals,
    poll_interval,
    run_processes,
    run_trials,
    tell_trial,
)

# A run that sees this many trials fail in a row stops: the cause is the settings, not bad luck.
MAX_CONSECUTIVE_FAILURES = 5


class Progress:
    """What a search reports while it runs; the default reports nothing."""

    def start(self, total: int, done: int) -> None: ...
    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None: ...
    def trial_done(self, best: float | None) -> None: ...
    def waiting(self, n_running: int) -> None: ...
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

    def waiting(self, n_running: int) -> None:
        self._bar.set_postfix_str(f"waiting for {n_running} running trial(s) of other workers")

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
    prepared = prepare_study(config)
    if config.trials - count_finished(prepared.study) > 0:
        if config.workers == 1:
            _run_trials(prepared, config, resolve_device(config.worker_devices()[0]), progress)
        else:
            _run_worker_processes(prepared, config, progress)
    return summarize_study(prepared.study, config.storage_url)


@dataclasses.dataclass(frozen=True)
class PreparedStudy:
    """A study ready for workers, with what every worker needs to train its trials."""

    study: optuna.Study
    storage: Any  # the RDB storage under the study, for heartbeats
    data: ImageData
    sites: dict[str, str]  # site -> kind, in forward order
    choices: dict[str, Any]  # the dropout variants each site may take
    packing_problem: str | None  # why the model's trials cannot be packed, or None if they can


def prepare_study(config: SearchConfig) -> PreparedStudy:
    """Check model, devices and data, then create (or load) the study with its baselines queued.

    Safe to call from many processes at once: creating the study happens once, under a lock on its
    storage; the others find it and check that their settings match.
    """
    check_model(config.model, config.model_args)  # an unknown model fails before any data is read
    for name in sorted(set(config.worker_devices())):
        _check_device(resolve_device(name))
    data = load_data(config.data)
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    sites, orders, problem = _probe_sites(config.model, shape, config.model_args)
    if config.pack is not None and config.pack > 1 and problem is not None:
        raise ConfigError(f"--pack {config.pack}: this model's trials cannot be packed ({problem}); use --pack 1.")
    # A user's network keeps the flavour of the dropout it was written with, so the dropout kind
    # is searched for the built-in models only.
    kinds = config.kinds if not is_user_model(config.model) else ("element",)
    choices = variant_choices(sites, orders, kinds, config.orders)

    # One process at a time creates tables, study, attributes and baselines; the others then find them.
    with StorageLock(config.storage_url, "set-up").hold():
        storage = open_storage(config.storage_url)
        study = create_or_load_study(
            storage,
            config.study_name,
            settings=config_to_options(config),
            sampler=make_sampler(config.seed),
            pruner=make_pruner(config.pruner, config.train.epochs),
        )
        _record_data_and_sites(study, data, sites)
        _enqueue_baselines(study, sites, choices, config)
    return PreparedStudy(study, storage, data, sites, choices, problem)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this machine has no usable CUDA GPU; use --device cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {str(device)!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for, but MPS is not available here; use --device cpu or auto.")


def _probe_sites(
    model_name: str, shape: ModelShape, model_args: dict[str, Any]
) -> tuple[dict[str, str], dict[str, tuple[str, ...]], str | None]:
    """Build the model once to list its sites (and their slots), check that it fits the data, and
    say why its trials could not be packed (None if they can)."""
    model = build_model(model_name, shape, model_args=model_args)
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
    return kinds, site_orders(model), packing_problem(model)


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


def _enqueue_baselines(
    study: optuna.Study, sites: dict[str, str], choices: dict[str, Any], config: SearchConfig
) -> None:
    """Queue each baseline recipe once; a rerun finds them already present and adds nothing."""
    present = {t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False)}
    for name, placement in baseline_placements(sites, config.rate_range)[: config.trials]:
        if name in present:
            continue
        # The recipes are plain dropout: element-wise, after the activation.
        params = placement_to_params(placement, default_variants(placement, choices))
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: name}, skip_if_exists=True)


def _run_trials(
    prepared: PreparedStudy,
    config: SearchConfig,
    device: torch.device,
    progress: Progress,
    *,
    parent_pid: int | None = None,
) -> None:
    """Run this process's share of the trials on ``device``: packed several at a time where
    ``--pack`` (or, on a GPU, the automatic choice) asks for it and the model allows, else one by one."""
    # An explicit --pack on a model that cannot be packed was refused in prepare_study.
    (pack,) = worker_pack_sizes(config, [device], prepared.packing_problem)
    run = _TrialRun(prepared, config, device, progress)
    progress.start(config.trials, count_finished(prepared.study))
    try:
        if pack > 1:
            run.packed(pack, parent_pid=parent_pid)
        else:
            run.one_by_one(parent_pid=parent_pid)
        run.raise_if_failing()
    finally:
        progress.close()


@dataclasses.dataclass
class _TrialSetup:
    """One trial as the study asked for it: placement, variants, seed and the model built from them."""

    trial: optuna.Trial
    placement: Placement
    variants: Variants
    seed: int
    baseline: str | None  # the recipe's name, for a baseline trial
    model: nn.Module
    reported_steps: frozenset[int] = frozenset()  # steps a retry inherited, not reported again


class _TrialRun:
    """What one process needs to train trials on a device, and the record-keeping every trial shares."""

    def __init__(self, prepared: PreparedStudy, config: SearchConfig, device: torch.device,
                 progress: Progress) -> None:
        self.prepared, self.config, self.device, self.progress = prepared, config, device, progress
        self.study, self.storage = prepared.study, prepared.storage
        self.data = prepared.data.to(device)
        self.normaliser = Normaliser(prepared.data.train_images).to(device)
        self.weights_store = prepare_records(
            self.study, storage_url=config.storage_url, artifact_dir=config.artifact_dir, normaliser=self.normaliser
        )
        self.shape = ModelShape(prepared.data.channels, prepared.data.n_classes, prepared.data.image_size)
        self.epochs = config.train.epochs
        self.lock = StorageLock(config.storage_url, f"admit:{config.study_name}")
        self.consecutive_failures = 0
        self.gave_up = False  # once set, stays: members still training may finish, none start

    # --- what every trial goes through -------------------------------------------------------

    def build(self) -> nn.Module:
        return build_model(self.config.model, self.shape, model_args=self.config.model_args)

    def set_up(self, trial: optuna.Trial) -> _TrialSetup:
        placement = suggest_placement(trial, list(self.prepared.sites), self.config.rate_range)
        variants = suggest_variants(trial, placement, self.prepared.choices)
        # A retried trial inherits its seed from the attempt it replaces.
        seed = int(trial.user_attrs.get("seed", (self.config.seed * 1_000_003 + trial.number) % 2**31))
        trial.set_user_attr("seed", seed)
        torch.manual_seed(seed)
        model = self.build()
        apply_placement(model, placement, variants)
        return _TrialSetup(trial, placement, variants, seed, trial.user_attrs.get(BASELINE_ATTR), model)

    def record_epoch(self, setup: _TrialSetup, m: EpochMetrics, *, report: bool = True) -> None:
        """Put epoch ``m`` on record; raise TrialPruned if the pruner stops the trial here."""
        trial = setup.trial
        if report:
            trial.report(m.val_accuracy, m.epoch)
        trial.set_user_attr("train_loss", m.train_loss)
        trial.set_user_attr("val_loss", m.val_loss)
        trial.set_user_attr("epochs_run", m.epoch)
        self.progress.epoch(trial.number, m.epoch, self.epochs, m.val_accuracy)
        # Baselines are the yardstick: they always run to the end.
        if setup.baseline is None and m.epoch < self.epochs and trial.should_prune():
            trial.set_user_attr("pruned_reason", f"val accuracy {m.val_accuracy:.4f} at epoch {m.epoch}")
            save_trial_note(trial, setup.placement, baseline=setup.baseline, val_accuracy=m.val_accuracy,
                            pruned_at=m.epoch, variants=setup.variants)
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    def record_divergence(self, setup: _TrialSetup, error: TrainingDiverged) -> None:
        setup.trial.set_user_attr("fail_reason", str(error))
        save_trial_note(setup.trial, setup.placement, baseline=setup.baseline, failure=str(error),
                        variants=setup.variants)

    def record_finish(self, setup: _TrialSetup, metrics: TrialMetrics, model: nn.Module) -> None:
        trial = setup.trial
        trial.set_user_attr("train_accuracy", metrics.train_accuracy)
        trial.set_user_attr("train_loss", metrics.train_loss)
        trial.set_user_attr("val_loss", metrics.val_loss)
        trial.set_user_attr("gap", metrics.gap)
        save_trial_note(trial, setup.placement, baseline=setup.baseline, val_accuracy=metrics.val_accuracy,
                        train_accuracy=metrics.train_accuracy, variants=setup.variants)
        keep_weights_if_top(self.study, trial, model, metrics.val_accuracy, store=self.weights_store)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Only an interrupted or dead worker's trial is retried; every other outcome is final.
        if trial.user_attrs.get(CHECKPOINT_ATTR):
            remove_checkpoint(trial.user_attrs[CHECKPOINT_ATTR])
        if trial.state in FINISHED_STATES:
            self.consecutive_failures = 0
            try:
                best = study.best_value
            except ValueError:
                best = None
            self.progress.trial_done(best)
        elif trial.state == optuna.trial.TrialState.FAIL:
            self.consecutive_failures += 1

    def keep_going(self) -> bool:
        self.gave_up = self.gave_up or self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES
        return not self.gave_up

    def raise_if_failing(self) -> None:
        if self.keep_going():
            return
        last = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))[-1]
        reason = last.user_attrs.get("fail_reason") or "see the study's failed trials"
        raise ConfigError(
            f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row ({reason}); finished trials are kept. "
            "Lower --lr or check the data, then rerun to resume."
        )

    # --- one trial at a time ------------------------------------------------------------------

    def one_by_one(self, *, parent_pid: int | None) -> None:
        run_trials(
            self.study,
            self.storage,
            self.objective,
            n_trials=self.config.trials,
            lock=self.lock,
            timeout=self.config.timeout,
            catch=(TrainingDiverged,),
            after_trial=self.after_trial,
            keep_going=self.keep_going,
            on_wait=self.progress.waiting,
            parent_pid=parent_pid,
        )

    def objective(self, trial: optuna.Trial) -> float:
        setup = self.set_up(trial)
        # A retry of a trial whose worker died resumes after the last epoch that worker finished.
        checkpoint = TrialCheckpoint.for_trial(trial, self.config.checkpoint_root, self.device)

        def on_epoch(m: EpochMetrics) -> None:
            with critical():  # a stop signal waits until the epoch is on record
                self.record_epoch(setup, m, report=m.epoch not in checkpoint.reported_steps)
                if m.epoch == self.epochs - 1:
                    entering_last_epoch()

        def on_checkpoint(state: Any) -> None:
            with critical():
                checkpoint.save(state)

        if checkpoint.resume is not None:
            # The dead worker may have saved this epoch but not reported it, or not asked the pruner.
            on_epoch(checkpoint.resume.metrics)
        elif self.epochs == 1:
            entering_last_epoch()
        try:
            metrics = train_trial(
                setup.model, self.data, self.normaliser, self.config.train, seed=setup.seed, device=self.device,
                on_epoch=on_epoch, resume=checkpoint.resume, on_checkpoint=on_checkpoint,
            )
        except TrainingDiverged as e:
            self.record_divergence(setup, e)
            raise
        self.record_finish(setup, metrics, setup.model)
        return metrics.val_accuracy

    # --- several trials packed into one network -----------------------------------------------

    def packed(self, pack: int, *, parent_pid: int | None) -> None:
        """Train up to ``pack`` trials at once (autodrop.packed) until the study has its trials.

        Each member is a normal trial: admitted under the study's lock like any other, reported
        and pruned on its own at every epoch, and told when it ends; its slot then goes to the next
        admitted trial. Members keep no checkpoints: a stopped or dead worker's members are
        re-queued and start again from their first epoch.
        """
        config, study, storage = self.config, self.study, self.storage
        trainer = PackTrainer(self.data, self.normaliser, config.train, device=self.device, seed=config.seed,
                              build=self.build)
        members: dict[int, _TrialSetup] = {}  # by trial number, which is each member's tag
        start_rule = StartRule(config.timeout, self.keep_going, parent_pid)
        study_id = storage.get_study_id_from_name(study.study_name)
        poll_s = poll_interval(storage)

        def tell(tag: int, state: optuna.trial.TrialState, value: float | None = None,
                 error: BaseException | None = None) -> None:
            setup = members.pop(tag, None)
            if setup is None:  # told already
                return
            frozen = tell_trial(study, storage, setup.trial, value, state, error, catch=(TrainingDiverged,))
            if frozen is not None:
                self.after_trial(study, frozen)

        with handle_stop_signals() as guard, Heartbeat(
            storage, lambda: [setup.trial._trial_id for setup in list(members.values())]
        ):
            try:
                done: list[int] = []
                while True:
                    if guard.requested is not None:
                        raise Interrupted(guard.requested)
                    may_start = start_rule()
                    started: list[optuna.Trial] = []
                    n_finished = n_running = 0
                    if may_start:
                        with guard.critical():
                            started, n_finished, n_running = admit_trials(
                                study, storage, study_id, self.lock, config.trials,
                                limit=pack - (len(trainer) - len(done)),
                            )
                            for trial in started:
                                claim_trial(trial, packed=True)
                            for trial in started:
                                try:
                                    setup = self.set_up(trial)
                                    # A lone trial's retry inherits the steps its checkpoint resumed
                                    # after; a member starts over and reports only the steps after them.
                                    inherited = storage.get_trial(trial._trial_id).intermediate_values
                                    members[trial.number] = dataclasses.replace(setup, reported_steps=frozenset(inherited))
                                except Exception as e:
                                    # This trial fails; the others admitted with it go back to the
                                    # queue here, the members below.
                                    tell_trial(study, storage, trial, None, optuna.trial.TrialState.FAIL, e,
                                               catch=(Exception,))
                                    with self.lock.hold():
                                        for other in started:
                                            if other is not trial and other.number not in members:
                                                fail_and_requeue(study, storage, other,
                                                                 f"its pack stopped on {type(e).__name__}: {e}")
                                    raise
                    trainer.update(done, [(t.number, members[t.number].model) for t in started])
                    done = []
                    if not len(trainer):
                        if not may_start or n_finished >= config.trials:
                            return
                        self.progress.waiting(n_running)  # the trials still needed run elsewhere
                        guard.wakeup.wait(poll_s)
                        continue
                    # A first stop signal lets a pack whose members are all in their last epoch finish.
                    guard.finishing = all(trainer.epoch_of(tag) == self.epochs - 1 for tag in trainer.tags)
                    guard.in_trial = True
                    try:
                        guard.raise_if_stopping()
                        epoch_metrics = trainer.epoch_metrics(trainer.train_epoch())
                    finally:
                        guard.in_trial = False
                    for tag, m in zip(trainer.tags, epoch_metrics):
                        with guard.critical():
                            if self._member_epoch_ended(trainer, members[tag], m, tell):
                                done.append(tag)
            except BaseException as e:
                # The members not yet told are queued again, with the reason, for a rerun or another
                # worker: a stop is no fault of theirs, and neither is an error the whole pack hit
                # (a newly admitted trial that could not be set up has been failed above).
                stop = e if isinstance(e, Interrupted) else (
                    Interrupted(signal.SIGINT) if isinstance(e, KeyboardInterrupt) else None
                )
                reason = f"interrupted by {stop.signal_name}" if stop is not None else (
                    f"its pack stopped on {type(e).__name__}: {e}"
                )
                if members:
                    with critical(), self.lock.hold():
                        for tag in list(members):
                            fail_and_requeue(study, storage, members.pop(tag).trial, reason)
                if stop is not None and stop is not e:
                    raise stop from e
                raise

    def _member_epoch_ended(self, trainer: PackTrainer, setup: _TrialSetup, m: EpochMetrics,
                            tell: Callable[..., None]) -> bool:
        """Record a pack member's epoch; tell the study if the member ends here, and say whether it did."""
        tag = setup.trial.number
        try:
            if not math.isfinite(m.train_loss):
                error = TrainingDiverged(f"training loss became {m.train_loss} in epoch {m.epoch}")
                self.record_divergence(setup, error)
                tell(tag, optuna.trial.TrialState.FAIL, error=error)
                return True
            try:
                self.record_epoch(setup, m, report=m.epoch not in setup.reported_steps)
            except optuna.TrialPruned:
                tell(tag, optuna.trial.TrialState.PRUNED)
                return True
            if m.epoch < self.epochs:
                return False
            metrics, model = trainer.finish(tag, m)
            self.record_finish(setup, metrics, model)
            tell(tag, optuna.trial.TrialState.COMPLETE, metrics.val_accuracy)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            # Another worker took this member for dead and queued its retry: leave the trial to it.
            tell(tag, optuna.trial.TrialState.FAIL, error=e)
        return True


def worker_pack_sizes(config: SearchConfig, devices: list[torch.device], packing_problem: str | None) -> list[int]:
    """Return each worker's pack size: ``--pack`` if given, else automatic, with the workers on one
    GPU sharing its size; 1 for all (with one warning) when the model cannot be packed."""
    if config.pack is not None:
        return [config.pack] * len(devices)
    packs = [auto_pack_size(d, config.trials, n_workers=devices.count(d)) for d in devices]
    if packing_problem is not None and max(packs, default=1) > 1:
        warnings.warn(f"trials run one at a time: this model cannot be packed ({packing_problem})",
                      AutodropWarning, stacklevel=2)
        return [1] * len(devices)
    return packs


def _run_worker_processes(prepared: PreparedStudy, config: SearchConfig, progress: Progress) -> None:
    """Run ``config.workers`` worker processes on the study and follow them until they stop."""
    study = prepared.study
    devices = config.worker_devices()
    if not config.devices and resolve_device(config.train.device).type == "cuda" and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(config.workers)]
    n_cpu_workers = sum(resolve_device(d).type == "cpu" for d in devices)
    # Workers training on the CPU share its cores instead of each taking all of them.
    threads = max(1, torch.get_num_threads() // max(n_cpu_workers, 1))
    base = dataclasses.replace(config, storage=config.storage_url, study=config.study_name, workers=1, devices=())
    resolved = [resolve_device(d) for d in devices]
    packs = worker_pack_sizes(config, resolved, prepared.packing_problem)
    args = [
        (dataclasses.replace(base, train=dataclasses.replace(config.train, device=name), pack=pack),
         index, threads, os.getpid())
        for index, (name, pack) in enumerate(zip(devices, packs))
    ]
    done = count_finished(study)
    progress.start(config.trials, done)

    def follow() -> None:
        nonlocal done
        now = count_finished(study)
        if now > done:
            try:
                best = study.best_value
            except ValueError:
                best = None
            for _ in range(now - done):
                progress.trial_done(best)
            done = now

    try:
        codes = run_processes(_worker_main, args, poll=follow)
        follow()
    finally:
        progress.close()
    failed = [f"worker {i} (exit code {code})" for i, code in enumerate(codes) if code != 0]
    if failed and count_finished(study) < config.trials:
        raise AutodropError(
            f"{', '.join(failed)} stopped before the study had {config.trials} finished trials (see the messages "
            "above); finished trials are kept, rerun the same command to resume."
        )


def _worker_main(config: SearchConfig, index: int, threads: int, parent_pid: int) -> None:
    """One worker process of ``--workers``: join the study and run trials until it is done."""
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.showwarning = functools.partial(_show_worker_warning, index)
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        _run_trials(prepare_study(config), config, device, Progress(), parent_pid=parent_pid)
    except Interrupted as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before this worker's signal handlers were in place
        sys.exit(130)
    except AutodropError as e:
        print(f"Error: worker {index}: {e}", file=sys.stderr)
        sys.exit(2)


def _show_worker_warning(index: int, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"Warning: worker {index}: {message}", file=sys.stderr)
