"""The winning (or a chosen) trial as plain PyTorch source, plus its trained weights.

The source is written from validated numbers and known identifiers only: every value read from
storage (a shared database anyone can edit) is checked to be what autodrop writes before it is
used, and the layers come from rebuilding the registered model, never from stored text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autodrop import __version__
from autodrop.config import SearchConfig, is_user_model, parse_model_spec
from autodrop.errors import ConfigError, ModelError, StorageError
from autodrop.nets.builtin import BUILTIN_MODELS
from autodrop.nets.shape import ModelShape
from autodrop.outputs import written_layers
from autodrop.outputs.files import check_writable, write_text
from autodrop.run.artifacts import artifact_dir as artifact_folder
from autodrop.run.artifacts import load_weights, open_artifact_store, read_normaliser
from autodrop.run.records import (
    StudyRecord,
    best_trial,
    describe_placement,
    read_study,
    read_trial,
    read_trials,
    shown_text,
)
from autodrop.run.storage import open_existing_study, storage_errors
from autodrop.run.trust import check_same_data, data_record, needs_model, trusted_config

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class ExportRecord:
    """Everything export needs about one completed trial, read from storage and checked."""

    study_name: str
    number: int
    config: SearchConfig  # the study's stored settings, validated
    shape: ModelShape
    classes: tuple[str, ...]
    data_name: str
    sites: dict[str, str]  # site -> kind, in forward order
    placement: dict[str, float | None]
    val_accuracy: float
    train_accuracy: float | None
    seed: int
    scaling: tuple[list[float], list[float]] | None  # per-channel (scale, shift); None if not stored
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # site -> dropout kind / slot, where chosen
    study: StudyRecord | None = None  # the study's record, for what must be checked against it
    weights: tuple[str, str] | None = None  # (artifact id, sha256) of the kept weights; None if none were kept


@dataclass(frozen=True)
class ExportResult:
    """What export wrote, and where the weights came from."""

    study_name: str
    trial: int
    class_name: str
    source_path: Path
    val_accuracy: float  # the trial's recorded validation accuracy
    weights_path: Path | None
    weights_from: str | None  # "stored" (the kept artifact) or "retrained"; None without --weights
    retrained_accuracy: float | None  # validation accuracy of the retrained weights

    def describe(self) -> str:
        """Return what was written, in a few lines for the terminal."""
        lines = [
            f"Wrote {self.class_name} (study {self.study_name!r}, trial {self.trial}, "
            f"val accuracy {100 * self.val_accuracy:.1f}%) to {self.source_path}"
        ]
        if self.weights_path is not None:
            if self.weights_from == "stored":
                lines.append(f"Wrote the trial's stored weights to {self.weights_path}")
            else:
                lines.append(
                    f"No stored weights for trial {self.trial}: retrained it with its seed "
                    f"(val accuracy {100 * (self.retrained_accuracy or 0.0):.1f}%, recorded "
                    f"{100 * self.val_accuracy:.1f}%) and wrote those weights to {self.weights_path}"
                )
        return "\n".join(lines)


# An exporter turns a checked trial into (source, a module whose state dict the weights fit).
Exporter = Callable[[ExportRecord, str], "tuple[str, nn.Module]"]


@storage_errors
def export_model(
    study: str | None = None,
    storage: str | None = None,
    *,
    out: str | os.PathLike[str],
    trial: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    artifact_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    model: str | None = None,
    data: str | None = None,
    model_args: Sequence[str] | Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write trial ``trial`` (default: the best) of ``study`` as PyTorch source, and its weights.

    ``storage`` defaults to ./autodrop.db and ``study`` to the storage's only study. Weights come
    from the artifact the search kept (checked against the digest it recorded); if none was kept,
    the trial is retrained with its seed. ``model`` and ``data`` name the study's own model and
    image folder, which are never taken from the study itself (run/trust.py), and ``model_args``
    the arguments of a user model, which must be the ones the study records.
    """
    out_path = check_writable(out, "--out")
    weights_path = None if weights is None else check_writable(weights, "--weights")
    if weights_path is not None and weights_path == out_path:
        raise ConfigError(f"--out and --weights must be different files, but both are {str(out_path)!r}.")
    opened = open_existing_study(study, storage)
    optuna_study, url = opened.study, opened.url
    frozen = choose_trial(optuna_study, trial)
    record = read_export_record(optuna_study, frozen)
    assert record.study is not None
    record = replace(record, config=trusted_config(record.study, model=model, model_args=model_args,
                                                   need_data=False))
    # A path comparison only (nothing is imported): the user's own file is never written over. After
    # the check above, so that the path looked up is the one the user named, not one a study holds.
    _refuse_model_file(record.config.model, {"--out": out_path, "--weights": weights_path})
    if record.scaling is None:  # a study from before the scaling was recorded: compute it again
        record = replace(record, scaling=_scaling_from_data(record, data))
    exporter = get_exporter(record.config.model)
    class_name = class_name_for(record.config.model)
    source, model = exporter(record, class_name)

    weights_from = retrained_accuracy = None
    state = None
    if weights_path is not None:
        folder = artifact_folder(url, artifact_dir)
        store = open_artifact_store(folder)
        state = None if record.weights is None else load_weights(store, record.weights)
        if state is None and record.weights is not None and artifact_dir is None:
            _refuse_to_retrain_kept_weights(record, folder)
        if state is not None:
            weights_from = "stored"
        else:
            state, retrained_accuracy = _retrain(record, device, data)
            weights_from = "retrained"
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise StorageError(
                f"the weights kept for trial {record.number} do not fit the rebuilt network: "
                f"{str(e).splitlines()[0]}"
            ) from e
    write_text(out_path, source, "--out")
    if weights_path is not None:
        import torch

        try:
            torch.save(state, weights_path)
        except OSError as e:
            raise ConfigError(f"--weights {str(weights_path)!r} cannot be written: {e.strerror or e}.") from e
    return ExportResult(
        study_name=record.study_name, trial=record.number, class_name=class_name, source_path=out_path,
        val_accuracy=record.val_accuracy, weights_path=weights_path, weights_from=weights_from,
        retrained_accuracy=retrained_accuracy,
    )


