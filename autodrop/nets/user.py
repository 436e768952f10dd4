"""A user's network from a ``--model`` spec: find the class or factory, and build it for the data.

Three spellings are accepted besides the built-in names:

- ``path/to/file.py:Name`` imports the file and takes ``Name`` from it;
- ``package.module:Name`` imports an installed (or current-directory) module;
- ``torchvision:NAME`` builds a torchvision classification model with ``weights=None``.

``Name`` may be an ``nn.Module`` class or a function returning one. It is called with the number of
classes, channels and image size where its signature has a parameter of a known name for them,
plus the user's ``--model-arg`` values, which win.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from autodrop.config import ModelSpec
from autodrop.errors import ModelError

# Parameter names a constructor may use for what autodrop knows about the data; the first one in
# the signature gets the value.
CLASS_PARAMS = ("num_classes", "n_classes")
CHANNEL_PARAMS = ("in_channels", "channels")
SIZE_PARAMS = ("image_size", "img_size")


@dataclass(frozen=True)
class FirstConv:
    """How a torchvision model's first convolution was rebuilt for the data's channels."""

    path: str  # the conv's qualified name in the model, e.g. "conv1" or "features.0.0"
    kwargs: dict[str, Any]  # nn.Conv2d arguments: plain ints, tuples, bools and strings


@dataclass(frozen=True)
class BuiltModel:
    """A freshly constructed user network and how it was called."""

    module: nn.Module
    call: str  # the call in words, e.g. "Net(num_classes=10, in_channels=1)"
    kwargs: dict[str, Any] = field(default_factory=dict)  # the keyword arguments it was called with
    first_conv: FirstConv | None = None  # set where a torchvision model was adapted to the channels


def load_target(spec: ModelSpec) -> Callable[..., Any]:
    """Return the class or factory ``spec`` names (torchvision specs have none: see build_user_model)."""
    if spec.form == "file":
        module = _load_file(Path(spec.source))
        where = f"file {spec.source!r}"
    elif spec.form == "module":
        module = _import_module(spec)
        where = f"module {spec.source!r}"
    else:  # pragma: no cover - callers handle torchvision themselves
        raise ModelError(f"{spec.text!r} has no class to load.")
    target: Any = module
    for part in spec.attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{where} has no class or function {spec.attr!r}; it defines {_describe_definitions(module)}.")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"--model {spec.text!r}: {spec.attr!r} is a {type(target).__name__}, not a class or function.")
    return target


def build_user_model(
    spec: ModelSpec, model_args: Mapping[str, Any], *, channels: int, n_classes: int, image_size: int
) -> BuiltModel:
    """Return a freshly initialised network for ``spec``, fitted to the data where it can be."""
    if spec.form == "torchvision":
        return _build_torchvision(spec.source, model_args, channels=channels, n_classes=n_classes)
    target = load_target(spec)
    kwargs = _call_kwargs(target, spec, model_args, channels=channels, n_classes=n_classes, image_size=image_size)
    call = f"{spec.attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        module = target(**kwargs)
    except Exception as e:  # the user's constructor can raise anything; show it
        raise ModelError(f"building {call} from {spec.label} failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelError(f"{call} from {spec.label} gave a {type(module).__name__}, not a torch.nn.Module.")
    return BuiltModel(module, call, kwargs)


def _call_kwargs(
    target: Callable[..., Any], spec: ModelSpec, model_args: Mapping[str, Any], *, channels: int, n_classes: int,
    image_size: int,
) -> dict[str, Any]:
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C extension: pass only what the user gave
        return dict(model_args)
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [name for name, p in parameters.items() if p.kind in keyword_kinds]
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in model_args if key not in named]
    if unknown and not takes_any:
        accepted = ", ".join(named) if named else "no keyword arguments"
        raise ModelError(f"--model-arg {unknown[0]} is not a parameter of {spec.attr} in {spec.label}; it takes: {accepted}.")
    kwargs: dict[str, Any] = {}
    for names, value in ((CLASS_PARAMS, n_classes), (CHANNEL_PARAMS, channels), (SIZE_PARAMS, image_size)):
        name = next((n for n in names if n in named), None)
        if name is not None and not any(n in model_args for n in names):
            kwargs[name] = value
    kwargs.update(model_args)
    return kwargs


# Files imported once per process (keyed by path and modification time), so that building a fresh
# network for every trial does not run the file again.
_FILE_CACHE: dict[tuple[str, int], Any] = {}


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"--model file {str(path)!r} does not exist.")
    key = (str(path), path.stat().st_mtime_ns)
    if key in _FILE_CACHE:
        return _FILE_CACHE[key]
    # A name of its own, so a user file called "models.py" cannot shadow anything importable.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_autodrop_user_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"--model file {str(path)!r} cannot be imported as Python.")
    module = importlib.util.module_from_spec(module_spec)
    # Like running the file as a script: its folder is importable, for its own helper modules.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelError(f"importing --model file {str(path)!r} failed: {type(e).__name__}: {e}") from e
    _FILE_CACHE[key] = module
    return module


def _import_module(spec: ModelSpec) -> Any:
    # As with ``python -m``, a module in the working directory can be named without installing it.
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec.source)
    except ModuleNotFoundError as e:
        raise ModelError(f"--model {spec.text!r}: cannot import module {spec.source!r} ({e}).") from e
    except Exception as e:
        raise ModelError(f"--model {spec.text!r}: importing module {spec.source!r} failed: {type(e).__name__}: {e}") from e
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _describe_definitions(module: Any) -> str:
    """Name the module classes and functions a file defines, for 'not found' messages."""
    own = getattr(module, "__name__", None)
    classes, functions = [], []
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != own:
            continue
        if inspect.isclass(value) and issubclass(value, nn.Module):
            classes.append(name)
        elif inspect.isfunction(value):
            functions.append(name)
    parts = []
    if classes:
        parts.append("nn.Module classes " + ", ".join(classes))
    if functions:
        parts.append("functions " + ", ".join(functions))
    return " and ".join(parts) if parts else "no nn.Module classes or functions"


def check_torchvision_name(name: str) -> None:
    """Raise ModelError unless ``name`` is one of torchvision's classification models."""
    import torchvision  # costs seconds: only when asked for

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"--model torchvision:{name} is not one of torchvision's {len(known)} classification models.{hint} "
            "They are listed by torchvision.models.list_models(module=torchvision.models)."
        )


