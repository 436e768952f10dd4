"""Typed, frozen settings for a search, validated in one place.

Every check a user's input goes through lives in ``validate``: the CLI, the TOML study specs and the
Python API all build a :class:`SearchConfig` and so share the same errors.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from autodrop.errors import ConfigError, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

PRUNERS = ("noise", "median", "hyperband", "none")
# Grouped multivariate TPE (models rates that exist only when their site is on), or random search.
SAMPLERS = ("tpe", "random")
# What dropout zeroes at a conv site: single activations (nn.Dropout), whole feature maps
# (nn.Dropout2d), or, at a site that follows a residual sum, the block's whole residual branch for
# some images of the batch (stochastic depth, timm's drop_path).
DROPOUT_KINDS = ("element", "channel", "branch")
BRANCH = "branch"
# Sites inside a block class the network repeats (ResNet's BasicBlock), between its convolutions:
# one decision for all the blocks of a stage, one per block call, or none.
IN_BLOCK = ("per-stage", "per-call", "off")
IN_BLOCK_PREFIX = "in:"  # the names of sites inside repeated blocks: in:STAGE:CONV
# The slot a conv site takes in its block: after the activation (and pooling), or between the conv
# and its batch norm, where dropout shifts the variance that batch norm sees. The first is the default.
SLOTS = ("after-act", "before-bn")
SCHEDULES = ("whole", "early")
# The training recipe: the optimiser (Adam, or SGD with Nesterov momentum 0.9), each with its own
# default learning rate; how the learning rate moves over the run; augmentations of the training
# batches (flip: mirror left-right; crop: pad and crop back, a random shift; cutout: a square of
# each image blanked).
OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 2e-3, "sgd": 0.05}
LR_SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTATIONS = ("flip", "crop", "cutout")
# The arithmetic of training and evaluation: float32, bf16 autocast, or auto (bf16 where the device
# computes it natively, training/device.py). A study stores the one it trained in, never "auto".
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
# Whether the images are copied to the device (batches indexed there) or stay on the host (batches
# gathered there and copied): auto copies them to a GPU when they fit in its memory.
DATA_ON_DEVICE = ("auto", "yes", "no")
BUILTIN_DATASETS = ("digits",)  # data names that are not folders
DEFAULT_STORAGE_FILE = "autodrop.db"
DEFAULT_CHECKPOINT_DIR = "autodrop-checkpoints"
_DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


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
    lr: float | None = None  # peak learning rate; None: the optimiser's default (DEFAULT_LR)
    device: str = "auto"  # auto picks cuda, then mps, then cpu; cuda:N names one GPU
    data_on_device: str = "auto"  # of DATA_ON_DEVICE; where the images are kept while trials train
    schedule: str = "whole"  # "whole": dropout all run; "early": only in the first half of the epochs
    optimizer: str = "adam"  # adam, or sgd (Nesterov momentum 0.9)
    weight_decay: float = 0.0  # decoupled (AdamW style): each step multiplies weights by 1 - lr * weight_decay
    lr_schedule: str = "constant"  # constant, cosine (5% linear warm-up) or onecycle; stepped every batch
    label_smoothing: float = 0.0  # share of each target spread over the other classes, in [0, 1)
    augment: tuple[str, ...] = ()  # of AUGMENTATIONS, applied to each training batch on the device
    precision: str = "auto"  # of PRECISIONS; a study's stored settings hold fp32 or bf16

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: the one given, else the optimiser's default."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, DEFAULT_LR["adam"])

    def describe(self) -> str:
        """Return the recipe in words, e.g. "Adam 2e-3, cosine, weight decay 5e-4, flip+crop, 30 epochs, bf16 autocast"."""
        schedule = {"constant": "constant rate", "cosine": "cosine", "onecycle": "one-cycle"}.get(self.lr_schedule,
                                                                                               self.lr_schedule)
        parts = [f"{'Adam' if self.optimizer == 'adam' else 'SGD (Nesterov)'} {self.learning_rate:g}",
                 schedule, f"weight decay {self.weight_decay:g}" if self.weight_decay else "no weight decay",
                 "+".join(self.augment) if self.augment else "no augmentation"]
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        parts.append(f"batch {self.batch_size}, {self.epochs} epoch{'s' if self.epochs != 1 else ''}")
        parts.append({"fp32": "float32", "bf16": "bf16 autocast"}.get(self.precision, "precision auto"))
        return ", ".join(parts)


@dataclass(frozen=True)
class SearchConfig:
    """One search: data, model, training and the study that records it."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: str = "simple-cnn"  # a built-in name, FILE.py:NAME, package.module:NAME or torchvision:NAME
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for a user model
    trials: int = 20  # finished trials the study ends with, baselines included
    rate_range: tuple[float, float] = (0.05, 0.7)  # lowest and highest dropout rate searched
    kinds: tuple[str, ...] = DROPOUT_KINDS  # dropout kinds searched at conv sites (branch: after residual sums)
    in_block: str = "per-stage"  # sites inside repeated blocks: one decision per stage, per call, or none
    slots: tuple[str, ...] = SLOTS  # slots searched for conv sites that have a batch norm
    pruner: str = "noise"  # noise (prunes only trials clearly behind, late), median, hyperband or none
    sampler: str = "tpe"  # tpe or random
    seed: int = 0  # seeds the sampler and every trial's weights and batches
    study: str | None = None  # None derives a name from the data and model
    storage: str | None = None  # an Optuna storage URL; None is ./autodrop.db
    timeout: float | None = None  # seconds after which no new trial starts
    artifact_dir: str | None = None  # where kept weights go; None is a folder beside the SQLite file
    workers: int = 1  # worker processes this run starts on this machine, all on the one study
    devices: tuple[str, ...] = ()  # devices handed to the workers in turn; () uses `device` for all
    checkpoint_dir: str | None = None  # where running trials keep per-epoch checkpoints
    pack: int | None = None  # trials trained at once as one packed network; None: 8 per GPU, 1 on a CPU

    @property
    def study_name(self) -> str:
        """The study's name: the one given, or one made from data and model."""
        if self.study:
            return self.study
        data_name = Path(self.data.source).name or "data"
        model = self.model
        found = _file_part(model)
        if found is not None:  # the stored path is absolute: name it by file and class
            path, attr = found
            model = f"{Path(path).stem}-{attr}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data_name}-{model}").strip("-")
        return slug

    @property
    def storage_url(self) -> str:
        """The storage URL: the one given, or an SQLite file in the working directory."""
        if self.storage:
            return self.storage
        return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"

    @property
    def checkpoint_root(self) -> Path:
        """The checkpoint folder: the one given, else next to an SQLite file, else in the working directory."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).absolute()
        database = sqlite_file(self.storage_url)
        if database is not None:
            return database.absolute().parent / DEFAULT_CHECKPOINT_DIR
        return Path.cwd() / DEFAULT_CHECKPOINT_DIR

    def worker_devices(self) -> list[str]:
        """The device of each worker process: ``devices`` in turn, or ``device`` for all."""
        pool = list(self.devices) or [self.train.device]
        return [pool[i % len(pool)] for i in range(self.workers)]


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
        train.lr is None or (math.isfinite(train.lr) and train.lr > 0),
        f"--lr must be a positive number, but got {train.lr}.",
    )
    _check(train.optimizer in OPTIMIZERS,
           f"--optimizer must be one of {', '.join(OPTIMIZERS)}, but got {train.optimizer!r}.")
    _check(train.lr_schedule in LR_SCHEDULES,
           f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, but got {train.lr_schedule!r}.")
    _check(math.isfinite(train.weight_decay) and 0.0 <= train.weight_decay < 1.0,
           f"--weight-decay must be at least 0 and below 1, but got {train.weight_decay}.")
    _check(math.isfinite(train.label_smoothing) and 0.0 <= train.label_smoothing < 1.0,
           f"--label-smoothing must be at least 0 and below 1, but got {train.label_smoothing}.")
    _check(all(a in AUGMENTATIONS for a in train.augment) and len(set(train.augment)) == len(train.augment),
           f"--augment must be none or a comma-separated list of {', '.join(AUGMENTATIONS)}, but got "
           f"{','.join(train.augment)!r}.")
    _check(train.precision in PRECISIONS,
           f"--precision must be one of {', '.join(PRECISIONS)}, but got {train.precision!r}.")
    _check(
        _DEVICE_PATTERN.fullmatch(train.device) is not None,
        f"--device must be one of {', '.join(DEVICES)} or cuda:N, but got {train.device!r}.",
    )
    _check(train.data_on_device in DATA_ON_DEVICE,
           f"--data-on-device must be one of {', '.join(DATA_ON_DEVICE)}, but got {train.data_on_device!r}.")
    _check(config.workers >= 1, f"--workers must be at least 1, but got {config.workers}.")
    _check(config.pack is None or config.pack >= 1, f"--pack must be at least 1, but got {config.pack}.")
    for device in config.devices:
        _check(
            _DEVICE_PATTERN.fullmatch(device) is not None,
            f"--devices must list devices such as cuda:0,cuda:1 (or cpu, mps), but got {device!r}.",
        )
    _check(
        config.workers == 1 or storage_dialect(config.storage_url) != "sqlite"
        or sqlite_file(config.storage_url) is not None,
        f"--workers {config.workers} needs a storage every process can open, but {config.storage_url!r} is in "
        "memory; use an SQLite file or PostgreSQL.",
    )
    _check(
        train.schedule in SCHEDULES,
        f"--schedule must be one of {', '.join(SCHEDULES)}, but got {train.schedule!r}.",
    )
    for option, values, allowed in (("--kinds", config.kinds, DROPOUT_KINDS), ("--slots", config.slots, SLOTS)):
        _check(
            len(values) >= 1 and all(v in allowed for v in values) and len(set(values)) == len(values),
            f"{option} must be a comma-separated list of {', '.join(allowed)}, but got {','.join(values)!r}.",
        )
    _check(config.in_block in IN_BLOCK,
           f"--in-block must be one of {', '.join(IN_BLOCK)}, but got {config.in_block!r}.")
    _check(config.trials >= 1, f"--trials must be at least 1, but got {config.trials}.")
    # Optuna's samplers take the seed as numpy's, an unsigned 32-bit number.
    _check(0 <= config.seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, but got {config.seed}.")
    low, high = config.rate_range
    _check(
        0.0 <= low < high < 1.0,
        f"--rate-range must satisfy 0 <= low < high < 1, but got {low} {high}.",
    )
    _check(config.pruner in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}, but got {config.pruner!r}.")
    _check(config.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, but got {config.sampler!r}.")
    _check(
        config.timeout is None or config.timeout > 0,
        f"--timeout must be a positive number of seconds, but got {config.timeout}.",
    )
    _check(bool(config.model), "--model must name a model, but got an empty string.")
    for key in config.model_args:
        _check(
            _argument_name(key),
            f"--model-arg names must be Python identifiers other than keywords, but got {key!r}.",
        )
    return config


def storage_dialect(url: str) -> str:
    """Return the database kind a storage URL names: ``sqlite``, ``postgresql``... (driver left out)."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def sqlite_file(url: str) -> Path | None:
    """Return the database file an SQLite URL names, or None for another database or SQLite in memory.

    The one reading of SQLite URLs: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, a driver
    named (``sqlite+pysqlite:///...``) or not, with or without ``?options``.
    """
    if storage_dialect(url) != "sqlite" or ":///" not in url:
        return None
    rest = url.split(":///", 1)[1].split("?", 1)[0]
    if not rest or rest == ":memory:" or rest.startswith("file:"):
        return None
    return Path(rest)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The flat option names shared by the CLI and TOML study specs, mapped to where they live.