def _refuse_to_retrain_kept_weights(record: ExportRecord, folder: Path) -> None:
    """Raise StorageError when the search kept the trial's weights in another folder than ``folder``
    (the default, where they are not): the study of an older search, or one moved since. The
    recorded folder is named for the user to judge, never opened: only ``--artifact-dir`` is."""
    recorded = None if record.study is None else record.study.artifact_dir
    if recorded is None or recorded == str(folder):
        return  # kept here and gone since: retraining with the trial's seed is all there is
    raise StorageError(
        f"the weights kept for trial {record.number} are not in {str(folder)!r}; the search recorded the folder "
        f"{shown_text(recorded, 200)}. If that folder (or a copy) is yours, pass it as --artifact-dir to use "
        "them (their digest is checked); pass any other --artifact-dir to retrain the trial instead."
    )


def _refuse_model_file(model: str, outputs: dict[str, Path | None]) -> None:
    """Raise ConfigError if an output would overwrite the user's own model file (FILE.py:Name)."""
    if not is_user_model(model):
        return
    try:
        spec = parse_model_spec(model)
    except ModelError:
        return  # the exporter names the problem
    if spec.form != "file":
        return
    model_file = Path(spec.source)
    for option, path in outputs.items():
        if path is None:
            continue
        same = path.resolve() == model_file.resolve()
        if not same and path.exists() and model_file.exists():
            same = os.path.samefile(path, model_file)  # a hard link, or another route to the same file
        if same:
            raise ConfigError(
                f"{option} {str(path)!r} is the study's model file {str(model_file)!r}; give another file name."
            )


# -- choosing and checking the trial -----------------------------------------------------------


