"""The study's stored record: every key autodrop writes to storage, and the one way to read it back.

A study in shared storage is data anyone with access can edit, so every reader (report, the page,
export, confirm, a resuming search) goes through :func:`read_study` and :func:`read_trials`, which
check each value is one autodrop writes and return typed records. Nothing read from a study is
executed, imported or followed as a path: the model and data are rebuilt only from what the user
names again (run/trust.py), and checkpoint and artifact paths are derived locally; the paths
stored here are for people to read, and are refused when they are not of the shape autodrop writes.

Stored names (kept as they are, so studies already written stay readable):

- study user attributes: ``autodrop.config`` (the trial settings), ``autodrop.data``,
  ``autodrop.sites``, ``autodrop.uuid``, ``autodrop.confirmation``, ``autodrop.confirmation_runs``,
  ``autodrop.artifact_dir``, ``autodrop.normaliser``;
- trial parameters: ``SITE`` (off/on), ``SITE.p`` (rate), ``SITE.kind`` (dropout kind: element or
  channel) and ``SITE.order`` (the slot, written "order" before it was called a slot);
- trial user attributes: the names below.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterable, Mapping

from optuna.trial import FrozenTrial, TrialState

from autodrop.config import DROPOUT_KINDS, SLOTS, SearchConfig, config_from_options, config_to_options, option_name
from autodrop.errors import AutodropError, AutodropWarning, StorageError

# --- study user attributes ----------------------------------------------------------------------
SETTINGS_KEY = "autodrop.config"
DATA_KEY = "autodrop.data"
SITES_KEY = "autodrop.sites"
CONFIRMATION_KEY = "autodrop.confirmation"
CONFIRMATION_RUNS_KEY = "autodrop.confirmation_runs"  # placement key -> seed -> [val accuracy, gap]
UUID_KEY = "autodrop.uuid"  # a random id given at creation: the study's identity for local files
ARTIFACT_DIR_KEY = "autodrop.artifact_dir"  # where the search kept weights (shown, never followed)
NORMALISER_KEY = "autodrop.normaliser"  # per channel: x * scale + shift on 0..255 pixels

# --- trial user attributes ----------------------------------------------------------------------
SEED = "seed"  # the trial's seed: initial weights, batch order, dropout masks
BASELINE = "baseline"  # the recipe's name, on a baseline trial
FAIL_REASON = "fail_reason"
WORKER = "worker"  # host:pid of the worker running the trial
PACKED = "packed"  # the trial trains as a member of a pack (no checkpoint)
CHECKPOINT = "checkpoint"  # the checkpoint file's path where it ran (shown, never followed: run/checkpoints.py)
WEIGHTS = "weights"  # the kept weights: {"artifact": id, "sha256": digest of the file}
RESUMED_AT = "resumed_at_epoch"  # on a retry: the first epoch it trained itself
TRAIN_ACCURACY, TRAIN_LOSS, VAL_LOSS, GAP = "train_accuracy", "train_loss", "val_loss", "gap"
EPOCHS_RUN = "epochs_run"
PRUNED_REASON = "pruned_reason"
# --- trial system attributes (Optuna's retry callback writes it) ---------------------------------
FAILED_TRIAL = "failed_trial"

# --- trial parameters ---------------------------------------------------------------------------
OFF, ON = "off", "on"


def rate_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s rate."""
    return f"{site}.p"


def dropout_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s dropout kind (element or channel)."""
    return f"{site}.kind"


def slot_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s slot relative to batch norm."""
    return f"{site}.order"


# Settings that change what a trial's number means; the rest (trials, timeout, device, pruner,
# workers...) may differ between runs of one study.
TRIAL_SETTINGS = (
    "data", "image-size", "channels", "val-fraction", "train-per-class",
    "model", "model-args", "epochs", "batch-size", "lr", "rate-range", "kinds", "slots", "schedule", "seed",
    "optimizer", "weight-decay", "lr-schedule", "label-smoothing", "augment", "in-block", "precision",
)
# Settings added after studies were first stored, and the value every study made before them used.
LATER_SETTINGS = {"optimizer": "adam", "weight-decay": 0.0, "lr-schedule": "constant", "label-smoothing": 0.0,
                  "augment": [], "in-block": "off", "precision": "fp32"}
