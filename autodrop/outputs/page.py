"""``autodrop report``: the answer read from storage, in the terminal and as one offline HTML page.

The page is a single file: plotly's JavaScript is embedded once (in the first figure) and every
other figure reuses it, so it opens without a network. Everything read from storage is escaped
before it reaches the page: a shared database can be edited by anyone.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from autodrop import __version__
from autodrop.errors import StorageError
from autodrop.outputs.files import check_writable, write_text
from autodrop.outputs.results import SearchResult, TrialSummary, summarize_study
from autodrop.outputs.text import format_result, site_story
from autodrop.run.records import read_study
from autodrop.run.storage import open_existing_study, safe_url, storage_errors
from autodrop.run.study import count_finished
from autodrop.run.trust import needs_model, trusted_config

# Colours used across the page, so the same thing looks the same in every figure.
_VAL, _TRAIN, _BEST, _PRUNED, _BASELINE, _ON, _OFF = (
    "#1f6fb2", "#9cc3e6", "#1a9850", "#d9a5a5", "#7b5ea7", "#e66101", "#9e9e9e"
)
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass(frozen=True)
class Report:
    """What ``autodrop report`` produced: the terminal text, and the page if one was asked for."""

    result: SearchResult
    text: str
    html_path: Path | None


@storage_errors
def make_report(
    study: str | None = None, storage: str | None = None, *, html_path: str | os.PathLike[str] | None = None,
    model: str | None = None,
    model_args: Sequence[str] | Mapping[str, Any] | None = None,
) -> Report:
    """Return the study's answer as terminal text, writing the HTML page too when ``html_path`` is given.

    ``storage`` defaults to ./autodrop.db and ``study`` to the storage's only study. The page draws
    the network's layers by rebuilding it: a built-in model from its name, the user's own only
    when ``model`` names it again (run/trust.py); without it the page shows the sites alone.
    """
    target = None if html_path is None else check_writable(html_path, "--html")
    opened = open_existing_study(study, storage)
    optuna_study, url = opened.study, opened.url
    trials = optuna_study.get_trials(deepcopy=False)
    if count_finished(optuna_study) == 0:
        raise StorageError(
            f"study {optuna_study.study_name!r} has no finished trial yet ({len(trials)} trials in all); "
            "there is nothing to report."
        )
    result = summarize_study(optuna_study, url)
    if target is not None:
        record = read_study(optuna_study)
        if needs_model(record) and model is None:
            network: str | None = None
        else:
            network = trusted_config(record, model=model, model_args=model_args, need_data=False).model
        write_text(target, render_html(result, network_model=network), "--html")
    return Report(result=result, text=format_result(result), html_path=target)


# -- the page ----------------------------------------------------------------------------------


def render_html(result: SearchResult, *, network_model: str | None = None) -> str:
    """Return the report page of a study's answer as one self-contained HTML document.

    ``network_model`` is the model to rebuild for the picture of the network (checked by the
    caller); None draws the sites alone.
    """
    figures = [
        ("baselines", "Best trial against the baselines",
         "Validation accuracy (dark) with train accuracy beside it (light): the difference is the gap.",
         baseline_figure(result)),
        ("importance", "Which sites matter",
         "Share of the explained variation in validation accuracy, per site (its rate, kind and slot together), "
         "with its 90% interval over resamples of the completed trials.",
         importance_figure(result)),
        ("history", "Optimisation history",
         "Validation accuracy of every trial in the order they ran, and the best so far.",
         history_figure(result)),
        ("curves", "Learning curves",
         "Validation accuracy per epoch; pruned trials stop early.",
         curves_figure(result)),
        ("parallel", "All trials across the sites",
         "Each line is a completed trial: its rate at every site (0 = off) and its validation accuracy.",
         parallel_figure(result)),
    ]
    blocks: dict[str, str] = {}
    first = True
    for key, title, caption, figure in figures:
        if figure is None:
            body = f'<p class="empty">{_e(_EMPTY_NOTES[key](result))}</p>'
        else:
            body = figure.to_html(
                full_html=False, include_plotlyjs=first, config=_PLOT_CONFIG, default_width="100%",
                default_height=f"{figure.layout.height or 360}px",
            )
            first = False
        if key == "importance" and figure is not None and result.importance_note:
            body += f'<p class="caption">{_e("Importances " + result.importance_note)}</p>'
        blocks[key] = (
            f'<section class="card" id="{key}"><h2>{_e(title)}</h2><p class="caption">{_e(caption)}</p>'
            f"{body}</section>"
        )
    settings, data = result.settings, result.data
    subtitle = (
        f"model {settings.get('model', '?')} · data {data.get('name', '?')} "
        f"({data.get('n_train', '?')} train / {data.get('n_val', '?')} val images) · "
        f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed trials"
        + (f" · trained with {result.recipe}" if result.recipe else "")
    )
    best = result.best
    headline = (
        "No completed trial yet."
        if best is None
        else f"Best: {best.description} — validation {_pct(best.val_accuracy)}, "
        f"train {_pct(best.train_accuracy)} (trial {best.number}"
        + (f", baseline {best.baseline})" if best.baseline else ")")
    )
    name = result.study_name
    return _PAGE.format(
        title=_e(f"autodrop report: {name}"),
        name=_e(name),
        subtitle=_e(subtitle),
        headline=_e(headline),
        verdict=_e(result.verdict),
        story=_e(site_story(result)),
        network=network_html(result, network_model),
        baselines=blocks["baselines"],
        importance=blocks["importance"],
        history=blocks["history"],
        curves=blocks["curves"],
        parallel=blocks["parallel"],
        text=_e(format_result(result)),
        study_arg=_e(_study_word(name) + _storage_arg(result.storage_url)),
        version=_e(__version__),
    )


_EMPTY_NOTES = {
    "baselines": lambda r: "No completed trial yet: nothing to compare.",
    "importance": lambda r: f"Per-site importance is not available: importances {r.importance_note or 'need more trials.'}",
    "history": lambda r: "No finished trial yet.",
    "curves": lambda r: "No trial reported a validation accuracy yet.",
    "parallel": lambda r: "Too few completed trials to draw.",
}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _shell_word(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _study_word(name: str) -> str:
    """Return the study's name for the footer's commands, or a placeholder: the name is read from
    storage, and a command to copy is never built from text anyone could have stored."""
    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) else "NAME"


def _storage_arg(url: str) -> str:
    """Return `` --storage URL`` for the footer's commands, any password hidden."""
    return f" --storage {_shell_word(safe_url(url))}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- the network column ------------------------------------------------------------------------


