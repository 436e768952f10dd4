"""Typed, frozen settings for a search, validated in one place.

Every check a user's input goes through lives in ``validate``: the CLI, the TOML study specs and the
Python API all build a :class:`SearchConfig` and so share the same errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from autodrop.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

PRUNERS = ("median", "hyperband", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_STORAGE_FILE = "autodrop.db"


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are shaped."""

    source: str = "digits"  # "digits" or a folder of class subfolders (or train/ and val/)
    image_size: int = 32  # pixels; every image is resized to image_size x image_size
    channels: int | None = None  # 1 or 3; None picks from the data (grayscale only -> 1)
    val_fraction: float = 0.2  # share of each class held out when the folder has no val/
    train_per_class: int | None = None  # keep at most this many training images per class


@dataclass(frozen=True)
class TrainConfig:
    """How one trial trains its network."""

    epochs: int = 4  # full passes over the training images per trial
    batch_size: int = 128  # images per optimiser step
    lr: float = 2e-3  # Adam learning rate
    device: str = "auto"  # auto picks cuda, then mps, then cpu


@dataclass(frozen=True)
class SearchConfig:
    """One search: data, model, training and the study that records it."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: str = "simple-cnn"  # a registered model name
    trials: int = 24  # finished trials the study ends with, baselines included
    rate_range: tuple[float, float] = (0.05, 0.7)  # lowest and highest dropout rate searched
    pruner: str = "median"  # median, hyperband or none
    seed: int = 0  # seeds the sampler and every trial's weights and batches
    study: str | None = None  # None derives a name from the data and model
    storage: str | None = None  # an Optuna storage URL; None is ./autodrop.db
    timeout: float | None = None  # seconds after which no new trial starts
    pack: int | None = None  # trials trained at once as one packed model; 1 is off, None picks by device

    @property
    def study_name(self) -> str:
        """The study's name: the one given, or one made from data and model."""
        if self.study:
            return self.study
        data_name = Path(self.data.source).name or "data"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data_name}-{self.model}").strip("-")
        return slug

    @property
    def storage_url(self) -> str:
        """The storage URL: the one given, or an SQLite file in the working directory."""
        if self.storage:
            return self.storage
        return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"