METRIC_NAME = "val_accuracy"
SITE_KINDS = ("conv", "fc")
# Built-in site names are identifiers; discovered ones add ":", "#", "@" and "." ("after:conv21#2").
SITE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:#@]*")
BASELINE_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")  # a recipe's name: "none", "everywhere-low"
UUID = re.compile(r"[0-9a-f]{32}")
ARTIFACT_ID = re.compile(r"[0-9a-fA-F-]{8,64}")
SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKPOINT_NAME = re.compile(r"trial-[0-9]{1,12}\.pt")
# Confirmation seeds: CONFIRM_SEED_BASE + i for the i-th run of a placement (never a search's trial
# seed), at most MAX_CONFIRM_RUNS of them; a stored run outside that range is not autodrop's.
CONFIRM_SEED_BASE = 900_000_000
MAX_CONFIRM_RUNS = 1000
SEED_LIMIT = 2**63  # seeds lie in 0..SEED_LIMIT-1: what torch's generators take, and far above any autodrop draws
STATE_WORDS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}

Placement = dict[str, "float | None"]  # site name -> rate, or None where the site is off
# site name -> {"dropout": "element"|"channel", "slot": "after-act"|"before-bn"}, where chosen
Variants = dict[str, dict[str, str]]


@dataclass(frozen=True)
class DataRecord:
    """The data a study was searched on, as recorded when it was made."""

    name: str
    classes: tuple[str, ...]
    n_train: int
    n_val: int
    channels: int
    image_size: int
    fingerprint: str | None = None  # sha256 of the decoded images and labels; None in studies made before it

    def to_stored(self) -> dict[str, Any]:
        stored = {"name": self.name, "classes": list(self.classes), "n_train": self.n_train, "n_val": self.n_val,
                  "channels": self.channels, "image_size": self.image_size}
        if self.fingerprint is not None:
            stored["fingerprint"] = self.fingerprint
        return stored

    def differences(self, other: "DataRecord") -> list[str]:
        """Return how ``other`` differs from this record, in words (empty when it is the same data)."""
        found = []
        if list(self.classes) != list(other.classes):
            found.append(f"classes {list(self.classes)} (now {list(other.classes)})")
        if (self.n_train, self.n_val) != (other.n_train, other.n_val):
            found.append(f"{self.n_train} train / {self.n_val} val images (now {other.n_train} / {other.n_val})")
        if (self.channels, self.image_size) != (other.channels, other.image_size):
            found.append(f"{self.channels}x{self.image_size}x{self.image_size} images (now "
                         f"{other.channels}x{other.image_size}x{other.image_size})")
        if not found and None not in (self.fingerprint, other.fingerprint) and self.fingerprint != other.fingerprint:
            found.append("the same counts but other pixels or labels")
        return found


