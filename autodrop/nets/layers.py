"""What each torch layer is, in the terms site discovery and packing need: the one table of layers.

Discovery asks what a module does (an activation, a pooling, a norm, a dropout, a linear layer or a
convolution) to find where a site goes; packing asks which layers can run unchanged on K members'
maps side by side (no parameters, no randomness, each element or channel alone).
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.PReLU, nn.RReLU)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
# Each dropout module and the torch.nn.functional dropout it applies.
DROPOUTS = {nn.Dropout: "dropout", nn.Dropout1d: "dropout1d", nn.Dropout2d: "dropout2d",
            nn.Dropout3d: "dropout3d", nn.AlphaDropout: "alpha_dropout",
            nn.FeatureAlphaDropout: "feature_alpha_dropout"}
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Layers a packed network can use as they are on (N, K*C, H, W) maps or (K, N, F) features.
ELEMENTWISE = tuple(a for a in ACTIVATIONS if a not in (nn.PReLU, nn.RReLU)) + (nn.Tanh, nn.Sigmoid, nn.Identity)
SPATIAL_2D = tuple(p for p in POOLS if p.__name__.endswith("2d") and p is not nn.FractionalMaxPool2d)


def module_kind(module: nn.Module | None) -> str | None:
    """Return what ``module`` does for site discovery: conv, act, pool, norm, dropout, linear, or None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, ACTIVATIONS):
        return "act"
    if isinstance(module, POOLS):
        return "pool"
    if isinstance(module, NORMS):
        return "norm"
    if type(module) in DROPOUTS:
        return "dropout"
    if isinstance(module, nn.Linear):
        return "linear"
    return None