def network_layers(result: SearchResult, model_name: str | None) -> tuple[list[tuple[str, str, str | None]], str]:
    """Return (layer name, short description, site name or None) for the study's network, in order,
    and a caption that says what is drawn.

    The network is rebuilt from ``model_name`` (checked by the caller) and the stored data shape;
    without one, or when it cannot be built here, only the sites are listed, and the caption says why.
    """
    from autodrop.errors import AutodropError

    sites_only = [(site, kind, site) for site, kind in result.sites.items()]
    if model_name is None:
        return sites_only, ("Only the drop sites are drawn: rebuilding your own model needs it named again "
                            "with --model (autodrop imports no code a study names).")
    try:
        from autodrop.nets.build import ModelShape, build_model
        from autodrop.nets.sites import DEFAULT_SLOT, DropSite

        data = result.data
        shape = ModelShape(int(data["channels"]), len(data["classes"]), int(data["image_size"]))
        model = build_model(model_name, shape, model_args=result.settings.get("model-args") or {},
                            in_block=result.settings.get("in-block", "off"))
    except AutodropError as e:
        return sites_only, f"Only the drop sites are drawn: the model could not be rebuilt here ({e})"
    # A site declared in two slots is drawn once, where the best trial put it.
    slots = {site: v.get("slot", DEFAULT_SLOT) for site, v in (result.best.variants if result.best else {}).items()}
    layers: list[tuple[str, str, str | None]] = []
    for name, layer in model.named_children():
        if isinstance(layer, DropSite):
            if layer.slot != slots.get(layer.site_name, DEFAULT_SLOT):
                continue
            layers.append((name, layer.kind, layer.site_name))
        else:
            layers.append((name, _describe_layer(layer), None))
    return layers, ""


