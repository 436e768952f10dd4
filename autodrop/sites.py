"""DropSite: a named slot in a network where dropout can be switched on at a chosen rate."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from autodrop import masks
from autodrop.errors import ModelError

SITE_KINDS = ("conv", "fc")


class DropSite(nn.Module):
    """Dropout that is off (identity) until a placement gives it a rate.

    ``kind`` says what the site follows: ``"conv"`` for feature maps, ``"fc"`` for the input of a
    fully connected layer. The baselines choose sites by kind.
    """

    def __init__(self, name: str, kind: str) -> None:
        super().__init__()
        if kind not in SITE_KINDS:
            raise ValueError(f"kind must be one of {SITE_KINDS}, but got {kind=}.")
        self.site_name = name
        self.kind = kind
        self.p: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p is None or not self.training:
            return x
        if x.device.type == "cpu":
            # CPU dropout via bernoulli_ is slow; masks.dropout draws 16-bit numbers instead.
            return masks.dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        rate = "off" if self.p is None else f"p={self.p:g}"
        return f"{self.site_name!r}, kind={self.kind}, {rate}"


def iter_sites(model: nn.Module) -> Iterator[DropSite]:
    """Yield the model's drop sites in the order they were registered (the forward order)."""
    for module in model.modules():
        if isinstance(module, DropSite):
            yield module


def site_kinds(model: nn.Module) -> dict[str, str]:
    """Return each site's name mapped to its kind, in forward order."""
    kinds: dict[str, str] = {}
    for site in iter_sites(model):
        if site.site_name in kinds:
            raise ModelError(f"two drop sites share the name {site.site_name!r}; site names must be unique.")
        kinds[site.site_name] = site.kind
    return kinds


def apply_placement(model: nn.Module, rates: Mapping[str, float | None]) -> None:
    """Set every site's rate from ``rates`` (a missing or None entry switches the site off)."""
    known = {site.site_name for site in iter_sites(model)}
    unknown = sorted(set(rates) - known)
    if unknown:
        raise ModelError(f"placement names unknown sites {unknown}; the model's sites are {sorted(known)}.")
    for site in iter_sites(model):
        rate = rates.get(site.site_name)
        if rate is not None and not 0.0 <= rate < 1.0:
            raise ModelError(f"site {site.site_name!r} needs a rate in [0, 1), but got {rate}.")
        site.p = None if rate is None or rate == 0.0 else float(rate)
