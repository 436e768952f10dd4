"""The built-in CNNs, each a flat ``nn.Sequential`` with its candidate drop sites as named layers.

A flat sequence keeps every layer visible by name: the state dict keys read like the layers, and
export can write the network back out as plain source layer by layer. A conv site that has a batch
norm in its block is declared twice, before the batch norm and after the activation; a placement
switches on at most one of the two.

``build_model`` also builds users' networks (``FILE.py:Name``, ``package.module:Name``,
``torchvision:NAME``): usermodel constructs them and discover puts DropSites at their candidate
sites, so the rest of autodrop treats them like the built-in ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autodrop.discover import Discovery, SiteInfo, discovery_of, insert_sites
from autodrop.errors import ModelError
from autodrop.sites import DropSite, iter_sites
from autodrop.usermodel import build_user_model, check_torchvision_name, is_user_model, load_target, parse_model_spec


@dataclass(frozen=True)
class ModelShape:
    """What a model must fit: the data's channels, classes and image size."""

    channels: int  # 1 or 3
    n_classes: int
    image_size: int  # pixels per side


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it and what it is."""

    build: Callable[[ModelShape], nn.Module]
    summary: str


def build_simple_cnn(shape: ModelShape) -> nn.Sequential:
    """Return three conv-bn-relu-pool blocks (32/64/128 channels) and a 256-unit head."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_channels = shape.channels
    size = shape.image_size
    for block, width in enumerate((32, 64, 128), start=1):
        layers[f"conv{block}"] = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        layers[f"drop_conv{block}_before_bn"] = DropSite(f"conv{block}", "conv", slot="before-bn")
        layers[f"bn{block}"] = nn.BatchNorm2d(width)
        layers[f"relu{block}"] = nn.ReLU(inplace=True)
        layers[f"pool{block}"] = nn.MaxPool2d(2)
        layers[f"drop_conv{block}"] = DropSite(f"conv{block}", "conv")
        in_channels, size = width, size // 2
    layers["flatten"] = nn.Flatten()
    layers["drop_fc1"] = DropSite("fc1", "fc")
    layers["fc1"] = nn.Linear(in_channels * size * size, 256)
    layers["relu_fc1"] = nn.ReLU(inplace=True)
    layers["drop_fc2"] = DropSite("fc2", "fc")
    layers["fc2"] = nn.Linear(256, shape.n_classes)
    return nn.Sequential(layers)


def build_seed_cnn(shape: ModelShape) -> nn.Sequential:
    """Return the forum question's network: four stages, then fc -> relu -> fc -> log-softmax.

    Each stage is conv -> pool -> relu -> batchnorm followed by three 3x3 conv+relu layers. It was
    written for 64x64 inputs; other sizes work as long as four poolings leave at least one pixel.
    """
    if shape.image_size < 16:
        raise ModelError(f"seed-cnn pools four times and needs --image-size of at least 16, but got {shape.image_size}.")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_channels = shape.channels
    size = shape.image_size
    for stage, width in enumerate((16, 32, 64, 128), start=1):
        layers[f"conv{stage}"] = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers[f"pool{stage}"] = nn.MaxPool2d(2)
        layers[f"relu{stage}"] = nn.ReLU(inplace=True)
        layers[f"drop_stage{stage}_before_bn"] = DropSite(f"stage{stage}", "conv", slot="before-bn")
        layers[f"bn{stage}"] = nn.BatchNorm2d(width)
        layers[f"drop_stage{stage}"] = DropSite(f"stage{stage}", "conv")
        for inner in (1, 2, 3):
            name = f"conv{stage}{inner}"
            layers[name] = nn.Conv2d(width, width, kernel_size=3, padding=1)
            layers[f"relu{stage}{inner}"] = nn.ReLU(inplace=True)
            layers[f"drop_{name}"] = DropSite(name, "conv")
        in_channels, size = width, size // 2
    layers["flatten"] = nn.Flatten()
    layers["drop_fc1"] = DropSite("fc1", "fc")
    layers["fc1"] = nn.Linear(in_channels * size * size, 256)
    layers["relu_fc1"] = nn.ReLU(inplace=True)
    layers["drop_fc2"] = DropSite("fc2", "fc")
    layers["fc2"] = nn.Linear(256, shape.n_classes)
    # Log-probabilities, as in the forum's network; cross-entropy on them equals NLL, because
    # log_softmax of log-probabilities returns them unchanged.
    layers["log_softmax"] = nn.LogSoftmax(dim=1)
    return nn.Sequential(layers)