def _build_torchvision(name: str, model_args: Mapping[str, Any], *, channels: int, n_classes: int) -> BuiltModel:
    import torchvision

    check_torchvision_name(name)
    if model_args.get("weights") is not None:
        raise ModelError("--model-arg weights is not supported: autodrop trains from scratch and downloads nothing.")
    kwargs = {"weights": None, "num_classes": n_classes, **model_args}
    call = f"torchvision.models.get_model({name!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        module = torchvision.models.get_model(name, **kwargs)
    except Exception as e:
        raise ModelError(f"building {call} failed: {type(e).__name__}: {e}") from e
    first_conv = _adapt_first_conv(module, channels)
    return BuiltModel(module, call, kwargs, first_conv)


def _adapt_first_conv(module: nn.Module, channels: int) -> FirstConv | None:
    """Rebuild the first Conv2d to take ``channels`` inputs (torchvision models expect 3)."""
    for path, conv in module.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.in_channels == channels:
            return None
        kwargs = {
            "in_channels": channels,
            "out_channels": conv.out_channels,
            "kernel_size": tuple(conv.kernel_size),
            "stride": tuple(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            "dilation": tuple(conv.dilation),
            "groups": 1 if conv.groups == conv.in_channels else conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }
        set_submodule(module, path, nn.Conv2d(**kwargs))
        return FirstConv(path, kwargs)
    return None


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
