"""DropSite: a named slot in a network where dropout can be switched on at a chosen rate.

Several modules can stand for one site: its slots (before the batch norm or after the activation),
the copies of an in-block site in every block of a stage (``tied``), and the :class:`BranchDrop`
on the residual branch before a sum, which the site's "branch" kind switches on instead.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import BRANCH, DROPOUT_KINDS, IN_BLOCK_PREFIX, SLOTS  # noqa: F401 (re-exported)
from autodrop.errors import ModelError
from autodrop.nets import masks

SITE_KINDS = ("conv", "fc")

# Element-wise dropout on a CPU draws its masks from 16-bit numbers (autodrop.masks), which is
# several times cheaper than torch's own. The masks differ from nn.Dropout's for the same seed;
# a test comparing against plain torch switches this off.
use_fast_cpu_masks = True
DEFAULT_SLOT = SLOTS[0]


class DropSite(nn.Module):
    """Dropout that is off (identity) until a placement gives it a rate.

    ``kind`` says what the site follows: ``"conv"`` for feature maps, ``"fc"`` for the input of a
    fully connected layer; the baselines choose sites by kind. ``slot`` is the position within the
    block: a site may be declared in several slots (one module each, sharing ``name``), and a
    placement switches on at most one of them. ``tied``: one of several copies of the site (the same
    position in every block of a stage), which all take the site's rate.
    """

    DEFAULT_SLOT = DEFAULT_SLOT

    def __init__(self, name: str, kind: str, slot: str = DEFAULT_SLOT, *, tied: bool = False) -> None:
        super().__init__()
        if kind not in SITE_KINDS:
            raise ValueError(f"kind must be one of {SITE_KINDS}, but got {kind=}.")
        if slot not in (*SLOTS, BRANCH) or (slot == BRANCH) != isinstance(self, BranchDrop):
            raise ValueError(f"slot must be one of {SLOTS}, but got {slot=}.")
        self.site_name = name
        self.kind = kind
        self.slot = slot
        self.tied = tied
        self.p: float | None = None
        self.dropout_kind = "element"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p is None or not self.training:
            return x
        if self.dropout_kind == "channel":
            return F.dropout2d(x, self.p, training=True)
        if x.device.type == "cpu" and use_fast_cpu_masks:
            # CPU dropout via bernoulli_ is slow; masks.dropout draws 16-bit numbers instead.
            return masks.dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        rate = "off" if self.p is None else f"p={self.p:g}, {self.dropout_kind}"
        slot = "" if self.slot == DEFAULT_SLOT else f", slot={self.slot}"
        return f"{self.site_name!r}, kind={self.kind}{slot}, {rate}"


class BranchDrop(DropSite):
    """Residual-branch drop (stochastic depth) for site ``name``, the site after a residual sum.

    It sits on the residual branch, just before the sum: in training it zeroes the whole branch of
    each image with probability ``p`` and scales the kept ones by 1 / (1 - p), so that in eval
    mode, where it is the identity, the block computes the expected sum. At rate 1 the block
    passes its shortcut alone. It is on only when the placement gives its site the "branch" kind.
    """

    def __init__(self, name: str, *, tied: bool = False) -> None:
        super().__init__(name, "conv", BRANCH, tied=tied)
        self.dropout_kind = BRANCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p is None or not self.training:
            return x
        return drop_branch(x, self.p)

    def extra_repr(self) -> str:
        rate = "off" if self.p is None else f"p={self.p:g}"
        return f"{self.site_name!r}, residual branch, {rate}"


def drop_branch(x: torch.Tensor, p: float) -> torch.Tensor:
    """Return ``x`` with each image's values zeroed with probability ``p``, the others scaled by 1 / (1 - p)."""
    if p >= 1.0:
        return torch.zeros_like(x)
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def iter_sites(model: nn.Module) -> Iterator[DropSite]:
    """Yield the model's drop-site modules in the order they were registered (the forward order)."""
    for module in model.modules():
        if isinstance(module, DropSite):
            yield module


def site_kinds(model: nn.Module) -> dict[str, str]:
    """Return each site's name mapped to its kind, in forward order."""
    kinds: dict[str, str] = {}
    seen_slots: set[tuple[str, str]] = set()
    for site in iter_sites(model):
        if (site.site_name, site.slot) in seen_slots and not site.tied:
            raise ModelError(f"two drop sites share the name {site.site_name!r}; site names must be unique.")
        seen_slots.add((site.site_name, site.slot))
        kinds.setdefault(site.site_name, site.kind)
    return kinds


def branch_sites(model: nn.Module) -> set[str]:
    """Return the sites that follow a residual sum, whose "branch" kind drops the residual branch."""
    return {site.site_name for site in iter_sites(model) if isinstance(site, BranchDrop)}


def site_slots(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Return the slots of each site declared in more than one, in SLOTS order."""
    slots: dict[str, set[str]] = {}
    for site in iter_sites(model):
        if not isinstance(site, BranchDrop):
            slots.setdefault(site.site_name, set()).add(site.slot)
    return {name: tuple(o for o in SLOTS if o in found) for name, found in slots.items() if len(found) > 1}


def apply_placement(
    model: nn.Module,
    rates: Mapping[str, float | None],
    variants: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Set every site's rate from ``rates`` (a missing or None entry switches the site off).

    ``variants`` optionally gives a site's ``dropout`` kind (element, channel, or branch where the
    site follows a residual sum) and its ``slot``; without it, sites use element-wise dropout in the
    after-activation slot. The branch kind switches on the site's BranchDrop modules instead.
    """
    variants = variants or {}
    modules = list(iter_sites(model))
    known = {site.site_name for site in modules}
    unknown = sorted((set(rates) | set(variants)) - known)
    if unknown:
        raise ModelError(f"placement names unknown sites {unknown}; the model's sites are {sorted(known)}.")
    slots = {(site.site_name, site.slot) for site in modules}
    branches = {site.site_name for site in modules if isinstance(site, BranchDrop)}
    for site in modules:
        rate = rates.get(site.site_name)
        if rate is not None and not 0.0 <= rate < 1.0:
            raise ModelError(f"site {site.site_name!r} needs a rate in [0, 1), but got {rate}.")
        variant = variants.get(site.site_name, {})
        dropout_kind = variant.get("dropout", "element")
        slot = variant.get("slot", DEFAULT_SLOT)
        if (dropout_kind not in DROPOUT_KINDS or (dropout_kind == "channel" and site.kind != "conv")
                or (dropout_kind == BRANCH and site.site_name not in branches)):
            raise ModelError(f"site {site.site_name!r} cannot use dropout kind {dropout_kind!r}.")
        if (site.site_name, slot) not in slots:
            raise ModelError(f"site {site.site_name!r} has no slot {slot!r}.")
        if isinstance(site, BranchDrop):
            active = rate is not None and rate != 0.0 and dropout_kind == BRANCH
        else:
            active = rate is not None and rate != 0.0 and site.slot == slot and dropout_kind != BRANCH
            site.dropout_kind = dropout_kind if dropout_kind != BRANCH else "element"
        site.p = float(rate) if active else None
