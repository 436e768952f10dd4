"""A search from start to end: prepare the study, then train its trials here or in worker processes.

Safe to run from many processes and machines at once on one study: creating it happens once,
under a lock on its storage, and every worker then runs the scheduler (autodrop/run/scheduler.py)
on its share of the trials.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import sys
import warnings
from typing import Any

import optuna
import torch

from autodrop.config import SearchConfig, config_to_options, is_user_model
from autodrop.errors import AutodropError, AutodropWarning, ConfigError
from autodrop.nets.build import ModelSites, check_model, inspect_model
from autodrop.run import records
from autodrop.run.locking import StorageLock
from autodrop.run.processes import run_processes
from autodrop.run.progress import Progress
from autodrop.run.pruning import make_pruner
from autodrop.run.records import BASELINE, read_study, read_trials
from autodrop.run.scheduler import run_trials
from autodrop.run.signals import Interrupted
from autodrop.run.space import baseline_placements, baseline_variants, placement_to_params, variant_choices
from autodrop.run.storage import open_storage
from autodrop.run.study import best_value, count_finished, create_or_load_study, make_sampler
from autodrop.run.trials import StudyTrials
from autodrop.run.trust import data_record
from autodrop.training.data import ImageData, load_data
from autodrop.training.device import resolve_device, resolve_precision
from autodrop.training.packed import auto_pack_size


def run_search(config: SearchConfig, *, progress: Progress) -> optuna.Study:
    """Run (or resume) the search ``config`` describes until its study has ``config.trials``
    finished trials; return the study."""
    prepared = prepare_study(config)
    if config.trials - count_finished(prepared.study) > 0:
        if config.workers == 1:
            run_here(prepared, config, resolve_device(config.worker_devices()[0]), progress)
        else:
            _run_worker_processes(prepared, config, progress)
    return prepared.study


def create_study(config: SearchConfig) -> tuple[int, int]:
    """Create (or check) the study with its baselines queued, training nothing; return how many of
    its trials are queued and how many started or finished."""
    trials = prepare_study(config).study.get_trials(deepcopy=False)
    n_queued = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return n_queued, len(trials) - n_queued


@dataclasses.dataclass(frozen=True)
class PreparedStudy:
    """A study ready for workers, with what every worker needs to train its trials."""

    study: optuna.Study
    storage: Any  # the RDB storage under the study, for heartbeats
    data: ImageData
    sites: dict[str, str]  # site -> kind, in forward order
    choices: dict[str, Any]  # the dropout variants each site may take
    packing_problem: str | None  # why the model's trials cannot be packed, or None if they can
    uuid: str  # the study's identity, for the files kept beside it (checkpoints)
    precision: str = "fp32"  # the study's stored precision, which every trial trains in


def prepare_study(config: SearchConfig) -> PreparedStudy:
    """Check model, devices and data, then create (or load) the study with its baselines queued.

    Safe to call from many processes at once: creating the study happens once, under a lock on its
    storage; the others find it and check that their settings match.
    """
    check_model(config.model, config.model_args)  # an unknown model fails before any data is read
    for name in sorted(set(config.worker_devices())):
        _check_device(resolve_device(name))
    data = load_data(config.data)
    model = inspect_model(config.model, data.shape, config.model_args, member_inputs=bool(config.train.augment),
                          in_block=config.in_block)
    if config.pack is not None and config.pack > 1 and model.packing_problem is not None:
        raise ConfigError(
            f"--pack {config.pack}: this model's trials cannot be packed ({model.packing_problem}); use --pack 1."
        )
    # A user's network keeps the flavour of the dropout it was written with, so element or channel
    # is searched for the built-in models only; dropping a residual branch is for any network.
    kinds = config.kinds if not is_user_model(config.model) else tuple(k for k in config.kinds if k != "channel")
    choices = variant_choices(model.kinds, model.slots, kinds, config.slots, branches=model.branches)

    # One process at a time creates tables, study, attributes and baselines; the others then find them.
    with StorageLock(config.storage_url, "set-up").hold():
        storage = open_storage(config.storage_url)
        study = create_or_load_study(
            storage,
            config.study_name,
            settings=config_to_options(as_searched(config, model)),
            sampler=make_sampler(config.sampler, config.seed),
            pruner=make_pruner(config.pruner, config.train.epochs, n_val=len(data.val_labels)),
            # A study made in bf16 goes on in bf16 wherever it resumes, unless a precision is named.
            follow=("precision",) if config.train.precision == "auto" else (),
        )
        _record_data_and_sites(study, data, model.kinds)
        # A study anyone can edit is read back whole before any trial trains: a study-wide value
        # autodrop would not write stops the run here; a trial holding one is left out, with a warning.
        read_trials(study, read_study(study))
        _enqueue_baselines(study, model.kinds, choices, config, model.branches)
        uuid = _study_uuid(study)
        precision = read_study(study).config.train.precision
    return PreparedStudy(study, storage, data, model.kinds, choices, model.packing_problem, uuid, precision)


def as_searched(config: SearchConfig, model: ModelSites) -> SearchConfig:
    """Return ``config`` as it applies to ``model``, for storing with the study: a setting that finds
    nothing to act on in this model (in-block sites, the branch kind) is stored as off, so a study
    made before the setting existed, or with another value of it, resumes with the defaults; the
    precision is stored as the one ``auto`` picks on the search's device."""
    kinds = tuple(k for k in config.kinds if k != "branch" or model.branches) or ("element",)
    precision = resolve_precision(config.train.precision, resolve_device(config.train.device))
    return dataclasses.replace(config, kinds=kinds, in_block=config.in_block if model.in_block else "off",
                               train=dataclasses.replace(config.train, precision=precision))


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


