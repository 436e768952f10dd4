"""The built-in CNNs, each a flat ``nn.Sequential`` with its candidate drop sites as named layers.

A flat sequence keeps every layer visible by name: the state dict keys read like the layers, and
export can write the network back out as plain source layer by layer. A conv site that has a batch
norm in its block is declared twice, before the batch norm and after the activation; a placement
switches on at most one of the two.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from torch import nn

from autodrop.errors import ModelError
from autodrop.sites import DropSite


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


def build_model(name: str, shape: ModelShape) -> nn.Module:
    """Return a freshly initialised model ``name`` fitted to ``shape``, all sites off."""
    return get_model_entry(name).build(shape)