def _describe_layer(layer: Any) -> str:
    kind = type(layer).__name__
    if hasattr(layer, "in_channels") and hasattr(layer, "out_channels"):
        k = layer.kernel_size
        size = f"{k[0]}×{k[1]}" if isinstance(k, tuple) else str(k)
        return f"{kind} {layer.in_channels}→{layer.out_channels}, {size}"
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return f"{kind} {layer.in_features}→{layer.out_features}"
    if hasattr(layer, "num_features"):
        return f"{kind} {layer.num_features}"
    if kind.startswith("MaxPool") or kind.startswith("AvgPool"):
        return f"{kind} {layer.kernel_size}"
    return kind


def network_html(result: SearchResult, model_name: str | None = None) -> str:
    """Return the network as a column of layer blocks, each drop site marked off or on with its rate."""
    best = result.best.placement if result.best is not None else {}
    rows: list[str] = ['<div class="net-input">input</div>']
    block: list[tuple[str, str]] = []

    def flush() -> None:
        if block:
            items = "".join(
                f'<div class="layer"><span class="lname">{_e(n)}</span><span class="ldesc">{_e(d)}</span></div>'
                for n, d in block
            )
            rows.append(f'<div class="block">{items}</div>')
            block.clear()

    layers, drawn = network_layers(result, model_name)
    for name, description, site in layers:
        if site is None:
            block.append((name, description))
            continue
        flush()
        rate = best.get(site)
        kind = result.sites.get(site, description)
        if rate is None:
            rows.append(
                f'<div class="site off" title="site {_e(site)} ({_e(kind)}): off">'
                f'<span class="sname">{_e(site)}</span><span class="sstate">off</span></div>'
            )
        else:
            rows.append(
                f'<div class="site on" title="site {_e(site)} ({_e(kind)}): dropout {rate:.3f}">'
                f'<span class="sname">{_e(site)}</span><span class="sstate">dropout {rate:.2f}</span></div>'
            )
    flush()
    rows.append('<div class="net-input">output</div>')
    caption = (
        f"Best trial ({result.best.number}): each candidate site is marked off, or on with its rate."
        if result.best is not None else "No completed trial yet: all sites shown off."
    ) + (f" {drawn}" if drawn else "")
    return (
        f'<section class="card network" id="network"><h2>The network</h2><p class="caption">{_e(caption)}</p>'
        f'<div class="net">{"".join(rows)}</div></section>'
    )


# -- figures -----------------------------------------------------------------------------------


def _layout(fig: Any, *, height: int = 360, **kwargs: Any) -> Any:
    settings: dict[str, Any] = dict(
        template="plotly_white", height=height, margin=dict(l=60, r=20, t=40, b=50),
        font=dict(family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=13),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    )
    settings.update(kwargs)
    fig.update_layout(**settings)
    return fig