_DATA_KEYS = {"data": "source", "image-size": "image_size", "channels": "channels",
              "val-fraction": "val_fraction", "train-per-class": "train_per_class"}
_TRAIN_KEYS = {"epochs": "epochs", "batch-size": "batch_size", "lr": "lr", "device": "device",
               "schedule": "schedule", "optimizer": "optimizer", "weight-decay": "weight_decay",
               "lr-schedule": "lr_schedule", "label-smoothing": "label_smoothing", "augment": "augment",
               "precision": "precision", "data-on-device": "data_on_device"}
_SEARCH_KEYS = {"model": "model", "model-args": "model_args", "trials": "trials", "rate-range": "rate_range", "kinds": "kinds",
                "slots": "slots", "in-block": "in_block", "pruner": "pruner", "sampler": "sampler", "seed": "seed", "study": "study", "storage": "storage",
                "timeout": "timeout",
                "artifact-dir": "artifact_dir",
                "workers": "workers", "devices": "devices", "checkpoint-dir": "checkpoint_dir", "pack": "pack"}
OPTION_NAMES = tuple(_DATA_KEYS) + tuple(_TRAIN_KEYS) + tuple(_SEARCH_KEYS)
# Earlier names of settings, still read (from specs, stored studies and the command line).
OPTION_ALIASES = {"orders": "slots"}