MODELS: dict[str, ModelEntry] = {
    "simple-cnn": ModelEntry(build_simple_cnn, "3 conv-bn-relu-pool blocks (32/64/128) and a 256-unit head"),
    "seed-cnn": ModelEntry(build_seed_cnn, "the forum question's 4-stage CNN with log-softmax output, for 64x64"),
}


def get_model_entry(name: str) -> ModelEntry:
    """Return the registered model called ``name``, or raise ModelError listing the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; built-in models are: {', '.join(MODELS)}.") from None


def check_model(name: str, model_args: Mapping[str, Any] | None = None) -> None:
    """Raise ModelError if ``name`` is neither a built-in model nor a user model that can be found.

    Cheap: a user model's file or module is imported, nothing is built.
    """
    if not is_user_model(name):
        get_model_entry(name)
        if model_args:
            raise ModelError(
                f"--model-arg is for your own models (FILE.py:Name, package.module:Name, torchvision:NAME); "
                f"built-in model {name!r} takes none, but got {', '.join(model_args)}."
            )
        return
    spec = parse_model_spec(name)
    if spec.kind == "torchvision":
        check_torchvision_name(spec.source)
    else:
        load_target(spec)


def build_model(name: str, shape: ModelShape, *, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Return a freshly initialised model ``name`` fitted to ``shape``, all sites off.

    ``name`` is a built-in model or a user model spec (``FILE.py:Name``, ``package.module:Name``,
    ``torchvision:NAME``); a user model comes back with DropSites at its discovered sites.
    """
    if is_user_model(name):
        return _build_user_network(name, shape, model_args or {})
    check_model(name, model_args)
    return get_model_entry(name).build(shape)


def example_batch(shape: ModelShape) -> torch.Tensor:
    """Return two fixed random images of ``shape``, drawn without touching the global RNG."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, shape.channels, shape.image_size, shape.image_size, generator=generator)


def _build_user_network(name: str, shape: ModelShape, model_args: Mapping[str, Any]) -> nn.Module:
    spec = parse_model_spec(name)
    built = build_user_model(
        spec, model_args, channels=shape.channels, n_classes=shape.n_classes, image_size=shape.image_size
    )
    example = example_batch(shape)
    # The plan found for the first trial's network serves every later one (same code, same call).
    version = Path(spec.source).stat().st_mtime_ns if spec.kind == "file" else None
    cache_key = (spec.text, version, built.call, type(built.module), shape)
    model = insert_sites(built.module, example, label=spec.label, cache_key=cache_key)
    if cache_key in _CHECKED_OUTPUTS:
        return model
    model.eval()
    with torch.no_grad():
        out = model(example)
    model.train()
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"model {spec.label} returns a {type(out).__name__}, but autodrop needs one tensor of class scores "
            f"per image (shape batch x {shape.n_classes})."
        )
    if tuple(out.shape) != (2, shape.n_classes):
        raise ModelError(
            f"model {spec.label} gives outputs of shape {tuple(out.shape[1:])} per image, but the data has "
            f"{shape.n_classes} classes; build it with {shape.n_classes} outputs (autodrop passes num_classes "
            "or n_classes when the constructor takes one)."
        )
    _CHECKED_OUTPUTS.add(cache_key)
    return model


_CHECKED_OUTPUTS: set = set()  # cache keys of user networks whose output was already checked


def describe_model_sites(
    name: str, shape: ModelShape, *, model_args: Mapping[str, Any] | None = None
) -> Discovery:
    """Return the candidate sites of model ``name`` built for ``shape``, with what each follows."""
    model = build_model(name, shape, model_args=model_args)
    found = discovery_of(model)
    if found is not None:
        return found
    # A built-in model: each site follows the layer registered before it.
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        site.register_forward_pre_hook(
            lambda module, args: shapes.__setitem__(module.site_name, tuple(args[0].shape[1:]))
        )
        for site in iter_sites(model)
    ]
    model.eval()
    with torch.no_grad():
        model(example_batch(shape))
    for handle in handles:
        handle.remove()
    infos = []
    previous = "input"
    for child_name, child in model.named_children():
        if isinstance(child, DropSite):
            infos.append(SiteInfo(child.site_name, child.kind, previous, shapes.get(child.site_name, ())))
        else:
            previous = child_name
    return Discovery("built-in", tuple(infos))
