"""Forward passes rewritten for less memory traffic, with the same outputs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.nets.sites import DropSite


def forward_plan(model: nn.Module, *, training: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function computing ``model(x)`` with less memory traffic, for flat Sequentials.

    Two rewrites that leave the outputs unchanged:
    - ReLU then max-pooling runs as max-pooling then ReLU. Both are monotone, so the results are
      equal, and the ReLU (and its backward) touch a quarter of the values.
    - In eval mode a convolution followed by batch norm runs as one convolution with the batch
      norm folded into its weights, saving a pass over the largest maps (a quarter of the cost of
      evaluating the built-in CNN on a CPU). The folded weights are made per call.
    Any other model, or one with hooks, runs as it is.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return model
    if model._forward_hooks or model._forward_pre_hooks:
        return model
    layers: list[nn.Module] = []
    # A drop site that is off (and every site in eval mode) is the identity: leaving it out lets a
    # conv meet the batch norm after it, even where an unused before-bn slot sits between them.
    pending = [layer for layer in model if not (isinstance(layer, DropSite) and (layer.p is None or not training))]
    changed = len(pending) != len(model)
    while pending:
        layer = pending.pop(0)
        following = pending[0] if pending else None
        if type(layer) is nn.ReLU and type(following) is nn.MaxPool2d:
            layers += [pending.pop(0), layer]
            changed = True
        elif not training and _foldable(layer, following):
            layers.append(FoldedConv(layer, pending.pop(0)))  # type: ignore[arg-type]
            changed = True
        else:
            layers.append(layer)
    if not changed:
        return model

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return forward


def _foldable(layer: nn.Module, following: nn.Module | None) -> bool:
    conv_like = type(layer) is nn.Conv2d or getattr(layer, "foldable_conv", False)
    return (
        conv_like
        and getattr(layer, "padding_mode", "zeros") == "zeros"
        and type(following) is nn.BatchNorm2d
        and following.running_mean is not None  # type: ignore[union-attr]
        and not following.training  # type: ignore[union-attr]
        and not layer.training
    )


class FoldedConv(nn.Module):
    """A convolution with the eval-mode batch norm after it folded into its weights and bias."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
            if bn.weight is not None:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            shift = (bias - bn.running_mean) * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            # Channels-last weights keep the maps channels-last (a one-channel input is ambiguous).
            self.weight = weight.to(memory_format=torch.channels_last) if weight.dim() == 4 else weight
            self.bias = shift
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
