"""A search's trials as the scheduler trains them: set up from the study, put on record every epoch.

:class:`StudyTrials` is the :class:`~autodrop.run.scheduler.TrialRunner` of a search. It asks each
admitted trial for its placement, builds and places its network ("seed, build, place":
autodrop/training/placement.py), hands it to a trainer (one trial at a time with per-epoch
checkpoints, or a pack), and after every epoch reports it, asks the pruner, and at the end keeps
its figures, its note and, if it ranks among the best, its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna
import torch
from torch import nn

from autodrop.config import SearchConfig
from autodrop.errors import ConfigError, StorageError
from autodrop.nets.build import build_model
from autodrop.run import records
from autodrop.run.artifacts import keep_weights_if_top, prepare_records, save_trial_note
from autodrop.run.checkpoints import TrialCheckpoint
from autodrop.run.locking import StorageLock
from autodrop.run.progress import Progress
from autodrop.run.records import Placement, Variants
from autodrop.run.scheduler import Outcome, TrialRunner
from autodrop.run.space import suggest_placement, suggest_variants
from autodrop.run.study import FINISHED_STATES, best_value
from autodrop.training.data import place_data
from autodrop.training.loop import EpochMetrics, Member, MemberTrainer, SoloTrainer, TrainingDiverged, TrialMetrics
from autodrop.training.normaliser import Normaliser
from autodrop.training.packed import PackTrainer
from autodrop.training.placement import build_placed_model

# A run that sees this many trials fail in a row stops: the cause is the settings, not bad luck.
MAX_CONSECUTIVE_FAILURES = 5


def trial_seed(search_seed: int, number: int) -> int:
    """Return the seed of trial ``number`` in a search seeded with ``search_seed``."""
    return (search_seed * 1_000_003 + number) % 2**31


class RefusedTrial(StorageError):
    """A queued trial holds parameters or a seed autodrop would not ask for: it fails, the worker goes on."""


@dataclasses.dataclass
class TrialSetup:
    """One trial as the study asked for it, and how far it got."""

    trial: optuna.Trial
    placement: Placement
    variants: Variants
    seed: int
    baseline: str | None  # the recipe's name, for a baseline trial
    model: nn.Module
    reported_steps: frozenset[int] = frozenset()  # steps a retry inherited, not reported again
    checkpoint: TrialCheckpoint | None = None  # None for a packed trial
    epochs_done: int = 0


class StudyTrials(TrialRunner):
    """The trials of one search that this process trains on ``device``, ``pack`` at a time."""

    catch = (TrainingDiverged, RefusedTrial)

    def __init__(self, prepared: Any, config: SearchConfig, device: torch.device, progress: Progress, *,
                 pack: int) -> None:
        self.prepared, self.config, self.device, self.progress = prepared, config, device, progress
        self.study, self.storage = prepared.study, prepared.storage
        self.data = place_data(prepared.data, device, config.train.data_on_device)
        self.normaliser = Normaliser(prepared.data.train_images).to(device)
        self.weights_store = prepare_records(
            self.study, storage_url=config.storage_url, override=config.artifact_dir, normaliser=self.normaliser
        )
        self.epochs = config.train.epochs
        self.lock = StorageLock(config.storage_url, f"admit:{config.study_name}")
        self.trainer: MemberTrainer
        if pack > 1:
            self.trainer = PackTrainer(self.data, self.normaliser, config.train, device=device, seed=config.seed,
                                       build=self.build, capacity=pack)
        else:
            self.trainer = SoloTrainer(self.data, self.normaliser, config.train, device=device)
        self.capacity, self.packed = self.trainer.capacity, self.trainer.packed
        self.members: dict[int, TrialSetup] = {}  # by trial number, which is each member's tag
        # By trial number, until this worker tells the trial how it ended (then the file goes) or
        # queues it again (then its retry resumes from the file).
        self.checkpoints: dict[int, TrialCheckpoint] = {}
        self.joining: list[Member] = []
        self.leaving: list[int] = []
        self.consecutive_failures = 0
        self.refused: set[int] = set()  # trials failed at set-up for what was queued: not the settings' fault
        self.gave_up = False  # once set, stays: members still training may finish, none start

    def build(self) -> nn.Module:
        """Return a fresh network of the search's model (for a pack's members to be loaded into)."""
        return build_model(self.config.model, self.data.shape, model_args=self.config.model_args,
                           in_block=self.config.in_block)

    # --- what the scheduler calls -------------------------------------------------------------

    def running(self) -> list[optuna.Trial]:
        return [setup.trial for setup in list(self.members.values())]  # a snapshot: the heartbeat reads it

    def start(self, trial: optuna.Trial) -> Outcome | None:
        try:
            setup = self.set_up(trial)
        except RefusedTrial as e:
            # Anyone who can write to the study can queue trials: one that asks for what no search
            # would (a rate of 7, an unknown kind, a seed that is not a number) ends here, with why.
            self.refused.add(trial.number)
            trial.set_user_attr(records.FAIL_REASON, str(e))
            return Outcome(optuna.trial.TrialState.FAIL, error=e)
        # A retry inherits the steps its predecessor reported: they are not reported again.
        setup.reported_steps = frozenset(self.storage.get_trial(trial._trial_id).intermediate_values)
        self.members[trial.number] = setup
        if self.packed:  # a packed member keeps no checkpoint: it starts over
            self.joining.append(Member(trial.number, setup.model, setup.seed))
            return None
        # A retry of a trial whose worker died or stopped resumes after the last epoch it saved.
        setup.checkpoint = TrialCheckpoint.for_trial(
            trial, root=self.config.checkpoint_root, uuid=self.prepared.uuid,
            placement_key=records.placement_key(setup.placement, setup.variants), seed=setup.seed,
            epochs=self.epochs, device=self.device,
        )
        self.checkpoints[trial.number] = setup.checkpoint
        resume = setup.checkpoint.resume
        self.trainer.update(self.leaving, [Member(trial.number, setup.model, setup.seed, resume)])
        self.leaving = []
        if resume is None:
            return None
        # The predecessor may have saved this epoch but not reported it, or not asked the pruner.
        setup.epochs_done = resume.metrics.epoch
        return self._epoch_ended(setup, resume.metrics)

    def in_last_step(self) -> bool:
        return all(setup.epochs_done == self.epochs - 1 for setup in self.members.values())

    def step(self) -> list[tuple[optuna.Trial, EpochMetrics]]:
        self.trainer.update(self.leaving, self.joining)
        self.leaving, self.joining = [], []
        metrics = self.trainer.run_epoch()
        return [(self.members[tag].trial, m) for tag, m in zip(self.trainer.tags, metrics)]

    def record(self, trial: optuna.Trial, result: EpochMetrics) -> Outcome | None:
        setup = self.members[trial.number]
        setup.epochs_done = result.epoch
        if not result.diverged and setup.checkpoint is not None:
            setup.checkpoint.save(self.trainer.state(trial.number))
        return self._epoch_ended(setup, result)

    def forget(self, trial: optuna.Trial) -> None:
        number = trial.number
        if self.members.pop(number, None) is None:
            return
        joining = [m for m in self.joining if m.tag != number]
        if len(joining) == len(self.joining):
            self.leaving.append(number)
        self.joining = joining

    def after(self, trial: optuna.trial.FrozenTrial) -> None:
        # Only an interrupted or dead worker's trial is retried; every other outcome, a failure
        # included, is final: its checkpoint goes, so no later trial ever finds it.
        checkpoint = self.checkpoints.pop(trial.number, None)
        if checkpoint is not None:
            checkpoint.remove()
        if trial.state in FINISHED_STATES:
            self.consecutive_failures = 0
            best = best_value(self.study)
            self.progress.trial_done(best)
        elif trial.state == optuna.trial.TrialState.FAIL and trial.number not in self.refused:
            # A refused queued trial says nothing about the settings: it does not count toward giving up.
            self.consecutive_failures += 1
        self.refused.discard(trial.number)

    def keep_going(self) -> bool:
        self.gave_up = self.gave_up or self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES
        return not self.gave_up

    def raise_if_failing(self) -> None:
        """Raise ConfigError, with the last failure's reason, if the run gave up on failures."""
        if self.keep_going():
            return
        last = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))[-1]
        reason = last.user_attrs.get(records.FAIL_REASON) or "see the study's failed trials"
        raise ConfigError(
            f"{MAX_CONSECUTIVE_FAILURES} trials failed in a row ({reason}); finished trials are kept. "
            "Lower --lr or check the data, then rerun to resume."
        )

    # --- what every trial goes through --------------------------------------------------------

    def set_up(self, trial: optuna.Trial) -> TrialSetup:
        """Ask ``trial`` for its placement and build its network from its seed; raise RefusedTrial
        when what was queued for it (its parameters, its seed) is not what autodrop would ask for."""
        where = f"queued trial {trial.number}"
        sites, rate_range = list(self.prepared.sites), self.config.rate_range
        # A retried trial inherits its seed from the attempt it replaces.
        seed = trial.user_attrs.get(records.SEED, trial_seed(self.config.seed, trial.number))
        if not records.is_seed(seed):
            raise RefusedTrial(f"{where} has a seed autodrop does not write: {records.shown(seed)} (seeds are whole "
                               f"numbers in 0..{records.SEED_LIMIT - 1}).")
        baseline = trial.user_attrs.get(records.BASELINE)
        if baseline is not None and not (isinstance(baseline, str) and records.BASELINE_NAME.fullmatch(baseline)):
            raise RefusedTrial(f"{where} has a baseline name autodrop does not write: {records.shown(baseline)}.")
        try:
            # Checked before Optuna takes them: a queued value it finds out of range it warns about and uses.
            fixed = self.storage.get_trial(trial._trial_id).system_attrs.get("fixed_params", {})
            records.check_queued_params(fixed, sites, rate_range, where=where)
            placement = suggest_placement(trial, sites, rate_range)
            variants = suggest_variants(trial, placement, self.prepared.choices)
            # A trial queued with its parameters already set (as a retry is) skips the check above.
            records.check_params(trial.params, sites, rate_range, where=where)
        except StorageError as e:
            raise RefusedTrial(str(e)) from e
        except (ValueError, TypeError) as e:  # Optuna refusing a queued value (not one of the choices)
            raise RefusedTrial(f"{where} holds parameters autodrop would not ask for: {e}") from e
        trial.set_user_attr(records.SEED, seed)
        model = build_placed_model(self.config, self.data, placement, variants, seed=seed)
        return TrialSetup(trial, placement, variants, seed, baseline, model)

    def _epoch_ended(self, setup: TrialSetup, m: EpochMetrics) -> Outcome | None:
        """Put epoch ``m`` on record; return how the trial ended if it ends here."""
        number = setup.trial.number
        try:
            if m.diverged:
                error = m.divergence()
                self.record_divergence(setup, error)
                outcome = Outcome(optuna.trial.TrialState.FAIL, error=error)
            else:
                try:
                    self.record_epoch(setup, m, report=m.epoch not in setup.reported_steps)
                except optuna.TrialPruned:
                    outcome = Outcome(optuna.trial.TrialState.PRUNED)
                else:
                    if m.epoch < self.epochs:
                        return None
                    metrics, model = self.trainer.finish(number, m)
                    self.record_finish(setup, metrics, model)
                    outcome = Outcome(optuna.trial.TrialState.COMPLETE, metrics.val_accuracy)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            # Another worker took this trial for dead and queued its retry: leave the trial to it
            # (and its checkpoint, which the retry resumes from).
            self.forget(setup.trial)
            return Outcome(optuna.trial.TrialState.FAIL, error=e)
        self.forget(setup.trial)
        return outcome

    def record_epoch(self, setup: TrialSetup, m: EpochMetrics, *, report: bool = True) -> None:
        """Put epoch ``m`` on record; raise TrialPruned if the pruner stops the trial here."""
        trial = setup.trial
        if report:
            trial.report(m.val_accuracy, m.epoch)
        trial.set_user_attr(records.TRAIN_LOSS, m.train_loss)
        trial.set_user_attr(records.VAL_LOSS, m.val_loss)
        trial.set_user_attr(records.EPOCHS_RUN, m.epoch)
        self.progress.epoch(trial.number, m.epoch, self.epochs, m.val_accuracy)
        # Baselines are the yardstick: they always run to the end.
        if setup.baseline is None and m.epoch < self.epochs and trial.should_prune():
            trial.set_user_attr(records.PRUNED_REASON, f"val accuracy {m.val_accuracy:.4f} at epoch {m.epoch}")
            save_trial_note(trial, setup.placement, baseline=setup.baseline, val_accuracy=m.val_accuracy,
                            pruned_at=m.epoch, variants=setup.variants)
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    def record_divergence(self, setup: TrialSetup, error: TrainingDiverged) -> None:
        setup.trial.set_user_attr(records.FAIL_REASON, str(error))
        save_trial_note(setup.trial, setup.placement, baseline=setup.baseline, failure=str(error),
                        variants=setup.variants)

    def record_finish(self, setup: TrialSetup, metrics: TrialMetrics, model: nn.Module) -> None:
        trial = setup.trial
        trial.set_user_attr(records.TRAIN_ACCURACY, metrics.train_accuracy)
        trial.set_user_attr(records.TRAIN_LOSS, metrics.train_loss)
        trial.set_user_attr(records.VAL_LOSS, metrics.val_loss)
        trial.set_user_attr(records.GAP, metrics.gap)
        save_trial_note(trial, setup.placement, baseline=setup.baseline, val_accuracy=metrics.val_accuracy,
                        train_accuracy=metrics.train_accuracy, variants=setup.variants)
        keep_weights_if_top(self.study, trial, model, metrics.val_accuracy, store=self.weights_store)
