"""The search space: a placement (each site off, or on at a rate) to and from Optuna parameters.

Each site is the categorical parameter ``SITE`` with choices ``off``/``on``; when on, the float
parameter ``SITE.p`` holds its rate. The rate exists only when the site is on, which is why the
sampler must model conditional parameters (grouped multivariate TPE).
"""

from __future__ import annotations

from typing import Any, Mapping

import optuna

from autodrop.errors import StorageError
from autodrop.sites import DEFAULT_ORDER, DROPOUT_KINDS, ORDERS

OFF, ON = "off", "on"
Placement = dict[str, "float | None"]  # site name -> rate, or None where the site is off
# site name -> {"kind": "element"|"channel", "order": "after-act"|"before-bn"}, for sites that are on
Variants = dict[str, dict[str, str]]


def rate_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s rate."""
    return f"{site}.p"


def kind_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s dropout kind (element or channel)."""
    return f"{site}.kind"


def order_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s slot relative to batch norm."""
    return f"{site}.order"


def variant_choices(
    site_kinds: Mapping[str, str],
    site_orders: Mapping[str, tuple[str, ...]],
    kinds: tuple[str, ...],
    orders: tuple[str, ...],
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Return, per site, the dropout kinds and orders the search chooses among.

    Only conv sites have a kind to choose; only sites declared in several slots have an order.
    A dimension left at its single default value is not searched at all.
    """
    choices: dict[str, dict[str, tuple[str, ...]]] = {}
    for site, site_kind in site_kinds.items():
        dims: dict[str, tuple[str, ...]] = {}
        if site_kind == "conv" and tuple(kinds) != ("element",):
            dims["kind"] = tuple(k for k in DROPOUT_KINDS if k in kinds)
        slots = tuple(o for o in site_orders.get(site, ()) if o in orders)
        if slots and slots != (DEFAULT_ORDER,):
            dims["order"] = slots
        if dims:
            choices[site] = dims
    return choices


def suggest_variants(
    trial: optuna.Trial, placement: Mapping[str, float | None], choices: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Variants:
    """Ask ``trial`` for the dropout kind and order of every site that is on and has a choice."""
    variants: Variants = {}
    for site, dims in choices.items():
        if placement.get(site) is None:
            continue
        variant = {}
        if "kind" in dims:
            variant["kind"] = trial.suggest_categorical(kind_param(site), list(dims["kind"]))
        if "order" in dims:
            variant["order"] = trial.suggest_categorical(order_param(site), list(dims["order"]))
        variants[site] = variant
    return variants


def default_variants(
    placement: Mapping[str, float | None], choices: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Variants:
    """Return the plain variant (element-wise, after the activation, where allowed) for sites that are on."""
    variants: Variants = {}
    for site, dims in choices.items():
        if placement.get(site) is None:
            continue
        variant = {}
        if "kind" in dims:
            variant["kind"] = "element" if "element" in dims["kind"] else dims["kind"][0]
        if "order" in dims:
            variant["order"] = DEFAULT_ORDER if DEFAULT_ORDER in dims["order"] else dims["order"][0]
        variants[site] = variant
    return variants


def variants_from_params(params: Mapping[str, Any], sites: list[str]) -> Variants:
    """Return the kinds and orders a trial's parameters encode, checking they are known values."""
    variants: Variants = {}
    for site in sites:
        variant = {}
        for key, param, allowed in (("kind", kind_param(site), DROPOUT_KINDS), ("order", order_param(site), ORDERS)):
            if param in params:
                if params[param] not in allowed:
                    raise StorageError(
                        f"stored parameter {param}={params[param]!r} is not one autodrop writes "
                        f"(expected one of {', '.join(allowed)})."
                    )
                variant[key] = params[param]
        if variant:
            variants[site] = variant
    return variants


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
            variant = variants.get(site, {})
            if "kind" in variant:
                params[kind_param(site)] = variant["kind"]
            if "order" in variant:
                params[order_param(site)] = variant["order"]
    return params


def placement_from_params(params: Mapping[str, Any], sites: list[str]) -> Placement:
    """Return the placement a finished trial's parameters encode, checking they are well formed."""
    placement: Placement = {}
    for site in sites:
        state = params.get(site, OFF)
        if state == OFF:
            placement[site] = None
            continue
        rate = params.get(rate_param(site))
        if state != ON or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise StorageError(
                f"stored parameters for site {site!r} are not a placement autodrop writes "
                f"({site}={state!r}, {rate_param(site)}={rate!r})."
            )
        placement[site] = float(rate)
    return placement


def describe_placement(
    placement: Mapping[str, float | None], variants: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """Return the placement in words: ``"conv2 at 0.31 (channel), fc1 at 0.52"`` or ``"no dropout"``."""
    variants = variants or {}
    on = []
    for site, rate in placement.items():
        if rate is None:
            continue
        variant = variants.get(site, {})
        notes = []
        if variant.get("kind", "element") != "element":
            notes.append(variant["kind"])
        if variant.get("order", DEFAULT_ORDER) != DEFAULT_ORDER:
            notes.append(variant["order"])
        on.append(f"{site} at {rate:.2f}" + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(on) if on else "no dropout"


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