def baseline_figure(result: SearchResult) -> Any:
    """Return bars of validation and train accuracy: the best trial, then each baseline."""
    import plotly.graph_objects as go

    rows: list[tuple[str, TrialSummary]] = []
    if result.best is not None:
        recipe = f" = {result.best.baseline}" if result.best.baseline else ""
        rows.append((f"best{recipe} (trial {result.best.number})", result.best))
    for b in result.baselines:
        if b.state == "complete" and (result.best is None or b.number != result.best.number):
            rows.append((f"{b.baseline} (trial {b.number})", b))
    if not rows:
        return None
    labels = [_e(label) for label, _ in rows]
    hover = [_e(s.description) for _, s in rows]
    val = [s.val_accuracy or 0.0 for _, s in rows]
    train = [s.train_accuracy if s.train_accuracy is not None else None for _, s in rows]
    gaps = [_gap_text(s) for _, s in rows]
    fig = go.Figure()
    fig.add_bar(
        name="validation", x=labels, y=val, marker_color=[_BEST] + [_VAL] * (len(rows) - 1),
        text=[_pct(v) for v in val], textposition="outside", customdata=list(zip(hover, gaps)),
        hovertemplate="%{x}<br>validation %{y:.1%}<br>%{customdata[0]}<br>gap %{customdata[1]}<extra></extra>",
    )
    fig.add_bar(
        name="train", x=labels, y=train, marker_color=_TRAIN,
        text=[_pct(v) for v in train], textposition="outside",
        hovertemplate="%{x}<br>train %{y:.1%}<extra></extra>",
    )
    values = [v for v in val + train if v is not None]
    low = max(0.0, math.floor((min(values) - 0.08) * 20) / 20)
    ticks = [t / 20 for t in range(round(low * 20), 21)]  # every 5 points, never past 100%
    _layout(
        fig, barmode="group",
        yaxis=dict(title="accuracy", tickformat=".0%", tickvals=ticks, range=[low, min(1.08, max(values) + 0.06)]),
    )
    return fig


def _gap_text(s: TrialSummary) -> str:
    return "-" if s.gap is None else f"{100 * s.gap:+.1f} points"


def importance_figure(result: SearchResult) -> Any:
    """Return horizontal bars of each site's share of the importance, sites in forward order."""
    import plotly.graph_objects as go

    if result.importances is None:
        return None
    sites = list(result.sites)
    best = result.best.placement if result.best is not None else {}
    shares = [float(result.importances.get(s, 0.0)) for s in sites]
    intervals = result.importance_intervals or {s: (share, share) for s, share in zip(sites, shares)}
    lows = [intervals[s][0] for s in sites]
    highs = [intervals[s][1] for s in sites]
    colours = [_ON if best.get(s) is not None else _OFF for s in sites]
    states = [
        ("off in best" if best.get(s) is None else f"on at {best[s]:.2f} in best") + f"; 90% interval {lo:.0%}-{hi:.0%}"
        for s, lo, hi in zip(sites, lows, highs)
    ]
    fig = go.Figure(
        go.Bar(
            x=shares, y=[_e(s) for s in sites], orientation="h", marker_color=colours,
            # Error bars: the 5th to 95th percentile of the share over resamples of the completed trials.
            error_x=dict(type="data", symmetric=False, array=[max(0.0, h - v) for h, v in zip(highs, shares)],
                         arrayminus=[max(0.0, v - lo) for lo, v in zip(lows, shares)], color="#555", thickness=1.5),
            text=[f"{100 * v:.0f}%" for v in shares], textposition="inside", insidetextanchor="start",
            customdata=states, hovertemplate="%{y}: %{x:.1%}<br>%{customdata}<extra></extra>",
        )
    )
    height = max(220, 60 + 34 * len(sites))
    _layout(
        fig, height=height, showlegend=False,
        xaxis=dict(title="share of importance (bars: 90% interval)", tickformat=".0%",
                   range=[0, min(1.05, max(highs + shares + [0.1]) * 1.1)]),
        yaxis=dict(autorange="reversed"),
    )
    return fig


