"""The search space: a placement (each site off, or on at a rate) asked of Optuna, and the baselines.

Each site is the categorical parameter ``SITE`` with choices ``off``/``on``; when on, the float
parameter ``SITE.p`` holds its rate (and, where the search chooses them, ``SITE.kind`` its dropout
kind and ``SITE.order`` its slot). The rate exists only when the site is on, which is why the
sampler must model conditional parameters (grouped multivariate TPE). Reading a stored trial's
parameters back is autodrop/run/records.py's job.
"""

from __future__ import annotations

from typing import Any, Mapping

import optuna

from autodrop.config import DROPOUT_KINDS, SLOTS
from autodrop.run.records import OFF, ON, Placement, Variants, dropout_param, rate_param, slot_param

DEFAULT_DROPOUT, DEFAULT_SLOT = DROPOUT_KINDS[0], SLOTS[0]


def variant_choices(
    site_kinds: Mapping[str, str],
    site_slots: Mapping[str, tuple[str, ...]],
    kinds: tuple[str, ...],
    slots: tuple[str, ...],
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Return, per site, the dropout kinds and slots the search chooses among.

    Only conv sites have a dropout kind to choose; only sites declared in several slots have a
    slot. A dimension left at its single default value is not searched at all.
    """
    choices: dict[str, dict[str, tuple[str, ...]]] = {}
    for site, site_kind in site_kinds.items():
        dims: dict[str, tuple[str, ...]] = {}
        if site_kind == "conv" and tuple(kinds) != (DEFAULT_DROPOUT,):
            dims["dropout"] = tuple(k for k in DROPOUT_KINDS if k in kinds)
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
        variants[site] = {key: trial.suggest_categorical(names[key], list(values)) for key, values in dims.items()}
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
}


def baseline_placements(
    site_kinds: Mapping[str, str], rate_range: tuple[float, float]
) -> list[tuple[str, Placement]]:
    """Return each baseline recipe as a placement for these sites, dropping duplicates.

    A recipe's rate is clipped into ``rate_range`` so that every enqueued value lies in the space
    the sampler models. A recipe with no sites to act on (``head`` on a model without fully
    connected sites) equals ``none`` and is left out.
    """
    low, high = rate_range
    baselines: list[tuple[str, Placement]] = []
    seen: list[Placement] = []
    for name, (which, rate) in BASELINE_RECIPES.items():
        rate = min(max(rate, low), high)
        placement: Placement = {
            site: rate if which == "all" or which == kind else None for site, kind in site_kinds.items()
        }
        if placement in seen:
            continue
        seen.append(placement)
        baselines.append((name, placement))
    return baselines