def option_name(key: str) -> str:
    """Return the current flat name of setting ``key`` (``image_size`` -> ``image-size``, ``orders`` -> ``slots``)."""
    name = key.replace("_", "-")
    return OPTION_ALIASES.get(name, name)


def config_from_options(options: Mapping[str, Any], *, from_storage: bool = False) -> SearchConfig:
    """Build a validated SearchConfig from flat option names (``image-size`` or ``image_size``).

    Options that are missing or None keep their defaults. ``from_storage``: the options were read
    from a study, so a model file's path is kept as stored (made absolute when the search stored
    it), never looked up on this machine.
    """
    given = {}
    for key, value in options.items():
        name = option_name(key)
        if name not in OPTION_NAMES:
            raise ConfigError(f"unknown setting {key!r}; valid settings are: {', '.join(OPTION_NAMES)}.")
        if value is not None:
            given[name] = value
    if "rate-range" in given:
        given["rate-range"] = _rate_range(given["rate-range"])
    for key, allowed in (("kinds", DROPOUT_KINDS), ("slots", SLOTS), ("augment", AUGMENTATIONS)):
        if key in given:
            given[key] = _choice_list(key, given[key], allowed)
    if given.get("augment") == ("none",):
        given["augment"] = ()
    if "model-args" in given:
        given["model-args"] = parse_model_args(given["model-args"])
    if isinstance(given.get("model"), str) and not from_storage:
        given["model"] = absolute_model_spec(given["model"])
    if "devices" in given:
        given["devices"] = _devices(given["devices"])
        # One worker per listed device unless told otherwise.
        given.setdefault("workers", max(1, len(given["devices"])))
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


