"""The built-in CNNs: one registry entry each, from which everything else learns about them.

Each is a flat ``nn.Sequential`` with its candidate drop sites as named layers (the wide ResNet's
blocks are ``Residual`` layers of such sequences). A flat sequence keeps every layer visible by
name: the state dict keys read like the layers, export writes the network back out as plain
source layer by layer, and packing stacks K copies side by side. A conv site that has a batch
norm in its block is declared twice, before the batch norm and after the activation; a placement
switches on at most one of the two.

Adding a model is one entry in ``BUILTIN_MODELS``: the CLI's help lists the registry, export and
packing check the layers they meet, and tests/nets/test_builtin.py runs every entry through building,
packing and export. Torch is imported inside the builders, so that reading the registry (the
CLI's help) stays as fast as importing this module.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from autodrop.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from autodrop.nets.shape import ModelShape


@dataclass(frozen=True)
class BuiltinArgument:
    """A whole-number argument a built-in model takes (``--model-arg depth=16``)."""

    default: int
    allowed: tuple[int, ...]  # the values the network can be built with
    meaning: str


@dataclass(frozen=True)
class BuiltinModel:
    """A registered model: how to build it for the data, and what it is in a few words.

    ``build(shape, in_block=..., **arguments)`` returns a fresh network, every site off; models
    without repeated blocks ignore ``in_block``.
    """

    build: Callable[..., "nn.Sequential"]
    summary: str  # for help texts and listings
    min_image_size: int = 8  # pixels per side the network needs
    arguments: Mapping[str, BuiltinArgument] = field(default_factory=dict)

    def checked_arguments(self, name: str, given: Mapping[str, Any]) -> dict[str, int]:
        """Return every argument's value (given, else its default), or raise ModelError naming a bad one."""
        unknown = sorted(set(given) - set(self.arguments))
        if unknown:
            takes = f"takes {', '.join(self.arguments)}" if self.arguments else "takes none"
            raise ModelError(f"built-in model {name!r} {takes}, but got --model-arg {', '.join(unknown)}.")
        values = {key: argument.default for key, argument in self.arguments.items()}
        for key, value in given.items():
            argument = self.arguments[key]
            if isinstance(value, bool) or value not in argument.allowed:
                raise ModelError(f"--model-arg {key} of {name!r} ({argument.meaning}) must be one of "
                                 f"{', '.join(map(str, argument.allowed))}, but got {value!r}.")
            values[key] = int(value)
        return values


def build_simple_cnn(shape: "ModelShape", **_: Any) -> "nn.Sequential":
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


def build_seed_cnn(shape: "ModelShape", **_: Any) -> "nn.Sequential":
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


def build_wrn(shape: "ModelShape", *, in_block: str = "per-stage", depth: int = 10, width: int = 2) -> "nn.Sequential":
    """Return a wide ResNet (Zagoruyko and Komodakis, 2016): a 3x3 stem, three stages of
    pre-activation blocks (bn, relu, conv, bn, relu, conv) at 16, 32 and 64 times ``width``
    channels, the last two stages halving the resolution, then bn, relu, global average pooling and
    the classifier. ``depth`` = 6 * blocks per stage + 4.

    Sites: inside each block between its two convolutions (``in:stage2:conv1``, the paper's
    dropout; one decision per stage, or per block with ``in_block="per-call"``), after each block
    (``block2.1``; its "branch" kind drops the block's residual branch), and before the classifier.
    """
    from torch import nn

    from autodrop.nets.residual import Residual
    from autodrop.nets.sites import BranchDrop, DropSite

    blocks = (depth - 4) // 6
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv0"] = nn.Conv2d(shape.channels, 16, kernel_size=3, padding=1, bias=False)
    in_channels = 16
    for stage, base in enumerate((16, 32, 64), start=1):
        channels = base * width
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            name = f"block{stage}.{block}"
            branch: OrderedDict[str, nn.Module] = OrderedDict()
            branch["conv1"] = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
            branch["bn2"] = nn.BatchNorm2d(channels)
            branch["relu2"] = nn.ReLU(inplace=True)
            if in_block == "per-stage":
                branch["drop"] = DropSite(f"in:stage{stage}:conv1", "conv", tied=True)
            elif in_block == "per-call":
                branch["drop"] = DropSite(f"in:{name}:conv1", "conv")
            branch["conv2"] = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
            shortcut = None
            if stride != 1 or in_channels != channels:
                shortcut = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False)))
            pre = nn.Sequential(OrderedDict(bn1=nn.BatchNorm2d(in_channels), relu1=nn.ReLU(inplace=True)))
            layers[f"block{stage}_{block}"] = Residual(pre, nn.Sequential(branch), shortcut, BranchDrop(name))
            layers[f"drop_block{stage}_{block}"] = DropSite(name, "conv")
            in_channels = channels
    layers["bn"] = nn.BatchNorm2d(in_channels)
    layers["relu"] = nn.ReLU(inplace=True)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["drop_fc"] = DropSite("fc", "fc")
    layers["fc"] = nn.Linear(in_channels, shape.n_classes)
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
    "wrn": BuiltinModel(
        build_wrn, "a wide ResNet: 3 stages of pre-activation residual blocks (default depth 10, width 2)",
        arguments={"depth": BuiltinArgument(10, (10, 16, 22, 28, 40), "6 x blocks per stage + 4"),
                   "width": BuiltinArgument(2, tuple(range(1, 11)), "channels: 16, 32, 64 times this")},
    ),
}


def get_builtin(name: str) -> BuiltinModel:
    """Return the registered model called ``name``, or raise ModelError listing the valid names."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}.") from None
