"""The search space: a placement (each site off, or on at a rate) to and from Optuna parameters.

Each site is the categorical parameter ``SITE`` with choices ``off``/``on``; when on, the float
parameter ``SITE.p`` holds its rate. The rate exists only when the site is on, which is why the
sampler must model conditional parameters (grouped multivariate TPE).
"""

from __future__ import annotations

from typing import Any, Mapping

import optuna

from autodrop.errors import StorageError

OFF, ON = "off", "on"
Placement = dict[str, "float | None"]  # site name -> rate, or None where the site is off


def rate_param(site: str) -> str:
    """Return the name of the parameter holding ``site``'s rate."""
    return f"{site}.p"


def suggest_placement(trial: optuna.Trial, sites: list[str], rate_range: tuple[float, float]) -> Placement:
    """Ask ``trial`` for every site's on/off and, where on, its rate."""
    placement: Placement = {}
    for site in sites:
        if trial.suggest_categorical(site, [OFF, ON]) == ON:
            placement[site] = trial.suggest_float(rate_param(site), *rate_range)
        else:
            placement[site] = None
    return placement


def placement_to_params(placement: Mapping[str, float | None]) -> dict[str, Any]:
    """Return the trial parameters that encode ``placement`` (for enqueueing a known placement)."""
    params: dict[str, Any] = {}
    for site, rate in placement.items():
        params[site] = OFF if rate is None else ON
        if rate is not None:
            params[rate_param(site)] = rate
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


def describe_placement(placement: Mapping[str, float | None]) -> str:
    """Return the placement in words: ``"conv2 at 0.31, fc1 at 0.52"`` or ``"no dropout"``."""
    on = [f"{site} at {rate:.2f}" for site, rate in placement.items() if rate is not None]
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