def validate(config: SearchConfig) -> SearchConfig:
    """Return ``config`` unchanged if every value is usable, else raise ConfigError naming it."""
    data, train = config.data, config.train
    _check(data.image_size >= 8, f"--image-size must be at least 8 pixels, but got {data.image_size}.")
    _check(data.image_size <= 1024, f"--image-size must be at most 1024 pixels, but got {data.image_size}.")
    _check(data.channels in (None, 1, 3), f"--channels must be 1 or 3, but got {data.channels}.")
    _check(
        0.0 < data.val_fraction < 1.0,
        f"--val-fraction must be between 0 and 1 (exclusive), but got {data.val_fraction}.",
    )
    _check(
        data.train_per_class is None or data.train_per_class >= 1,
        f"--train-per-class must be at least 1, but got {data.train_per_class}.",
    )
    _check(train.epochs >= 1, f"--epochs must be at least 1, but got {train.epochs}.")
    _check(train.batch_size >= 1, f"--batch-size must be at least 1, but got {train.batch_size}.")
    _check(
        math.isfinite(train.lr) and train.lr > 0,
        f"--lr must be a positive number, but got {train.lr}.",
    )
    _check(train.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, but got {train.device!r}.")
    _check(config.trials >= 1, f"--trials must be at least 1, but got {config.trials}.")
    low, high = config.rate_range
    _check(
        0.0 <= low < high < 1.0,
        f"--rate-range must satisfy 0 <= low < high < 1, but got {low} {high}.",
    )
    _check(config.pruner in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}, but got {config.pruner!r}.")
    _check(
        config.timeout is None or config.timeout > 0,
        f"--timeout must be a positive number of seconds, but got {config.timeout}.",
    )
    _check(bool(config.model), "--model must name a model, but got an empty string.")
    _check(config.pack is None or config.pack >= 1, f"--pack must be at least 1 (1 trains one trial at a time), but got {config.pack}.")
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The flat option names shared by the CLI and TOML study specs, mapped to where they live.
_DATA_KEYS = {"data": "source", "image-size": "image_size", "channels": "channels",
              "val-fraction": "val_fraction", "train-per-class": "train_per_class"}
_TRAIN_KEYS = {"epochs": "epochs", "batch-size": "batch_size", "lr": "lr", "device": "device"}
_SEARCH_KEYS = {"model": "model", "trials": "trials", "rate-range": "rate_range", "pruner": "pruner",
                "seed": "seed", "study": "study", "storage": "storage", "timeout": "timeout", "pack": "pack"}
OPTION_NAMES = tuple(_DATA_KEYS) + tuple(_TRAIN_KEYS) + tuple(_SEARCH_KEYS)


def config_from_options(options: Mapping[str, Any]) -> SearchConfig:
    """Build a validated SearchConfig from flat option names (``image-size`` or ``image_size``).

    Options that are missing or None keep their defaults.
    """
    given = {}
    for key, value in options.items():
        name = key.replace("_", "-")
        if name not in OPTION_NAMES:
            raise ConfigError(f"unknown setting {key!r}; valid settings are: {', '.join(OPTION_NAMES)}.")
        if value is not None:
            given[name] = value
    if "rate-range" in given:
        given["rate-range"] = _rate_range(given["rate-range"])
    try:
        data = DataConfig(**{_DATA_KEYS[k]: v for k, v in given.items() if k in _DATA_KEYS})
        train = TrainConfig(**{_TRAIN_KEYS[k]: v for k, v in given.items() if k in _TRAIN_KEYS})
        search_fields = {_SEARCH_KEYS[k]: v for k, v in given.items() if k in _SEARCH_KEYS}
        config = SearchConfig(data=data, train=train, **search_fields)
    except TypeError as e:  # pragma: no cover - keys were checked above
        raise ConfigError(str(e)) from e
    _check_types(config)
    return validate(config)


def _rate_range(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rate-range must be two numbers, low and high, but got {value!r}.") from e
    return (low, high)


def _check_types(config: SearchConfig) -> None:
    """Catch TOML values of the wrong type (a string where a number belongs) with a clear message."""
    for section in (config.data, config.train, config):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                continue
            expected = str(f.type)
            if value is None:
                continue
            if expected.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(f"{f.name.replace('_', '-')} must be a whole number, but got {value!r}.")
            if expected.startswith("float") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            ):
                raise ConfigError(f"{f.name.replace('_', '-')} must be a number, but got {value!r}.")
            if expected.startswith("str") and not isinstance(value, str):
                raise ConfigError(f"{f.name.replace('_', '-')} must be text, but got {value!r}.")


def read_spec(path: str | Path) -> dict[str, Any]:
    """Return the settings of a TOML study spec as flat option names."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read study spec {str(path)!r}: {e.strerror or e}.") from e
    try:
        spec = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study spec {str(path)!r} is not valid TOML: {e}.") from e
    for key in spec:
        if key.replace("_", "-") not in OPTION_NAMES:
            raise ConfigError(
                f"study spec {str(path)!r} has unknown setting {key!r}; valid settings are: "
                f"{', '.join(OPTION_NAMES)}."
            )
    return {key.replace("_", "-"): value for key, value in spec.items()}


def config_to_options(config: SearchConfig) -> dict[str, Any]:
    """Return the flat options that rebuild ``config`` (the inverse of config_from_options)."""
    options: dict[str, Any] = {}
    for key, attr in _DATA_KEYS.items():
        options[key] = getattr(config.data, attr)
    for key, attr in _TRAIN_KEYS.items():
        options[key] = getattr(config.train, attr)
    for key, attr in _SEARCH_KEYS.items():
        options[key] = getattr(config, attr)
    options["rate-range"] = list(config.rate_range)
    return options
