"""The answer as the terminal prints it: the search's summary, the confirmation, which sites matter.

Nothing here imports torch: ``autodrop report`` answers from any machine that reaches the storage.
"""

from __future__ import annotations

from typing import Any, Mapping

from autodrop.outputs.results import SearchResult


def format_result(result: SearchResult) -> str:
    """Return the answer as the terminal shows it at the end of a search."""
    lines: list[str] = []
    settings, data = result.settings, result.data
    lines.append(
        f"Study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed trials; model {settings.get('model', '?')}, data {data.get('name', '?')} "
        f"({data.get('n_train', '?')} train / {data.get('n_val', '?')} val images)."
    )
    lines.append("")
    best = result.best
    if best is not None:
        title = f"Best placement (trial {best.number}"
        title += f", baseline {best.baseline})" if best.baseline else ")"
        lines.append(title + f": val accuracy {_pct(best.val_accuracy)}, train {_pct(best.train_accuracy)}, gap {_pts(best.gap)}")
    else:
        lines.append("Best placement: none yet (no completed trial).")
    lines.append("")
    header = f"  {'site':<14} {'kind':<5} {'best':>8} {'importance':>11}  variant"
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for site, kind in result.sites.items():
        rate = best.placement.get(site) if best else None
        shown = "off" if rate is None else f"{rate:.2f}"
        importance = "-" if result.importances is None else f"{result.importances.get(site, 0.0):.2f}"
        variant = best.variants.get(site, {}) if best and rate is not None else {}
        variant_words = ", ".join(variant[key] for key in ("dropout", "slot") if key in variant)
        lines.append(f"  {site:<14} {kind:<5} {shown:>8} {importance:>11}  {variant_words}".rstrip())
    if result.importance_note:
        lines.append(f"  Note: {result.importance_note}")
    lines.append("")
    lines.append("Baselines (the usual recipes):")
    lines.append(f"  {'recipe':<15} {'val acc':>8} {'train acc':>10} {'gap':>7}  placement")
    for b in result.baselines:
        if b.state == "complete":
            figures = f"{_pct(b.val_accuracy):>8} {_pct(b.train_accuracy):>10} {_pts(b.gap):>7}"
        else:
            figures = f"{b.state:>8} {'':>10} {'':>7}"
        lines.append(f"  {b.baseline:<15} {figures}  {b.description}")
    if best is not None and result.margin is not None:
        m = result.margin
        lines.append("")
        lines.append(
            f"Lead over no dropout: {100 * m.lead:+.1f} points; validation standard error "
            f"{100 * m.standard_error:.1f} points (n={m.n_val}), noise band for a difference {100 * m.noise:.1f} points."
        )
    if result.confirmation:
        lines.append("")
        lines.extend(format_confirmation(result.confirmation).splitlines()[:-1])
    lines.append("")
    lines.append(result.verdict)
    return "\n".join(lines)


def format_confirmation(confirmation: Mapping[str, Any]) -> str:
    """Return a stored confirmation as a table of candidates and the verdict."""
    seeds = confirmation["seeds"]
    lines = [f"Confirmation ({len(seeds)} fresh seeds per placement, the same seeds for each):"]
    lines.append(f"  {'placement':<15} {'mean val':>9} {'95% interval':>15} {'gap':>6}  what")
    for c in confirmation["candidates"]:
        interval = f"{100 * c['ci_low']:.1f}-{100 * c['ci_high']:.1f}%"
        lines.append(
            f"  {c['label']:<15} {100 * c['mean']:>8.1f}% {interval:>15} {_pts(c['mean_gap']):>6}  {c['description']}"
        )
    lines.append(str(confirmation["verdict"]))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pts(value: float | None) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a zero gap never prints as "-0.0".
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"


# A site whose share of the importance is at least this much "matters"; below the lower bound it
# "hardly matters". Shares sum to 1 over all sites (on/off and rate together).
MATTERS_SHARE = 0.2
NEGLIGIBLE_SHARE = 0.05


def site_story(result: SearchResult) -> str:
    """Return which sites matter and which do not, in plain language, from the importances."""
    if result.importances is None:
        return f"Which sites matter cannot be told yet: {result.importance_note or 'no importances.'}"
    shares = sorted(result.importances.items(), key=lambda item: -item[1])
    best = result.best.placement if result.best is not None else {}

    def state(site: str) -> str:
        rate = best.get(site)
        return "off in the best trial" if rate is None else f"best at about {rate:.2f}"

    matter = [(site, share) for site, share in shares if share >= MATTERS_SHARE]
    negligible = [site for site in result.sites if result.importances.get(site, 0.0) < NEGLIGIBLE_SHARE]
    parts: list[str] = []
    if matter:
        described = "; ".join(f"{site} ({100 * share:.0f}% of the importance, {state(site)})" for site, share in matter)
        lead = "Most of the effect comes from" if len(matter) == 1 else "The effect comes mostly from"
        parts.append(f"{lead} {described}.")
    else:
        parts.append("No single site dominates: the effect is spread over the sites.")
    if negligible:
        each = "" if len(negligible) == 1 else " each"
        parts.append(
            f"Dropout at {_join_words(negligible)} does not matter here (under "
            f"{100 * NEGLIGIBLE_SHARE:.0f}% of the importance{each})."
        )
    if result.importance_note:
        parts.append(f"Note: {result.importance_note}")
    return " ".join(parts)


def _join_words(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]
