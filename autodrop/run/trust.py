"""What a study may make autodrop load: only what the user names again.

A study records the model and the data it was searched on, and anyone who can write to its storage
(a shared PostgreSQL database, an SQLite file mailed around) can change those records. So a command
that must rebuild a study's network or read its images (confirm, export, the report page's picture
of the network) takes them from the user: ``--model`` and ``--data``, which must be what the study
records. A built-in model and the built-in digits are rebuilt from their names alone: no code or
file the study chose is read for them. A user model's stored arguments are plain literals, and are
passed to it only when the user gives the same ones again (``--model-arg``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from autodrop.config import BUILTIN_DATASETS, SearchConfig, absolute_model_spec, is_user_model, parse_model_args
from autodrop.errors import ConfigError, StorageError
from autodrop.run.records import DataRecord, StudyRecord, shown_text

if TYPE_CHECKING:  # pragma: no cover
    from autodrop.training.data import ImageData


def needs_model(record: StudyRecord) -> bool:
    """Whether rebuilding the study's network needs the user to name the model (``--model``)."""
    return is_user_model(record.config.model)


def trusted_config(record: StudyRecord, *, model: str | None = None, data: str | None = None,
                   model_args: Sequence[str] | Mapping[str, Any] | None = None,
                   need_data: bool = True) -> SearchConfig:
    """Return the study's settings with the model, its arguments and the data the user named, after
    checking they are the ones the study records; raise StorageError saying what to pass when they
    are missing or differ."""
    config = record.config
    if needs_model(record):
        if model is None:
            # The stored spec is shown as a quoted value, never as a command to copy: anyone who can
            # write to the study chose it.
            raise StorageError(
                f"study {shown_text(record.name)} was searched with a model of your own (it records "
                f"{shown_text(config.model, 200)}); autodrop does not import code a study names: name the model "
                "again with --model, and only if you trust that file or module."
            )
        if absolute_model_spec(model) != config.model:
            raise StorageError(
                f"study {shown_text(record.name)} records the model {shown_text(config.model, 200)}, not "
                f"{absolute_model_spec(model)!r}; --model must name the model the study was searched with."
            )
        # The stored arguments would reach the user's code: they must be the ones the user gives
        # now, as the model is (a path or a size that someone else wrote is not passed on).
        try:
            given = parse_model_args(model_args or {})
        except ConfigError as e:
            raise StorageError(str(e)) from e
        if _typed(given) != _typed(config.model_args):
            raise StorageError(
                f"study {shown_text(record.name)} records the model arguments "
                f"{shown_text(_words(config.model_args), 300)}, not {_words(given)!r}; --model-arg (KEY=VALUE, "
                "repeated) must give the arguments the study was searched with."
            )
    if need_data and config.data.source not in BUILTIN_DATASETS:
        if data is None:
            raise StorageError(
                f"study {shown_text(record.name)} was searched on the folder {shown_text(config.data.source, 200)}; "
                "autodrop reads no folder a "
                "study names: pass --data FOLDER (the images the study was searched on) to load them."
            )
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=data))
    return config


def _typed(args: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    # True == 1 and 1 == 1.0 in Python: compare the kinds too.
    return {key: (type(value).__name__, value) for key, value in args.items()}


def _words(args: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(args.items())) or "none"


def check_same_data(record: StudyRecord, loaded: DataRecord) -> None:
    """Raise StorageError unless ``loaded`` is the data the study was searched on."""
    changed = record.data.differences(loaded)
    if changed:
        raise StorageError(
            f"the data given is not what study {record.name!r} was searched on: it had {'; '.join(changed)}."
        )


def data_record(data: "ImageData") -> DataRecord:
    """Return what a study records of ``data``: names, counts, shape and a fingerprint of the pixels."""
    from autodrop.training.data import fingerprint  # torch: only where images were loaded anyway

    return DataRecord(data.name, data.classes, len(data.train_labels), len(data.val_labels), data.channels,
                      data.image_size, fingerprint(data))