def _choice_list(key: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """Accept ``"element,channel"`` or ``["element", "channel"]``."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):  # a TOML number or boolean would fail below as a TypeError
        raise ConfigError(f"--{key} must be a comma-separated list of {', '.join(allowed)}, but got {value!r}.")
    return tuple(str(v).strip() for v in value if str(v).strip())


def parse_model_args(value: Any) -> dict[str, Any]:
    """Return model keyword arguments from a mapping (TOML) or ``KEY=VALUE`` strings (CLI).

    Values given as text become int, float, bool (true/false) or None (none) where they read as
    one, else stay text: ``depth=3`` passes the number 3.
    """
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        if isinstance(value, str):
            value = [value]
        pairs = []
        for item in value:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--model-arg must be KEY=VALUE, but got {item!r}.")
            pairs.append((key.strip(), parse_value(text.strip())))
    args: dict[str, Any] = {}
    for key, item in pairs:
        if not _argument_name(key):
            raise ConfigError(f"--model-arg names must be Python identifiers other than keywords, but got {key!r}.")
        if not (item is None or isinstance(item, (bool, int, float, str))):
            raise ConfigError(f"--model-arg {key} must be a number, true/false or text, but got {item!r}.")
        args[key] = item
    return args


def _argument_name(key: Any) -> bool:
    # The exported source passes model arguments as keywords, and `class=3` would not compile there.
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)


def parse_value(text: str) -> Any:
    """Return ``text`` as the int, float, bool or None it spells, else as the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value that names a user model."""

    form: str  # "file", "module" or "torchvision"
    source: str  # the absolute file path, the module name, or the torchvision model name
    attr: str  # the class or factory's (dotted) name in the file or module; "" for torchvision
    text: str  # the spec as given

    @property
    def label(self) -> str:
        """A short name for messages and tables: ``forum_net.py:Net``, ``torchvision:resnet18``."""
        if self.form == "file":
            return f"{Path(self.source).name}:{self.attr}"
        return self.text


def model_label(spec: str) -> str:
    """Return a short name for a ``--model`` value: the built-in name, or ``forum_net.py:Net``."""
    return parse_model_spec(spec).label if is_user_model(spec) else spec


def is_user_model(spec: str) -> bool:
    """Return whether ``spec`` names a user model rather than a built-in one."""
    return ":" in spec or spec.endswith(".py")


def _file_part(spec: str) -> tuple[str, str] | None:
    """Return (path, name) when ``spec`` names a class in a Python file (``path/net.py:Net``)."""
    if spec.startswith(TORCHVISION_PREFIX):
        return None
    path, sep, attr = spec.rpartition(":")
    if sep and (path.endswith(".py") or "/" in path or "\\" in path):
        return path, attr
    return None


def parse_model_spec(spec: str) -> ModelSpec:
    """Return the parsed user-model ``spec``, or raise ModelError saying which form was expected.

    The one reading of the ``--model`` grammar: ``FILE.py:Name``, ``package.module:Name`` or
    ``torchvision:NAME``. Parsing touches no file and imports nothing.
    """
    if spec.startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):]
        if not name.isidentifier():
            raise ModelError(f"--model {spec!r} must name a torchvision model, e.g. torchvision:resnet18.")
        return ModelSpec("torchvision", name, "", spec)
    source, sep, attr = spec.rpartition(":")
    if not sep:
        if spec.endswith(".py"):
            raise ModelError(f"--model {spec!r} names a file but no class; write {spec}:ClassName.")
        raise ModelError(f"--model {spec!r} is not a user model spec (FILE.py:Name, package.module:Name, torchvision:NAME).")
    if not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ModelError(f"--model {spec!r} must end in :Name, a class or function name, but got {attr!r}.")
    if _file_part(spec) is not None:
        return ModelSpec("file", str(Path(source).expanduser().resolve()), attr, spec)
    if not source or not all(part.isidentifier() for part in source.split(".")):
        raise ModelError(f"--model {spec!r}: {source!r} is neither a .py file nor a module name like package.module.")
    return ModelSpec("module", source, attr, spec)


def absolute_model_spec(spec: str, *, relative_to: Path | None = None) -> str:
    """Return ``spec`` with a file path made absolute, so the study can rebuild the model anywhere.

    A relative path is taken from the working directory; failing that, from ``relative_to`` (the
    folder of the study spec that names it). Other specs come back unchanged.
    """
    found = _file_part(spec)
    if found is None:
        return spec
    path, attr = found
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and relative_to is not None:
        if (relative_to / candidate).exists():
            candidate = relative_to / candidate
    return f"{candidate.resolve()}:{attr}"


def _devices(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"devices must be a list of device names such as cuda:0,cuda:1, but got {value!r}.")
    return tuple(value)


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
        if option_name(key) not in OPTION_NAMES:
            raise ConfigError(
                f"study spec {str(path)!r} has unknown setting {key!r}; valid settings are: "
                f"{', '.join(OPTION_NAMES)}."
            )
    options = {option_name(key): value for key, value in spec.items()}
    if isinstance(options.get("model"), str):
        options["model"] = absolute_model_spec(options["model"], relative_to=path.parent)
    return options


def config_to_options(config: SearchConfig) -> dict[str, Any]:
    """Return the flat options that rebuild ``config`` (the inverse of config_from_options)."""
    options: dict[str, Any] = {}
    for key, attr in _DATA_KEYS.items():
        options[key] = getattr(config.data, attr)
    for key, attr in _TRAIN_KEYS.items():
        options[key] = getattr(config.train, attr)
    for key, attr in _SEARCH_KEYS.items():
        options[key] = getattr(config, attr)
    options["lr"] = config.train.learning_rate  # stored as the rate trained with, whatever chose it
    options["augment"] = list(config.train.augment)
    options["rate-range"] = list(config.rate_range)
    options["kinds"] = list(config.kinds)
    options["slots"] = list(config.slots)
    options["model-args"] = dict(config.model_args)
    options["devices"] = list(config.devices)
    return options


def merge_options(
    spec: Mapping[str, Any], given: Mapping[str, Any], model_args: Sequence[str] | Mapping[str, Any] = ()
) -> dict[str, Any]:
    """Return the settings that win: a study spec's, overridden by options given on the command
    line, with ``--model-arg`` keys added over the spec's ``model-args`` (a key given twice takes the
    command line's value). The one rule of precedence for every command that reads a spec."""
    merged = {option_name(key): value for key, value in spec.items()}
    for name, value in given.items():
        merged[option_name(name)] = value
    if model_args:
        merged["model-args"] = {**parse_model_args(spec.get("model-args") or {}), **parse_model_args(model_args)}
    if merged.get("channels") is not None:
        try:
            merged["channels"] = int(merged["channels"])
        except (TypeError, ValueError):
            pass  # validation names the bad value
    return merged


def config_from_sources(
    spec_path: str | Path | None, given: Mapping[str, Any], model_args: Sequence[str] = ()
) -> SearchConfig:
    """Return the validated settings from a study spec file (if any), the options given on the
    command line and ``--model-arg`` values, in that order of precedence."""
    spec = read_spec(spec_path) if spec_path else {}
    return config_from_options(merge_options(spec, given, model_args))