def choose_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Return completed trial ``number``, or the best completed trial (records.best_trial's rule)."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise StorageError(f"study {study.study_name!r} has no trials yet; run autodrop search first.")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if number is None:
        if not complete:
            raise StorageError(f"study {study.study_name!r} has no completed trial yet; there is nothing to export.")
        record = read_study(study)
        # A completed trial holding values autodrop does not write is left out (read_trials warns).
        best = best_trial(read_trials(study, record, complete))
        if best is None:
            raise StorageError(f"study {shown_text(study.study_name)} has no completed trial that autodrop wrote; "
                               "there is nothing to export.")
        return next(t for t in complete if t.number == best.number)
    chosen = next((t for t in trials if t.number == number), None)
    if chosen is None:
        raise StorageError(
            f"study {study.study_name!r} has no trial {number}; its trials are numbered 0 to {trials[-1].number}."
        )
    if chosen.state != TrialState.COMPLETE or chosen.value is None:
        done = ", ".join(str(t.number) for t in complete) or "none"
        raise StorageError(
            f"trial {number} of study {study.study_name!r} did not complete (state: {chosen.state.name.lower()}); "
            f"completed trials: {done}."
        )
    return chosen


def read_export_record(study: optuna.Study, frozen: FrozenTrial) -> ExportRecord:
    """Return what export needs of a completed trial, refusing anything autodrop would not write."""
    record = read_study(study)
    trial = read_trial(record, frozen)
    if trial.seed is None:
        raise StorageError(f"trial {trial.number} of study {record.name!r} has no usable seed.")
    assert trial.val_accuracy is not None
    data = record.data
    return ExportRecord(
        study_name=record.name,
        number=trial.number,
        config=record.config,
        shape=ModelShape(data.channels, len(data.classes), data.image_size),
        classes=data.classes,
        data_name=data.name,
        sites=dict(record.sites),
        placement=trial.placement,
        variants=trial.variants,
        val_accuracy=trial.val_accuracy,
        train_accuracy=trial.train_accuracy,
        seed=trial.seed,
        scaling=read_normaliser(study, data.channels),
        study=record,
        weights=trial.weights,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- exporters ---------------------------------------------------------------------------------


def get_exporter(model_name: str) -> Exporter:
    """Return the exporter for ``model_name``; built-in models share the flat-Sequential one."""
    if model_name in BUILTIN_MODELS:
        return export_builtin
    if is_user_model(model_name):
        return export_user_model
    raise ModelError(
        f"export can write only the built-in models ({', '.join(BUILTIN_MODELS)}) and user models, but this "
        f"study's model is {model_name!r}."
    )


def class_name_for(model_name: str) -> str:
    """Return the Python class name for a registered model: ``simple-cnn`` -> ``SimpleCNN``."""
    if is_user_model(model_name):
        return "ExportedModel"
    if model_name not in BUILTIN_MODELS:
        raise ModelError(f"unknown model {model_name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}.")
    words = [w for w in model_name.replace("_", "-").split("-") if w]
    name = "".join(w.upper() if w in ("cnn", "mlp", "wrn") else w.capitalize() for w in words)
    if not name.isidentifier():  # pragma: no cover - registry names are checked here
        raise ModelError(f"model name {model_name!r} does not make a Python class name.")
    return name


def rebuild(record: ExportRecord) -> "nn.Module":
    """Return the trial's network rebuilt (untrained) with its dropout placed, after checking that
    it has exactly the sites the study records."""
    from autodrop.nets.build import build_model
    from autodrop.nets.sites import apply_placement, site_kinds

    model = build_model(record.config.model, record.shape, model_args=record.config.model_args,
                        in_block=record.config.in_block)
    if list(site_kinds(model).items()) != list(record.sites.items()):
        raise StorageError(
            f"study {record.study_name!r} lists drop sites {list(record.sites)} that model "
            f"{record.config.model!r} does not have now (its sites are {list(site_kinds(model))}); the model's code "
            "or the study changed since the search."
        )
    apply_placement(model, record.placement, record.variants)
    return model


def export_builtin(record: ExportRecord, class_name: str) -> "tuple[str, nn.Module]":
    """Return the source of a built-in (flat nn.Sequential) model and the rebuilt network; residual
    blocks are written as the file's own ``Residual`` class, the chosen dropout inside them."""
    from autodrop.nets.residual import Residual
    from autodrop.nets.sites import BranchDrop, DropSite

    model = rebuild(record)

    init_lines: list[str] = []
    forward_lines: list[str] = []
    for attr, layer in model.named_children():
        if not attr.isidentifier() or attr.startswith("_"):  # pragma: no cover - built-in names
            raise ModelError(f"layer name {attr!r} is not a Python identifier.")
        if isinstance(layer, DropSite) and layer.p is None:
            continue
        expression = _layer_expression(layer, "        ")
        comment = f"  # site {layer.site_name}" if isinstance(layer, DropSite) else ""
        init_lines.append(f"self.{attr} = {expression}{comment}")
        forward_lines.append(f"x = self.{attr}(x)")

    defined = [written_layers.RESIDUAL] if any(isinstance(m, Residual) for m in model.modules()) else []
    if any(isinstance(m, BranchDrop) and m.p is not None for m in model.modules()):
        defined.append(written_layers.DROP_PATH)
    source = _module_source(record, class_name, init_lines, forward_lines, defined)
    _check_source(source, class_name, model)
    return source, model


def _layer_expression(layer: "nn.Module", indent: str) -> str:
    """Return the source that builds ``layer`` (a site as the dropout the placement chose; a residual
    block or a named sequence part by part, its sites that are off left out)."""
    from torch import nn

    from autodrop.nets.residual import Residual
    from autodrop.nets.sites import BranchDrop, DropSite

    inner = indent + "    "
    if isinstance(layer, BranchDrop):
        return "nn.Identity()" if layer.p is None else f"DropPath(p={_rate(layer.p)})"
    if isinstance(layer, DropSite):
        # Channel dropout zeroes whole feature maps, which is what nn.Dropout2d does.
        layer_class = "Dropout2d" if layer.dropout_kind == "channel" else "Dropout"
        return f"nn.{layer_class}(p={_rate(layer.p or 0.0)})"
    if isinstance(layer, Residual):
        parts = [f"{inner}{name}={_layer_expression(getattr(layer, name), inner)}," for name in ("pre", "branch")]
        if layer.shortcut is not None:
            parts.append(f"{inner}shortcut={_layer_expression(layer.shortcut, inner)},")
        parts.append(f"{inner}drop={_layer_expression(layer.drop, inner)},")
        return "Residual(\n" + "\n".join(parts) + f"\n{indent})"
    if type(layer) is nn.Sequential:
        items = []
        for name, child in layer.named_children():
            if isinstance(child, DropSite) and child.p is None:
                continue
            if not name.isidentifier():  # pragma: no cover - built-in names
                raise ModelError(f"layer name {name!r} is not a Python identifier.")
            comment = f"  # site {child.site_name}" if isinstance(child, DropSite) else ""
            items.append(f"{inner}({name!r}, {_layer_expression(child, inner)}),{comment}")
        return "nn.Sequential(OrderedDict([\n" + "\n".join(items) + f"\n{indent}]))"
    return layer_source(layer)


def export_user_model(record: ExportRecord, class_name: str) -> "tuple[str, nn.Module]":
    """Return the source of a user's network (its own class, with the chosen dropout) and the rebuilt network."""
    from autodrop.outputs.export_user import export_custom_source

    model = rebuild(record)
    shape = record.shape
    header = [
        f"The network of autodrop study {ascii(record.study_name)}, trial {record.number}: "
        f"validation accuracy {100 * record.val_accuracy:.2f}%.",
        f"Data {ascii(record.data_name)}: {shape.n_classes} classes, {shape.channels}x{shape.image_size}x"
        f"{shape.image_size} images; seed {record.seed}.",
        f"Trained with {record.config.train.describe()}.",
        f"Dropout: {describe_placement(record.placement, record.variants)}.",
    ]
    source = export_custom_source(
        record.config.model, record.config.model_args, record.placement, channels=shape.channels,
        n_classes=shape.n_classes, image_size=shape.image_size, class_name=class_name, header=header,
        variants=record.variants, in_block=record.config.in_block,
    )
    return source, model


def _rate(p: float) -> str:
    """Return a dropout rate as a person would write it: three decimals at most."""
    text = f"{round(float(p), 3):.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _num(value: Any) -> str:
    """Return a number (or a square pair of ints) as source, refusing anything else."""
    if isinstance(value, tuple) and value and all(_is_int(v) for v in value):
        return repr(value[0]) if len(set(value)) == 1 else repr(tuple(int(v) for v in value))
    if isinstance(value, bool):
        return repr(value)
    if _is_int(value):
        return repr(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(float(value))
    raise ModelError(f"cannot write the value {value!r} as source.")


def _args(positional: list[Any], keywords: list[tuple[str, Any, Any]]) -> str:
    """Join positional values and the keywords whose value differs from its default."""
    parts = [_num(v) for v in positional]
    for key, value, default in keywords:
        if value != default:
            parts.append(f"{key}={_num(value)}")
    return ", ".join(parts)


def layer_source(layer: "nn.Module") -> str:
    """Return the constructor call that builds ``layer``, defaults left out, as a person writes it."""
    from torch import nn

    if type(layer) is nn.Conv2d:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ModelError(f"cannot write {layer!r} as source (only zero padding given in pixels).")
        args = _args(
            [layer.in_channels, layer.out_channels],
            [("kernel_size", layer.kernel_size, None), ("stride", _square(layer.stride), 1),
             ("padding", _square(layer.padding), 0), ("dilation", _square(layer.dilation), 1),
             ("groups", layer.groups, 1), ("bias", layer.bias is not None, True)],
        )
        return f"nn.Conv2d({args})"
    if type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d):
        bias = layer.bias is not None or not layer.affine
        args = _args(
            [layer.num_features],
            [("eps", layer.eps, 1e-5), ("momentum", layer.momentum, 0.1), ("affine", layer.affine, True),
             ("bias", bias, True), ("track_running_stats", layer.track_running_stats, True)],
        )
        return f"nn.{type(layer).__name__}({args})"
    if type(layer) is nn.ReLU:
        return f"nn.ReLU({_args([], [('inplace', layer.inplace, False)])})"
    if type(layer) is nn.MaxPool2d:
        if layer.return_indices:
            raise ModelError(f"cannot write {layer!r} as source (return_indices).")
        kernel = _square(layer.kernel_size)
        args = _args(
            [kernel],
            [("stride", _square(layer.stride), kernel), ("padding", _square(layer.padding), 0),
             ("dilation", _square(layer.dilation), 1), ("ceil_mode", layer.ceil_mode, False)],
        )
        return f"nn.MaxPool2d({args})"
    if type(layer) is nn.AdaptiveAvgPool2d:
        return f"nn.AdaptiveAvgPool2d({_num(_square(layer.output_size))})"
    if type(layer) is nn.Flatten:
        return f"nn.Flatten({_args([], [('start_dim', layer.start_dim, 1), ('end_dim', layer.end_dim, -1)])})"
    if type(layer) is nn.Linear:
        args = _args([layer.in_features, layer.out_features], [("bias", layer.bias is not None, True)])
        return f"nn.Linear({args})"
    if type(layer) in (nn.LogSoftmax, nn.Softmax):
        if not _is_int(layer.dim):
            raise ModelError(f"cannot write {layer!r} as source (no dim).")
        return f"nn.{type(layer).__name__}(dim={_num(layer.dim)})"
    raise ModelError(f"cannot write layer {type(layer).__name__} as source; export knows the built-in models' layers.")


def _square(value: Any) -> Any:
    """Return an int for a square (k, k) pair, the value itself otherwise."""
    if isinstance(value, tuple) and value and len(set(value)) == 1:
        return value[0]
    return value


def _module_source(record: ExportRecord, class_name: str, init_lines: list[str], forward_lines: list[str],
                   defined: list[str] = ()) -> str:
    shape = record.shape
    train = "" if record.train_accuracy is None else f", train accuracy {100 * record.train_accuracy:.2f}%"
    # Strings from storage go into comments and literals only through ascii(), which cannot
    # produce a line break or an unbalanced quote.
    header = [
        f"# {class_name}: the network of autodrop study {ascii(record.study_name)}, trial {record.number}.",
        f"# Validation accuracy {100 * record.val_accuracy:.2f}%{train}.",
        f"# Data {ascii(record.data_name)}: {shape.n_classes} classes, {shape.channels}x{shape.image_size}x"
        f"{shape.image_size} images; seed {record.seed}.",
        f"# Trained with {record.config.train.describe()}.",
        f"# Dropout: {describe_placement(record.placement, record.variants)}.",
        f"# Written by autodrop {__version__}; needs only PyTorch.",
        "#",
        "# Use:",
        f"#     model = load_{_snake(class_name)}(\"weights.pt\")",
        "#     probabilities = model(normalise(images)).softmax(dim=1)  # images: (N, C, H, W), 0..255",
    ]
    imports = ["from collections import OrderedDict", ""] if "OrderedDict" in "\n".join(init_lines) else []
    lines = header + ["", *imports, "import torch", "from torch import nn", ""]
    lines.append(f"CLASSES = {_tuple([ascii(c) for c in record.classes])}  # output index -> class")
    lines.append(f"IMAGE_SIZE = {shape.image_size}")
    if record.scaling is not None:
        scale, shift = record.scaling
        lines += [
            "# Pixels (0..255) are scaled per channel as during the search: x * SCALE + SHIFT.",
            f"SCALE = {_tuple([_num(v) for v in scale])}",
            f"SHIFT = {_tuple([_num(v) for v in shift])}",
            "",
            "",
            "def normalise(images: torch.Tensor) -> torch.Tensor:",
            '    """Return images (N, C, H, W) with pixel values 0..255 scaled as the network was trained."""',
            "    scale = torch.tensor(SCALE).view(1, -1, 1, 1)",
            "    shift = torch.tensor(SHIFT).view(1, -1, 1, 1)",
            "    return torch.addcmul(shift, images.float(), scale)",
        ]
    for definition in defined:
        lines += ["", "", definition.strip("\n")]
    lines += [
        "",
        "",
        f"class {class_name}(nn.Module):",
        "    def __init__(self) -> None:",
        "        super().__init__()",
    ]
    lines += [f"        {line}" for line in init_lines]
    lines += ["", "    def forward(self, x: torch.Tensor) -> torch.Tensor:"]
    lines += [f"        {line}" for line in forward_lines]
    lines += [
        "        return x",
        "",
        "",
        f"def load_{_snake(class_name)}(weights_path: str) -> {class_name}:",
        '    """Return the network with the weights at ``weights_path`` loaded, in eval mode."""',
        f"    model = {class_name}()",
        "    model.load_state_dict(torch.load(weights_path, weights_only=True, map_location=\"cpu\"))",
        "    return model.eval()",
        "",
    ]
    return "\n".join(lines)


def _tuple(items: list[str]) -> str:
    """Return already-written literals as a tuple: ``(a, b)``, or ``(a,)`` for one."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _snake(class_name: str) -> str:
    out = []
    for i, ch in enumerate(class_name):
        if ch.isupper() and i and not class_name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _check_source(source: str, class_name: str, model: "nn.Module") -> None:
    """Run the written source and check its network has the rebuilt one's layers and state keys."""
    from autodrop.nets.sites import DropSite

    namespace: dict[str, Any] = {"__name__": "autodrop_export_check"}
    exec(compile(source, "<exported>", "exec"), namespace)  # our own source, from checked values only
    written = namespace[class_name]()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in written.state_dict().items()}
    if expected != got:  # pragma: no cover - a bug in the writer, not a user error
        raise ModelError(f"the written {class_name} does not match the network: {sorted(set(expected) ^ set(got))}")
    for path, layer in model.named_modules():
        if isinstance(layer, DropSite) or not path or any(True for _ in layer.children()):
            continue
        if repr(written.get_submodule(path)) != repr(layer):  # pragma: no cover - as above
            raise ModelError(f"the written layer {path} is {written.get_submodule(path)!r}, not {layer!r}.")


def _trusted_data(record: ExportRecord, data: str | None) -> "tuple[Any, SearchConfig]":
    """Return the study's images, loaded from the folder the user named and checked to be the ones
    it was searched on, and the settings to train with."""
    from autodrop.training.data import load_data

    assert record.study is not None
    # record.config holds the model and arguments the user named, checked by export_model already.
    config = trusted_config(record.study, model=None if not needs_model(record.study) else record.config.model,
                            model_args=record.config.model_args, data=data)
    images = load_data(config.data)
    check_same_data(record.study, data_record(images))
    return images, config


def _scaling_from_data(record: ExportRecord, data: str | None) -> tuple[list[float], list[float]]:
    from autodrop.training.normaliser import Normaliser

    images, _ = _trusted_data(record, data)
    normaliser = Normaliser(images.train_images)
    return normaliser.scale.flatten().tolist(), normaliser.shift.flatten().tolist()


def _retrain(record: ExportRecord, device_name: str, data: str | None) -> "tuple[dict[str, Any], float]":
    """Train the trial's network again with its seed; return its weights and validation accuracy."""
    from autodrop.training.data import place_data
    from autodrop.training.device import resolve_device
    from autodrop.training.normaliser import Normaliser
    from autodrop.training.placement import train_placement

    device = resolve_device(device_name)
    images, config = _trusted_data(record, data)
    normaliser = Normaliser(images.train_images).to(device)
    placed = place_data(images, device, config.train.data_on_device)
    metrics, model = train_placement(config, placed, normaliser, record.placement, record.variants,
                                     seed=record.seed, device=device)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return state, metrics.val_accuracy
