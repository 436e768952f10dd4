"""The built-in CNNs: one registry entry each, from which everything else learns about them.

Each is a flat ``nn.Sequential`` with its candidate drop sites as named layers. A flat sequence
keeps every layer visible by name: the state dict keys read like the layers, export writes the
network back out as plain source layer by layer, and packing stacks K copies side by side. A
conv site that has a batch norm in its block is declared twice, before the batch norm and after
the activation; a placement switches on at most one of the two.

Adding a model is one entry in ``BUILTIN_MODELS``: the CLI's help lists the registry, export and
packing check the layers they meet, and tests/nets/test_builtin.py runs every entry through building,
packing and export. Torch is imported inside the builders, so that reading the registry (the
CLI's help) stays as fast as importing this module.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from autodrop.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from autodrop.nets.shape import ModelShape


@dataclass(frozen=True)
class BuiltinModel:
    """A registered model: how to build it for the data, and what it is in a few words."""

    build: Callable[["ModelShape"], "nn.Sequential"]  # a fresh network, every site off
    summary: str  # for help texts and listings
    min_image_size: int = 8  # pixels per side the network needs


def build_simple_cnn(shape: "ModelShape") -> "nn.Sequential":
    """Return three conv-bn-relu-pool blocks (32/64/128 channels) and a 256-unit head."""
    from torch import nn

    from autodrop.nets.sites import DropSite

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
    _add_head(layers, in_channels * size * size, shape.n_classes)
    return nn.Sequential(layers)


def build_seed_cnn(shape: "ModelShape") -> "nn.Sequential":
    """Return the forum question's network: four stages, then fc -> relu -> fc -> log-softmax.

    Each stage is conv -> pool -> relu -> batchnorm followed by three 3x3 conv+relu layers. It was
    written for 64x64 inputs; other sizes work as long as four poolings leave at least one pixel.
    """
    from torch import nn

    from autodrop.nets.sites import DropSite

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
    _add_head(layers, in_channels * size * size, shape.n_classes)
    # Log-probabilities, as in the forum's network; cross-entropy on them equals NLL, because
    # log_softmax of log-probabilities returns them unchanged.
    layers["log_softmax"] = nn.LogSoftmax(dim=1)
    return nn.Sequential(layers)


def _add_head(layers: "OrderedDict[str, nn.Module]", n_features: int, n_classes: int) -> None:
    """Append flatten -> (site fc1) linear -> relu -> (site fc2) linear, the head both CNNs share."""
    from torch import nn

    from autodrop.nets.sites import DropSite

    layers["flatten"] = nn.Flatten()
    layers["drop_fc1"] = DropSite("fc1", "fc")
    layers["fc1"] = nn.Linear(n_features, 256)
    layers["relu_fc1"] = nn.ReLU(inplace=True)
    layers["drop_fc2"] = DropSite("fc2", "fc")
    layers["fc2"] = nn.Linear(256, n_classes)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "simple-cnn": BuiltinModel(build_simple_cnn, "3 conv-bn-relu-pool blocks (32/64/128) and a 256-unit head"),
    "seed-cnn": BuiltinModel(build_seed_cnn, "the forum question's 4-stage CNN with log-softmax output, for 64x64",
                             min_image_size=16),
}


def get_builtin(name: str) -> BuiltinModel:
    """Return the registered model called ``name``, or raise ModelError listing the valid names."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}.") from None