def history_figure(result: SearchResult) -> Any:
    """Return each trial's validation accuracy by trial number, baselines marked, and the best so far."""
    import plotly.graph_objects as go

    trials = [t for t in result.trials if t.state in ("complete", "pruned")]
    if not trials:
        return None
    fig = go.Figure()
    complete = [t for t in trials if t.state == "complete" and t.val_accuracy is not None]
    searched = [t for t in complete if not t.baseline]
    baselines = [t for t in complete if t.baseline]
    pruned = [t for t in trials if t.state == "pruned" and t.curve]
    if searched:
        fig.add_scatter(
            name="searched", mode="markers", x=[t.number for t in searched], y=[t.val_accuracy for t in searched],
            marker=dict(color=_VAL, size=8), customdata=[_e(t.description) for t in searched],
            hovertemplate="trial %{x}: %{y:.1%}<br>%{customdata}<extra></extra>",
        )
    if baselines:
        fig.add_scatter(
            name="baselines", mode="markers", x=[t.number for t in baselines], y=[t.val_accuracy for t in baselines],
            marker=dict(color=_BASELINE, size=10, symbol="diamond"),
            customdata=[f"{_e(t.baseline)}: {_e(t.description)}" for t in baselines],
            hovertemplate="trial %{x}: %{y:.1%}<br>baseline %{customdata}<extra></extra>",
        )
    if pruned:
        fig.add_scatter(
            name="pruned (last epoch reached)", mode="markers", x=[t.number for t in pruned],
            y=[t.curve[max(t.curve)] for t in pruned],
            marker=dict(color=_PRUNED, size=8, symbol="x"),
            hovertemplate="trial %{x}: pruned at %{y:.1%}<extra></extra>",
        )
    if complete:
        ordered = sorted(complete, key=lambda t: t.number)
        best_so_far, running = [], -1.0
        for t in ordered:
            running = max(running, float(t.val_accuracy))  # type: ignore[arg-type]
            best_so_far.append(running)
        fig.add_scatter(
            name="best so far", mode="lines", x=[t.number for t in ordered], y=best_so_far,
            line=dict(color=_BEST, width=2, shape="hv"), hoverinfo="skip",
        )
    last = max(t.number for t in trials)
    _layout(
        fig,
        xaxis=dict(title="trial", dtick=max(1, -(-last // 12)), range=[-0.5, last + 0.5]),
        yaxis=dict(title="validation accuracy", tickformat=".0%"),
    )
    return fig


def curves_figure(result: SearchResult) -> Any:
    """Return each trial's validation accuracy per epoch; pruned trials in a muted colour."""
    import plotly.graph_objects as go

    trials = [t for t in result.trials if t.curve]
    if not trials:
        return None
    best_number = result.best.number if result.best is not None else None
    fig = go.Figure()
    shown: set[str] = set()

    def add(t: TrialSummary, group: str, colour: str, width: float) -> None:
        steps = sorted(t.curve)
        fig.add_scatter(
            x=steps, y=[t.curve[s] for s in steps], mode="lines+markers",
            line=dict(color=colour, width=width), marker=dict(size=4), name=group, legendgroup=group,
            showlegend=group not in shown, hovertemplate=f"trial {t.number}, epoch %{{x}}: %{{y:.1%}}<extra></extra>",
        )
        shown.add(group)

    for t in trials:
        if t.number == best_number:
            continue
        if t.state == "pruned":
            add(t, "pruned", _PRUNED, 1.5)
        elif t.state == "complete":
            add(t, "completed", _TRAIN, 1.5)
    best = next((t for t in trials if t.number == best_number), None)
    if best is not None:
        add(best, f"best (trial {best.number})", _BEST, 3)
    _layout(
        fig, xaxis=dict(title="epoch", dtick=1),
        yaxis=dict(title="validation accuracy", tickformat=".0%"),
    )
    return fig


def parallel_figure(result: SearchResult) -> Any:
    """Return parallel coordinates: one axis per site (rate, 0 when off) and validation accuracy."""
    import plotly.graph_objects as go

    complete = [s for s in result.trials if s.state == "complete" and s.val_accuracy is not None]
    if len(complete) < 2:
        return None
    high = max(
        [float(v) for v in result.settings.get("rate-range", [0, 0.7])[1:2] if isinstance(v, (int, float))] or [0.7]
    )
    ticks = [0.0, round(high / 2, 2), round(high, 2)]
    dimensions = [
        dict(
            label=_e(site), values=[s.placement.get(site) or 0.0 for s in complete], range=[0.0, high],
            tickvals=ticks, ticktext=["off"] + [f"{v:g}" for v in ticks[1:]],
        )
        for site in result.sites
    ]
    accuracies = [float(s.val_accuracy) for s in complete]
    dimensions.append(dict(label="val accuracy", values=accuracies, tickformat=".0%"))
    fig = go.Figure(
        go.Parcoords(
            line=dict(color=accuracies, colorscale="Viridis", showscale=False),
            dimensions=dimensions,
        )
    )
    _layout(fig, margin=dict(l=50, r=60, t=60, b=30))
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  :root {{ --ink: #1d2733; --muted: #5c6773; --line: #e3e7ec; --bg: #f5f7fa; }}
  * {{ box-sizing: border-box; }}
  body {{ margin: 0; background: var(--bg); color: var(--ink);
         font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }}
  main {{ max-width: 1180px; margin: 0 auto; padding: 24px; }}
  header h1 {{ margin: 0 0 2px; font-size: 24px; }}
  header .subtitle {{ color: var(--muted); margin: 0 0 16px; }}
  .summary {{ background: #fff; border-left: 5px solid #1a9850; border-radius: 8px; padding: 14px 18px;
             box-shadow: 0 1px 2px rgba(0,0,0,.06); margin-bottom: 18px; }}
  .summary .headline {{ font-weight: 600; font-size: 16px; margin: 0 0 6px; }}
  .summary p {{ margin: 4px 0; }}
  .grid {{ display: grid; grid-template-columns: 280px 1fr; gap: 18px; align-items: start; }}
  .stack {{ display: grid; gap: 18px; min-width: 0; }}
  .card {{ background: #fff; border-radius: 8px; padding: 14px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.06);
          min-width: 0; margin-bottom: 18px; }}
  .grid .card, .stack .card {{ margin-bottom: 0; }}
  .card h2 {{ font-size: 17px; margin: 0 0 2px; }}
  .caption {{ color: var(--muted); margin: 0 0 8px; font-size: 13px; }}
  .empty {{ color: var(--muted); font-style: italic; }}
  .net {{ display: flex; flex-direction: column; align-items: stretch; gap: 4px; }}
  .net-input {{ text-align: center; color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .05em; }}
  .block {{ border: 1px solid var(--line); border-radius: 6px; background: #fafbfc; padding: 3px 8px; }}
  .layer {{ display: flex; justify-content: space-between; gap: 8px; font-size: 12.5px; padding: 1px 0; }}
  .lname {{ font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }}
  .ldesc {{ color: var(--muted); text-align: right; }}
  .site {{ display: flex; justify-content: space-between; border-radius: 6px; padding: 3px 8px; font-size: 12.5px; }}
  .site .sname {{ font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }}
  .site.off {{ border: 1px dashed #bdbdbd; color: #8a8a8a; }}
  .site.on {{ background: #e66101; color: #fff; font-weight: 600; }}
  pre {{ background: #fff; border-radius: 8px; padding: 14px; overflow-x: auto; font-size: 12.5px; }}
  details {{ margin-bottom: 18px; }}
  summary {{ cursor: pointer; color: var(--muted); }}
  code {{ background: #eef1f5; border-radius: 4px; padding: 1px 5px; }}
  footer {{ color: var(--muted); font-size: 12.5px; margin-top: 8px; }}
  @media (max-width: 820px) {{ .grid {{ grid-template-columns: 1fr; }} }}
</style>
</head>
<body>
<main>
<header>
  <h1>Where should dropout go? Study <span class="study">{name}</span></h1>
  <p class="subtitle">{subtitle}</p>
</header>
<section class="summary" id="summary">
  <p class="headline">{headline}</p>
  <p>{verdict}</p>
  <p>{story}</p>
</section>
<div class="grid">
  {network}
  <div class="stack">
    {baselines}
    {importance}
  </div>
</div>
<div style="height:18px"></div>
{history}
{curves}
{parallel}
<details><summary>The answer as the terminal prints it</summary><pre>{text}</pre></details>
<footer>
  Take the winner home: <code>autodrop export --study {study_arg} --out winner.py --weights winner.pt</code>.
  Explore every trial: <code>autodrop dashboard --study {study_arg}</code>.
  Written by autodrop {version}; this page works offline.
</footer>
</main>
</body>
</html>
"""
