"""The search space: a placement (each site off, or on at a rate) asked of Optuna, and the baselines.

Each site is the categorical parameter ``SITE`` with choices ``off``/``on``; when on, the float
parameter ``SITE.p`` holds its rate (and, where the search chooses them, ``SITE.kind`` its dropout
kind and ``SITE.order`` its slot). The rate exists only when the site is on, which is why the
sampler must model conditional parameters (grouped multivariate TPE). Reading a stored trial's
parameters back is autodrop/run/records.py's job.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import optuna

from autodrop.config import BRANCH, DROPOUT_KINDS, IN_BLOCK_PREFIX, SLOTS
from autodrop.run.records import OFF, ON, Placement, Variants, dropout_param, rate_param, slot_param

DEFAULT_DROPOUT, DEFAULT_SLOT = DROPOUT_KINDS[0], SLOTS[0]


def variant_choices(
    site_kinds: Mapping[str, str],
    site_slots: Mapping[str, tuple[str, ...]],
    kinds: tuple[str, ...],
    slots: tuple[str, ...],
    *,
    branches: Collection[str] = (),
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Return, per site, the dropout kinds and slots the search chooses among.

    Only conv sites have a dropout kind to choose, and only the sites in ``branches`` (after a
    residual sum) the branch kind; a site left with none of ``kinds`` drops elements. Only sites
    declared in several slots have a slot. A dimension left at one value is not searched at all.
    """
    choices: dict[str, dict[str, tuple[str, ...]]] = {}
    for site, site_kind in site_kinds.items():
        dims: dict[str, tuple[str, ...]] = {}
        allowed = tuple(k for k in DROPOUT_KINDS if k in kinds and (k != BRANCH or site in branches))
        if site_kind == "conv" and allowed not in ((), (DEFAULT_DROPOUT,)):
            dims["dropout"] = allowed
        available = tuple(s for s in site_slots.get(site, ()) if s in slots)
        if available and available != (DEFAULT_SLOT,):
            dims["slot"] = available
        if dims:
            choices[site] = dims
    return choices


def _variant_params(site: str) -> dict[str, str]:
    return {"dropout": dropout_param(site), "slot": slot_param(site)}


def suggest_variants(
    trial: optuna.Trial, placement: Mapping[str, float | None], choices: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Variants:
    """Ask ``trial`` for the dropout kind and slot of every site that is on and has a choice."""
    variants: Variants = {}
    for site, dims in choices.items():
        if placement.get(site) is None:
            continue
        names = _variant_params(site)
        chosen: dict[str, str] = {}
        for key, values in dims.items():
            if key == "slot" and chosen.get("dropout") == BRANCH:
                continue  # the branch drop has one place, on the branch: no slot to choose
            chosen[key] = trial.suggest_categorical(names[key], list(values))
        variants[site] = chosen
    return variants


def default_variants(
    placement: Mapping[str, float | None], choices: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Variants:
    """Return the plain variant (element-wise, after the activation, where allowed) for sites that are on."""
    defaults = {"dropout": DEFAULT_DROPOUT, "slot": DEFAULT_SLOT}
    return {
        site: {key: defaults[key] if defaults[key] in values else values[0] for key, values in dims.items()}
        for site, dims in choices.items()
        if placement.get(site) is not None
    }


def suggest_placement(trial: optuna.Trial, sites: list[str], rate_range: tuple[float, float]) -> Placement:
    """Ask ``trial`` for every site's on/off and, where on, its rate."""
    placement: Placement = {}
    for site in sites:
        if trial.suggest_categorical(site, [OFF, ON]) == ON:
            placement[site] = trial.suggest_float(rate_param(site), *rate_range)
        else:
            placement[site] = None
    return placement


def placement_to_params(
    placement: Mapping[str, float | None], variants: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, Any]:
    """Return the trial parameters that encode ``placement`` (for enqueueing a known placement)."""
    params: dict[str, Any] = {}
    variants = variants or {}
    for site, rate in placement.items():
        params[site] = OFF if rate is None else ON
        if rate is not None:
            params[rate_param(site)] = rate
            names = _variant_params(site)
            for key, value in variants.get(site, {}).items():
                params[names[key]] = value
    return params


# The literature's usual recipes, run first so that every answer is measured against them.
BASELINE_RECIPES: dict[str, tuple[str, float]] = {
    # name: (which sites, rate)
    "none": ("none", 0.0),
    "head": ("fc", 0.5),
    "everywhere-low": ("all", 0.1),
    "conv-only": ("conv", 0.2),
    # Wide ResNets (Zagoruyko and Komodakis, 2016): dropout 0.3 between the two convolutions of
    # every block, and nowhere else.
    "wrn": ("in-block", 0.3),
    # Stochastic depth (Huang et al., 2016): each block's residual branch dropped per image, the
    # rate rising linearly with depth to its last block's (see stochastic_depth_rates).
    "stochastic-depth": ("branch", 0.0),
}
BRANCH_RECIPES = {"stochastic-depth"}  # recipes that use the branch kind


def stochastic_depth_rates(n_blocks: int) -> list[float]:
    """Return the branch-drop rate of each of ``n_blocks`` residual blocks, first to last: rising
    linearly to 0.1 at the last block in networks of fewer than 12 blocks (timm's usual rate for
    ResNet-sized networks), to 0.2 in deeper ones (its rate for the larger ones)."""
    last = 0.1 if n_blocks < 12 else 0.2
    return [last * (i + 1) / n_blocks for i in range(n_blocks)]


def baseline_placements(
    site_kinds: Mapping[str, str], rate_range: tuple[float, float], *, branches: Collection[str] = ()
) -> list[tuple[str, Placement]]:
    """Return each baseline recipe as a placement for these sites, dropping duplicates.

    A recipe's rate is clipped into ``rate_range`` so that every enqueued value lies in the space
    the sampler models. A recipe with no sites to act on (``head`` on a model without fully
    connected sites, ``wrn`` without in-block sites, ``stochastic-depth`` without residual sums in
    ``branches``) equals ``none`` and is left out.
    """
    low, high = rate_range
    in_order = [site for site in site_kinds if site in branches]
    depth_rates = dict(zip(in_order, stochastic_depth_rates(len(in_order)))) if in_order else {}
    baselines: list[tuple[str, Placement]] = []
    seen: list[Placement] = []
    for name, (which, rate) in BASELINE_RECIPES.items():
        placement: Placement = {}
        for site, kind in site_kinds.items():
            if which == "branch":
                chosen = depth_rates.get(site)
            elif which == "in-block":
                chosen = rate if site.startswith(IN_BLOCK_PREFIX) else None
            else:
                chosen = rate if which == "all" or which == kind else None
            placement[site] = None if chosen is None else min(max(chosen, low), high)
        if placement in seen:
            continue
        seen.append(placement)
        baselines.append((name, placement))
    return baselines


def baseline_variants(
    name: str, placement: Mapping[str, float | None], choices: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Variants | None:
    """Return a recipe's variants: plain dropout (element-wise, after the activation), or the branch
    kind for stochastic depth; None when the search does not offer what the recipe needs."""
    variants = default_variants(placement, choices)
    if name in BRANCH_RECIPES:
        for site, rate in placement.items():
            if rate is None:
                continue
            if BRANCH not in choices.get(site, {}).get("dropout", ()):
                return None  # the branch kind is not searched (--kinds): the recipe cannot be asked for
            variants[site] = {"dropout": BRANCH}
    return variants
