"""The answer as the terminal prints it: the search's summary, the confirmation, which sites matter.

Nothing here imports torch: ``autodrop report`` answers from any machine that reaches the storage.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Mapping

from autodrop.outputs.results import SearchResult


def printable(text: Any) -> str:
    """Return ``text`` with every control character but the newline taken out: ANSI escapes, carriage
    returns, bidirectional overrides. What autodrop prints may quote a study's stored text (names,
    a model, fail reasons), which anyone who can write to the study chose; it must not be able to
    move the cursor, rewrite lines already printed, or hide part of a message."""
    return "".join(c for c in str(text) if c == "\n" or not unicodedata.category(c).startswith("C"))


def format_result(result: SearchResult) -> str:
    """Return the answer as the terminal shows it at the end of a search."""
    lines: list[str] = []
    settings, data = result.settings, result.data
    lines.append(
        f"Study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed trials; model {settings.get('model', '?')}, data {data.get('name', '?')} "
        f"({data.get('n_train', '?')} train / {data.get('n_val', '?')} val images)."
    )
    if result.recipe:
        lines.append(f"Trained with {result.recipe}: the answer holds for this recipe.")
    lines.append("")
    best = result.best
    if best is not None:
        title = f"Best placement (trial {best.number}"
        title += f", baseline {best.baseline})" if best.baseline else ")"
        lines.append(title + f": val accuracy {_pct(best.val_accuracy)}, train {_pct(best.train_accuracy)}, gap {_pts(best.gap)}")
    else:
        lines.append("Best placement: none yet (no completed trial).")
    lines.append("")
    width = max([14, *(len(site) for site in result.sites)])
    header = f"  {'site':<{width}} {'kind':<5} {'best':>8} {'importance (90% interval)':>26}  variant"
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for site, kind in result.sites.items():
        rate = best.placement.get(site) if best else None
        shown = "off" if rate is None else f"{rate:.2f}"
        variant = best.variants.get(site, {}) if best and rate is not None else {}
        variant_words = ", ".join(variant[key] for key in ("dropout", "slot") if key in variant)
        lines.append(f"  {site:<{width}} {kind:<5} {shown:>8} {_importance(result, site):>26}  {variant_words}".rstrip())
    if result.importance_note:
        lines.append(f"  Importances {result.importance_note}")
    lines.append(f"  {site_story(result)}")
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
            f"Lead over no dropout: {100 * m.lead:+.1f} points. One run's noise: {100 * m.run_noise:.1f} points "
            f"({m.n_val} validation images, and how much the curves wobble); the best of {m.n_runs} runs leads "
            f"by up to {100 * m.chance:.1f} points by luck alone (95%)."
        )
    if result.confirmation:
        lines.append("")
        lines.extend(format_confirmation(result.confirmation).splitlines()[:-1])
    lines.append("")
    lines.append(result.verdict)
    return printable("\n".join(lines))


def format_confirmation(confirmation: Mapping[str, Any]) -> str:
    """Return a stored confirmation as a table of candidates and the verdict."""
    candidates = confirmation["candidates"]
    counts = sorted({len(c.get("accuracies", [])) for c in candidates})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    lines = [f"Confirmation ({seeds} fresh seeds per placement, the same seeds for each):"]
    lines.append(f"  {'placement':<15} {'seeds':>5} {'mean val':>9} {'95% interval':>15} {'gap':>6}  what")
    for c in candidates:
        interval = f"{100 * c['ci_low']:.1f}-{100 * c['ci_high']:.1f}%"
        lines.append(
            f"  {c['label']:<15} {len(c.get('accuracies', [])):>5} {100 * c['mean']:>8.1f}% {interval:>15} "
            f"{_pts(c['mean_gap']):>6}  {c['description']}"
        )
    lines.append(str(confirmation["verdict"]))
    return printable("\n".join(lines))


def _importance(result: SearchResult, site: str) -> str:
    if result.importances is None:
        return "-"
    share = f"{result.importances.get(site, 0.0):.2f}"
    if result.importance_intervals is None or site not in result.importance_intervals:
        return share
    low, high = result.importance_intervals[site]
    return f"{share} ({low:.2f}-{high:.2f})"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pts(value: float | None) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a zero gap never prints as "-0.0".
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"


# A site "matters" when its share is at least MATTERS_SHARE and, across resamples of the trials,
# at least half that; it "does not matter" when even its resampled shares stay under NEGLIGIBLE_SHARE.
# Shares sum to 1 over all sites (on/off, rate, kind and slot together).
MATTERS_SHARE = 0.2
NEGLIGIBLE_SHARE = 0.05


def site_story(result: SearchResult) -> str:
    """Return which sites matter and which do not, in plain language, only as far as the evidence goes."""
    if result.effect_measurable is False:
        noise = f" (one run's noise is {100 * result.margin.run_noise:.1f} points)" if result.margin else ""
        return (
            f"No site's effect is measurable here: the {result.n_complete} completed trials' accuracies vary no "
            f"more than runs of one placement would{noise}, so the importances are shares of noise."
        )
    if result.importances is None:
        return f"Which sites matter cannot be told yet: importances {result.importance_note or 'are not available.'}"
    intervals = result.importance_intervals or {site: (share, share) for site, share in result.importances.items()}
    best = result.best.placement if result.best is not None else {}

    def state(site: str) -> str:
        rate = best.get(site)
        return "off in the best trial" if rate is None else f"best at about {rate:.2f}"

    shares = sorted(result.importances.items(), key=lambda item: -item[1])
    matter = [(site, share) for site, share in shares
              if share >= MATTERS_SHARE and intervals[site][0] >= MATTERS_SHARE / 2]
    negligible = [site for site in result.sites if intervals.get(site, (0.0, 1.0))[1] < NEGLIGIBLE_SHARE]
    parts: list[str] = []
    if matter:
        described = "; ".join(f"{site} ({100 * share:.0f}% of the importance, {state(site)})" for site, share in matter)
        lead = "Most of the effect comes from" if len(matter) == 1 else "The effect comes mostly from"
        parts.append(f"{lead} {described}.")
    else:
        parts.append(
            f"No single site stands out beyond the uncertainty of {result.n_complete} completed trials."
        )
    if negligible:
        parts.append(f"Dropout at {_join_words(negligible)} does not matter here (under "
                     f"{100 * NEGLIGIBLE_SHARE:.0f}% of the importance in every resample).")
    return " ".join(parts)


def _join_words(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]