def _record_data_and_sites(study: optuna.Study, data: ImageData, sites: dict[str, str]) -> None:
    stored_sites = study.user_attrs.get(records.SITES_KEY)
    if stored_sites is not None and list(stored_sites.items()) != list(sites.items()):
        raise ConfigError(
            f"study {study.study_name!r} was searched over sites {list(stored_sites)}, but the model now has "
            f"{list(sites)}; use --study NEW_NAME for the changed model."
        )
    record = data_record(data)
    if stored_sites is None:
        study.set_user_attr(records.SITES_KEY, sites)
        study.set_user_attr(records.DATA_KEY, record.to_stored())
        return
    stored = read_study(study).data
    changed = stored.differences(record)
    if changed:
        raise ConfigError(
            f"the data of study {study.study_name!r} is not the data it was searched on: it had {'; '.join(changed)}. "
            "Search the same images again, or use --study NEW_NAME for these."
        )
    if stored.fingerprint is None:  # a study made before fingerprints: the counts match, keep this one
        study.set_user_attr(records.DATA_KEY, record.to_stored())


def _study_uuid(study: optuna.Study) -> str:
    """Return the study's identity, giving it one if it was made before identities were (call it
    under the set-up lock)."""
    uuid = read_study(study).uuid
    if uuid is None:
        uuid = secrets.token_hex(16)
        study.set_user_attr(records.UUID_KEY, uuid)
    return uuid


def _enqueue_baselines(
    study: optuna.Study, sites: dict[str, str], choices: dict[str, Any], config: SearchConfig,
    branches: frozenset[str],
) -> None:
    """Queue each baseline recipe once; a rerun finds them already present and adds nothing, except
    for a recipe whose trials all failed (a crash, a full disk): it is queued again, since every
    answer is measured against the recipes."""
    present = {t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False)
               if t.state != optuna.trial.TrialState.FAIL}
    recipes = [(name, placement, baseline_variants(name, placement, choices))
               for name, placement in baseline_placements(sites, config.rate_range, branches=branches)]
    for name, placement, variants in [r for r in recipes if r[2] is not None][: config.trials]:
        if name in present:
            continue
        study.enqueue_trial(placement_to_params(placement, variants), user_attrs={BASELINE: name})


def run_here(
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
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=prepared.precision))
    trials = StudyTrials(prepared, config, device, progress, pack=pack)
    progress.start(config.trials, count_finished(prepared.study))
    try:
        run_trials(
            prepared.study, prepared.storage, trials, n_trials=config.trials, lock=trials.lock,
            timeout=config.timeout, on_wait=progress.waiting, parent_pid=parent_pid,
        )
        trials.raise_if_failing()
    finally:
        progress.close()


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
            best = best_value(study)
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
        run_here(prepare_study(config), config, device, Progress(), parent_pid=parent_pid)
    except Interrupted as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before this worker's signal handlers were in place
        sys.exit(130)
    except AutodropError as e:
        print(f"Error: worker {index}: {e}", file=sys.stderr)
        sys.exit(2)


def _show_worker_warning(index: int, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"Warning: worker {index}: {message}", file=sys.stderr)
