"""autodrop report: the stored answer in the terminal, and as one offline HTML page."""

from __future__ import annotations

import re
import sqlite3

import pytest
from click.testing import CliRunner

from autodrop.cli import main

PARTS = ("summary", "network", "baselines", "importance", "history", "curves", "parallel")


@pytest.fixture(scope="module")
def page(tiny_study, tmp_path_factory):
    """The report page of the tiny study, written by the CLI; (path, text, CLI output)."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(main, ["report", "--storage", tiny_study.url, "--study", "tiny", "--html", str(path)])
    assert result.exit_code == 0, result.output
    return path, path.read_text(encoding="utf-8"), result.output


def test_report_prints_the_same_answer_as_search(tiny_study, page):
    from autodrop.outputs.results import load_results
    from autodrop.outputs.text import format_result

    _, _, output = page
    assert format_result(load_results("tiny", tiny_study.url)) in output
    assert "Wrote the report page to" in output


def test_report_page_has_every_part(page):
    _, text, _ = page
    for part in PARTS:
        assert f'id="{part}"' in text, part
    assert text.count("Plotly.newPlot") == 5  # baselines, importance, history, curves, parallel
    assert "Where should dropout go? Study" in text
    # The recipe the answer holds for (the tiny study trains with the defaults).
    assert "trained with Adam 0.002, constant rate, no weight decay, no augmentation, batch 64, 2 epochs" in text


def test_report_page_embeds_plotly_once_and_needs_no_network(page):
    _, text, _ = page
    assert text.count("window.PlotlyConfig") == 1  # plotly.js itself, inline, once
    assert len(text) > 1_000_000  # the library is really in the file
    assert not re.search(r"<script[^>]+src=", text)  # nothing fetched: no script, style or font links
    assert "<link" not in text and "@import" not in text


def test_report_page_marks_every_site_of_the_best_trial(tiny_study, page):
    _, text, _ = page
    best = tiny_study.load().best_trial
    for site in tiny_study.load().user_attrs["autodrop.sites"]:
        if best.params[site] == "on":
            assert f'title="site {site} ({"fc" if site.startswith("fc") else "conv"}): dropout' in text
        else:
            assert f'title="site {site} ' in text and f'{site} (' in text


def test_report_summary_names_no_site_on_six_trials(tiny_study):
    from autodrop.outputs.results import load_results
    from autodrop.outputs.text import site_story

    result = load_results("tiny", tiny_study.url)
    # Six trials give rough importances: the note says so, and the story does not single a site out.
    assert "rough" in result.importance_note
    story = site_story(result)
    assert story.startswith(("No site's effect is measurable", "No single site stands out")), story
    assert "comes from" not in story


def test_report_page_escapes_text_from_storage(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "renamed")
    with sqlite3.connect(copy.db) as db:
        db.execute("UPDATE studies SET study_name = '<script>alert(1)</script>'")
    path = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", "--storage", copy.url, "--html", str(path)])
    assert result.exit_code == 0, result.output
    text = path.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_report_page_renders_headless_without_javascript_errors(page, tmp_path, headless):
    path, _, _ = page
    screenshot = tmp_path / "report.png"
    dom, console = headless(path.as_uri(), screenshot, offline=True)
    assert "Uncaught" not in console and "Error" not in console, console
    assert dom.count("js-plotly-plot") >= 5  # every figure was drawn by plotly.js
    assert dom.count('class="main-svg"') >= 5
    assert screenshot.stat().st_size > 50_000  # a real picture, not a blank page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope"], "no study named 'nope' in this storage; studies there: tiny"),
        (["--html", "/no/such/folder/r.html"], "folder '/no/such/folder' does not exist"),
    ],
)
def test_report_bad_input_is_one_line_exit_2(tiny_study, args, message):
    result = CliRunner().invoke(main, ["report", "--storage", tiny_study.url] + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0


def test_report_refuses_an_empty_study(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = CliRunner().invoke(main, ["report", "--storage", url])
    assert result.exit_code == 2
    assert "study 'empty' has no finished trial yet" in result.output


def test_report_asks_which_study_when_the_storage_has_several(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'two.db'}"
    optuna.create_study(study_name="a", storage=url)
    optuna.create_study(study_name="b", storage=url)
    result = CliRunner().invoke(main, ["report", "--storage", url])
    assert result.exit_code == 2
    assert "several studies; pick one with --study: a, b" in result.output


def test_report_of_missing_sqlite_file_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default storage is ./autodrop.db
    result = CliRunner().invoke(main, ["report"])
    assert result.exit_code == 2
    assert "autodrop.db" in result.output and "does not exist" in result.output
    assert not (tmp_path / "autodrop.db").exists()