@dataclass(frozen=True)
class StudyRecord:
    """A study as autodrop made it: its settings, data and sites, each checked."""

    name: str
    config: SearchConfig  # the trial settings; the study and storage fields are left at their defaults
    data: DataRecord
    sites: dict[str, str]  # site -> "conv" or "fc", in forward order
    confirmation: dict[str, Any] | None  # as autodrop confirm stored it
    uuid: str | None = None  # None in studies made before it was given
    artifact_dir: str | None = None  # where the search said it kept weights (to show, never to follow)

    @property
    def settings(self) -> dict[str, Any]:
        """The trial settings as flat option names (for display)."""
        options = config_to_options(self.config)
        return {key: options[key] for key in TRIAL_SETTINGS}


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored, checked: its placement, figures and role."""

    number: int
    state: str  # complete, pruned, failed, running or waiting
    placement: Placement
    variants: Variants = field(default_factory=dict)
    val_accuracy: float | None = None  # the objective for a complete trial, else its last reported epoch
    train_accuracy: float | None = None
    baseline: str | None = None  # the recipe's name, for baseline trials
    seed: int | None = None
    curve: dict[int, float] = field(default_factory=dict, repr=False)  # validation accuracy per epoch
    weights: tuple[str, str] | None = None  # (artifact id, sha256) of the weights kept for it

    @property
    def gap(self) -> float | None:
        if self.val_accuracy is None or self.train_accuracy is None:
            return None
        return self.train_accuracy - self.val_accuracy

    @property
    def description(self) -> str:
        """The placement in words: ``"conv2 at 0.31 (channel), fc1 at 0.52"`` or ``"no dropout"``."""
        return describe_placement(self.placement, self.variants)


def rank_key(number: int, val_accuracy: float) -> tuple[float, int]:
    """Return the key completed trials are ranked by: higher accuracy first, an earlier trial first
    on a tie. The one rule for "the best trial" (report, export, confirm, the weights kept)."""
    return (-val_accuracy, number)


def best_trial(trials: Iterable[TrialRecord]) -> TrialRecord | None:
    """Return the best completed trial, or None when none has completed."""
    complete = [t for t in trials if t.state == "complete" and t.val_accuracy is not None]
    return min(complete, key=lambda t: rank_key(t.number, t.val_accuracy), default=None)  # type: ignore[arg-type]


def describe_placement(placement: Mapping[str, float | None], variants: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Return a placement in words: ``"conv2 at 0.31 (channel), fc1 at 0.52"`` or ``"no dropout"``."""
    variants = variants or {}
    on = []
    for site, rate in placement.items():
        if rate is None:
            continue
        variant = variants.get(site, {})
        notes = []
        if variant.get("dropout", DROPOUT_KINDS[0]) != DROPOUT_KINDS[0]:
            notes.append(variant["dropout"])
        if variant.get("slot", SLOTS[0]) != SLOTS[0]:
            notes.append(variant["slot"])
        on.append(f"{site} at {rate:.2f}" + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(on) if on else "no dropout"


def placement_key(placement: Mapping[str, float | None], variants: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Return a canonical text for a placement and its variants: the key its confirmation runs are
    stored under, equal for equal placements whichever trial found them."""
    variants = variants or {}
    parts = []
    for site in sorted(placement):
        rate = placement[site]
        if rate is None:
            continue
        variant = ",".join(f"{k}={v}" for k, v in sorted(variants.get(site, {}).items()))
        parts.append(f"{site}={float(rate)!r}" + (f"[{variant}]" if variant else ""))
    return ";".join(parts) or "none"


# --- reading ------------------------------------------------------------------------------------


def stored_settings(study: Any) -> dict[str, Any] | None:
    """Return the study's stored trial settings under today's option names, or None if it has none."""
    stored = study.user_attrs.get(SETTINGS_KEY)
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise StorageError(f"study {study.study_name!r} holds settings autodrop does not write ({SETTINGS_KEY}).")
    return {**LATER_SETTINGS, **{option_name(key): value for key, value in stored.items()}}


def read_study(study: Any) -> StudyRecord:
    """Return the study's settings, data and sites, refusing anything autodrop would not write."""
    name = study.study_name
    stored = stored_settings(study)
    if stored is None or SITES_KEY not in study.user_attrs:
        raise StorageError(f"study {name!r} was not made by autodrop search (it has no drop sites).")
    unknown = sorted(set(stored) - set(TRIAL_SETTINGS))
    if unknown:
        raise StorageError(f"study {name!r} holds settings autodrop does not write: {unknown}.")
    try:
        config = config_from_options(stored, from_storage=True)
    except (AutodropError, TypeError, ValueError) as e:
        raise StorageError(f"study {name!r} holds settings autodrop does not write: {e}") from e
    if config.train.precision == "auto":  # a study stores the precision it chose
        raise StorageError(f"study {name!r} holds settings autodrop does not write: precision 'auto'.")
    data = _read_data(study, config)
    sites = study.user_attrs.get(SITES_KEY)
    if not (
        isinstance(sites, dict) and sites
        and all(isinstance(s, str) and SITE_NAME.fullmatch(s) and k in SITE_KINDS for s, k in sites.items())
    ):
        raise StorageError(f"study {name!r} holds drop sites autodrop does not write ({SITES_KEY}={sites!r}).")
    confirmation = read_confirmation(study.user_attrs.get(CONFIRMATION_KEY), name)
    uuid = study.user_attrs.get(UUID_KEY)
    if uuid is not None and not (isinstance(uuid, str) and UUID.fullmatch(uuid)):
        raise StorageError(f"study {name!r} holds an identity autodrop does not write ({UUID_KEY}={uuid!r}).")
    artifact_dir = study.user_attrs.get(ARTIFACT_DIR_KEY)
    if artifact_dir is not None and not _is_artifact_dir(artifact_dir):
        raise StorageError(f"study {name!r} records a weights folder autodrop does not write "
                           f"({ARTIFACT_DIR_KEY}={artifact_dir!r}).")
    return StudyRecord(name, config, data, dict(sites), confirmation, uuid, artifact_dir)


def _is_artifact_dir(value: Any) -> bool:
    """Whether ``value`` has the shape of the folder a search records: an absolute path, without
    ``..`` or control characters. It is never followed; anything else is a sign of an edited study."""
    if not isinstance(value, str) or not value or any(not c.isprintable() for c in value):
        return False
    path = PurePath(value)
    return path.is_absolute() and ".." not in path.parts


def _read_data(study: Any, config: SearchConfig) -> DataRecord:
    data = study.user_attrs.get(DATA_KEY)
    bad = StorageError(f"study {study.study_name!r} holds a data record autodrop does not write ({DATA_KEY}={data!r}).")
    if not isinstance(data, dict):
        raise bad
    classes, channels, image_size = data.get("classes"), data.get("channels"), data.get("image_size")
    n_train, n_val, data_name = data.get("n_train"), data.get("n_val"), data.get("name")
    fingerprint = data.get("fingerprint")
    if not (
        isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
        and _is_int(channels) and channels in (1, 3)
        and _is_int(image_size) and image_size == config.data.image_size
        and (config.data.channels is None or channels == config.data.channels)
        and _is_int(n_train) and n_train >= 1 and _is_int(n_val) and n_val >= 1
        and isinstance(data_name, str)
        and (fingerprint is None or (isinstance(fingerprint, str) and SHA256.fullmatch(fingerprint)))
    ):
        raise bad
    return DataRecord(data_name, tuple(classes), n_train, n_val, channels, image_size, fingerprint)


def read_trials(study: Any, record: StudyRecord, trials: Iterable[FrozenTrial] | None = None) -> list[TrialRecord]:
    """Return every trial of ``study`` (or ``trials`` of it) as a checked record, leaving out (with
    one warning that counts them) trials holding values autodrop does not write."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    # One edited trial (a queued trial anyone may add, a value changed by hand) must not take the
    # whole study's report, export or confirmation down with it: the others are still autodrop's.
    read: list[TrialRecord] = []
    skipped: list[StorageError] = []
    for trial in trials:
        try:
            read.append(read_trial(record, trial))
        except StorageError as e:
            skipped.append(e)
    if skipped:
        warnings.warn(
            f"{len(skipped)} trial(s) of study {shown_text(record.name)} hold values autodrop does not write and "
            f"are left out ({skipped[0]}{' ...' if len(skipped) > 1 else ''})",
            AutodropWarning,
            stacklevel=2,
        )
    return read


def read_trial(record: StudyRecord, trial: FrozenTrial) -> TrialRecord:
    """Return one trial as a checked record; raise StorageError for values autodrop does not write."""
    where = f"trial {trial.number} of study {shown_text(record.name)}"
    placement, variants = check_params(trial.params, list(record.sites), record.config.rate_range, where=where)
    curve: dict[int, float] = {}
    for step, value in trial.intermediate_values.items():
        if not (_is_int(step) and _is_accuracy(value)):
            raise StorageError(f"{where} has a reported value that is not an accuracy: step {step!r}, {value!r}.")
        curve[int(step)] = float(value)
    if trial.state == TrialState.COMPLETE:
        if not _is_accuracy(trial.value):
            raise StorageError(f"{where} has a value that is not an accuracy: {trial.value!r}.")
        value: float | None = float(trial.value)  # type: ignore[arg-type]
    else:
        value = curve[max(curve)] if curve else None
    attrs = trial.user_attrs
    train_accuracy = attrs.get(TRAIN_ACCURACY)
    baseline = attrs.get(BASELINE)
    if baseline is not None and not (isinstance(baseline, str) and BASELINE_NAME.fullmatch(baseline)):
        raise StorageError(f"{where} has a baseline name autodrop does not write: {baseline!r}.")
    seed = attrs.get(SEED)
    if seed is not None and not is_seed(seed):
        raise StorageError(f"{where} has a seed autodrop does not write: {shown(seed)}.")
    checkpoint = attrs.get(CHECKPOINT)
    if checkpoint is not None and not (isinstance(checkpoint, str) and CHECKPOINT_NAME.fullmatch(PurePath(checkpoint).name)
                                       and PurePath(checkpoint).is_absolute() and ".." not in PurePath(checkpoint).parts):
        raise StorageError(f"{where} records a checkpoint autodrop does not write: {checkpoint!r}.")
    weights = read_weights_record(attrs.get(WEIGHTS), where)
    return TrialRecord(
        number=trial.number,
        state=STATE_WORDS[trial.state],
        placement=placement,
        variants=variants,
        val_accuracy=value,
        train_accuracy=float(train_accuracy) if _is_accuracy(train_accuracy) else None,
        baseline=baseline,
        seed=seed,
        curve=curve,
        weights=weights,
    )


def check_params(
    params: Any, sites: list[str], rate_range: tuple[float, float], *, where: str = "a trial"
) -> tuple[Placement, Variants]:
    """Return the placement and variants ``params`` (a trial's, or those queued for it) encode;
    raise StorageError for a name that is not a site's parameter or a value autodrop would not ask for."""
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise StorageError(f"{where} has parameters that are not a mapping of names to values: {shown(params)}.")
    allowed = set(sites) | {param(s) for s in sites for param in (rate_param, dropout_param, slot_param)}
    extra = sorted(set(params) - allowed)
    if extra:
        raise StorageError(f"{where} has parameters that are not drop sites: {shown(extra)}.")
    return (placement_from_params(params, sites, rate_range, where=where),
            variants_from_params(params, sites, where=where))


def check_queued_params(params: Any, sites: list[str], rate_range: tuple[float, float], *, where: str) -> None:
    """Raise StorageError unless ``params``, the values queued for a trial that has not run yet
    (each optional: what is missing is sampled), are ones autodrop would ask for itself."""
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise StorageError(f"{where} has parameters that are not a mapping of names to values: {shown(params)}.")
    low, high = rate_range
    allowed: dict[str, Any] = {}
    for site in sites:
        allowed[site] = lambda v: v in (OFF, ON)
        allowed[rate_param(site)] = lambda v: _is_number(v) and 0.0 <= v < 1.0 and low - 1e-9 <= v <= high + 1e-9
        allowed[dropout_param(site)] = lambda v: v in DROPOUT_KINDS
        allowed[slot_param(site)] = lambda v: v in SLOTS
    for name, value in params.items():
        if name not in allowed:
            raise StorageError(f"{where} has a parameter that is not a drop site's: {shown(name)}.")
        if not (isinstance(value, (str, int, float)) and allowed[name](value)):
            raise StorageError(f"{where} has parameter {shown(name)}={shown(value)}, which is not one autodrop asks for "
                               f"(rates lie in {low}..{high}).")


def is_seed(value: Any) -> bool:
    """Whether ``value`` is a seed autodrop would write: a whole number in 0..SEED_LIMIT-1."""
    return _is_int(value) and 0 <= value < SEED_LIMIT


def shown(value: Any, limit: int = 80) -> str:
    """Return ``value``'s repr for a message, cut at ``limit`` characters: a stored value may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_text(value: Any, limit: int = 80) -> str:
    """Return a stored name as a message shows it: quoted and escaped (repr), so that control
    characters (ANSI escapes, carriage returns) reach no terminal, and cut at ``limit``."""
    return shown(str(value), limit)


def placement_from_params(
    params: Mapping[str, Any], sites: list[str], rate_range: tuple[float, float] = (0.0, 1.0), *, where: str = "a trial"
) -> Placement:
    """Return the placement a trial's parameters encode, checking they are well formed."""
    low, high = rate_range
    placement: Placement = {}
    for site in sites:
        state = params.get(site, OFF)
        if state == OFF:
            placement[site] = None
            continue
        rate = params.get(rate_param(site))
        if state != ON or not _is_number(rate) or not 0.0 <= rate < 1.0 or not low - 1e-9 <= rate <= high + 1e-9:
            raise StorageError(
                f"{where} has stored parameters for site {site!r} that are not a placement autodrop writes "
                f"({site}={shown(state)}, {rate_param(site)}={shown(rate)}; rates lie in {low}..{high})."
            )
        placement[site] = float(rate)
    return placement


def variants_from_params(params: Mapping[str, Any], sites: list[str], *, where: str = "a trial") -> Variants:
    """Return the dropout kinds and slots a trial's parameters encode, checking they are known values."""
    variants: Variants = {}
    for site in sites:
        variant = {}
        for key, param, allowed in (("dropout", dropout_param(site), DROPOUT_KINDS), ("slot", slot_param(site), SLOTS)):
            if param in params:
                if not isinstance(params[param], str) or params[param] not in allowed:
                    raise StorageError(
                        f"{where} has stored parameter {param}={shown(params[param])}, which is not one autodrop writes "
                        f"(expected one of {', '.join(allowed)})."
                    )
                variant[key] = params[param]
        if variant:
            variants[site] = variant
    return variants


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_accuracy(value: Any) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def _is_confirm_seed(value: Any) -> bool:
    return _is_int(value) and CONFIRM_SEED_BASE <= value < CONFIRM_SEED_BASE + MAX_CONFIRM_RUNS


def _is_float(value: Any) -> bool:
    # A statistic of few runs may be infinite or undefined (NaN): still a number confirm writes.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_label(value: Any, limit: int = 2000) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _is_comparison(value: Any) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, dict)
        and set(value) == {"winner", "reference", "n_seeds", "mean_difference", "ci_low", "ci_high", "level",
                           "p_value", "significant"}
        and _is_label(value["winner"], 200) and _is_label(value["reference"], 200)
        and _is_int(value["n_seeds"]) and 0 <= value["n_seeds"] <= MAX_CONFIRM_RUNS
        and all(_is_float(value[k]) for k in ("mean_difference", "ci_low", "ci_high", "level"))
        and (value["p_value"] is None or _is_float(value["p_value"]))
        and isinstance(value["significant"], bool)
    )


def _is_candidate(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"label", "trial", "baseline", "description", "seeds", "accuracies", "gaps", "mean",
                           "ci_low", "ci_high", "mean_gap"}
        and _is_label(value["label"], 200) and _is_int(value["trial"]) and value["trial"] >= 0
        and (value["baseline"] is None or (isinstance(value["baseline"], str)
                                           and BASELINE_NAME.fullmatch(value["baseline"]) is not None))
        and _is_label(value["description"])
        and isinstance(value["seeds"], list) and len(value["seeds"]) <= MAX_CONFIRM_RUNS
        and all(_is_confirm_seed(s) for s in value["seeds"])
        and isinstance(value["accuracies"], list) and len(value["accuracies"]) == len(value["seeds"])
        and all(_is_accuracy(a) for a in value["accuracies"])
        and isinstance(value["gaps"], list) and len(value["gaps"]) == len(value["seeds"])
        and all(_is_number(g) and -1.0 <= g <= 1.0 for g in value["gaps"])
        and all(_is_float(value[k]) for k in ("mean", "ci_low", "ci_high", "mean_gap"))
    )


def read_confirmation(value: Any, study_name: str) -> dict[str, Any] | None:
    """Return the confirmation ``autodrop confirm`` stored (``value``), checked; None when there is
    none, or (with a warning) when it is not what confirm writes: a report still answers without it."""
    if value is None:
        return None
    if (
        isinstance(value, dict)
        and set(value) == {"seeds", "candidates", "comparison", "against_best_baseline", "stopped", "verdict"}
        and isinstance(value["seeds"], list) and len(value["seeds"]) <= MAX_CONFIRM_RUNS
        and all(_is_confirm_seed(s) for s in value["seeds"])
        and isinstance(value["candidates"], list) and 0 < len(value["candidates"]) <= 100
        and all(_is_candidate(c) for c in value["candidates"])
        and _is_comparison(value["comparison"]) and _is_comparison(value["against_best_baseline"])
        and value["stopped"] in ("fixed", "decided", "settled", "cap")
        and _is_label(value["verdict"])
    ):
        return value
    warnings.warn(f"study {shown_text(study_name)} holds a confirmation autodrop confirm does not write "
                  f"({CONFIRMATION_KEY}); it is left out: run autodrop confirm again.", AutodropWarning, stacklevel=3)
    return None


def read_confirmation_runs(study: Any) -> dict[str, dict[str, list[float]]]:
    """Return the confirmation runs stored with the study, checked (placement key -> seed -> [val
    accuracy, gap]); an entry autodrop would not write is refused."""
    stored = study.user_attrs.get(CONFIRMATION_RUNS_KEY)
    if stored is None:
        return {}
    bad = StorageError(f"study {study.study_name!r} holds confirmation runs autodrop does not write "
                       f"({CONFIRMATION_RUNS_KEY}).")
    if not isinstance(stored, dict):
        raise bad
    runs: dict[str, dict[str, list[float]]] = {}
    for key, by_seed in stored.items():
        if not (isinstance(key, str) and isinstance(by_seed, dict)):
            raise bad
        if len(by_seed) > MAX_CONFIRM_RUNS:
            raise bad
        for seed, figures in by_seed.items():
            # The seed is a key: canonical decimal digits of a confirmation seed, nothing else.
            if not (isinstance(seed, str) and seed.isascii() and seed.isdigit() and len(seed) <= 20
                    and str(int(seed)) == seed and _is_confirm_seed(int(seed))
                    and isinstance(figures, list) and len(figures) == 2
                    and _is_accuracy(figures[0]) and _is_number(figures[1]) and -1.0 <= figures[1] <= 1.0):
                raise bad
        runs[key] = {seed: [float(f) for f in figures] for seed, figures in by_seed.items()}
    return runs


def read_weights_record(value: Any, where: str) -> tuple[str, str] | None:
    """Return the (artifact id, sha256) a trial's weights record holds, checked; None if it has none."""
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"artifact", "sha256"} and isinstance(value["artifact"], str)
            and ARTIFACT_ID.fullmatch(value["artifact"]) and isinstance(value["sha256"], str)
            and SHA256.fullmatch(value["sha256"])):
        raise StorageError(f"{where} records kept weights autodrop does not write: {value!r}.")
    return value["artifact"], value["sha256"]
