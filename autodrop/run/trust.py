"""What a study may make autodrop load: only what the user names again.

A study records the model and the data it was searched on, and anyone who can write to its storage
(a shared PostgreSQL database, an SQLite file mailed around) can change those records. So a command
that must rebuild a study's network or read its images (confirm, export, the report page's picture
of the network) takes them from the user: ``--model`` and ``--data``, which must be what the study
records. A built-in model and the built-in digits are rebuilt from their names alone: no code or
file the study chose is read for them. The model's stored arguments are plain literals, checked,
and are passed only to a model the user named.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from autodrop.config import BUILTIN_DATASETS, SearchConfig, absolute_model_spec, is_user_model
from autodrop.errors import StorageError
from autodrop.run.records import DataRecord, StudyRecord, shown_text

if TYPE_CHECKING:  # pragma: no cover
    from autodrop.training.data import ImageData


def needs_model(record: StudyRecord) -> bool:
    """Whether rebuilding the study's network needs the user to name the model (``--model``)."""
    return is_user_model(record.config.model)


def trusted_config(record: StudyRecord, *, model: str | None = None, data: str | None = None,
                   need_data: bool = True) -> SearchConfig:
    """Return the study's settings with the model and data the user named, after checking they are
    the ones the study records; raise StorageError saying what to pass when they are missing."""
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
    if need_data and config.data.source not in BUILTIN_DATASETS:
        if data is None:
            raise StorageError(
                f"study {shown_text(record.name)} was searched on the folder {shown_text(config.data.source, 200)}; "
                "autodrop reads no folder a "
                "study names: pass --data FOLDER (the images the study was searched on) to load them."
            )
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=data))
    return config


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
