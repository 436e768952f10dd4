"""autodrop dashboard: optuna-dashboard on a finished study, its notes and kept weights included."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from click.testing import CliRunner

from autodrop.cli import main


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def running(tiny_study):
    """The tiny study's dashboard, served on a free port for the module's tests."""
    from autodrop.outputs.dashboard import create_dashboard_app, start_dashboard

    dashboard = create_dashboard_app("tiny", tiny_study.url)
    with start_dashboard(dashboard, port=0) as server:
        yield server


def test_dashboard_api_answers_for_the_study(running):
    meta = get_json(running.base_url + "/api/meta")
    assert meta["artifact_is_available"] is True
    studies = get_json(running.base_url + "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tiny"]
    assert running.url.endswith(f"/dashboard/studies/{studies[0]['study_id']}")


def test_dashboard_binds_localhost_by_default(running):
    assert running.host == "127.0.0.1"
    assert running.base_url.startswith("http://127.0.0.1:")


def test_dashboard_shows_metric_name_notes_and_kept_weights(running, tiny_study):
    study = get_json(running.base_url + running.dashboard.path.replace("/dashboard/studies", "/api/studies"))
    assert study["objective_names"] == ["val_accuracy"]
    trials = study["trials"]
    assert len(trials) == 6
    for trial in trials:
        assert "**Dropout:**" in trial["note"]["body"]
        assert "**Accuracy:** validation" in trial["note"]["body"]
    assert "**Baseline recipe:** none" in trials[0]["note"]["body"]
    best = max(trials, key=lambda t: t["values"][0])
    [artifact] = best["artifacts"]
    assert artifact["filename"] == f"trial-{best['number']}-weights.pt"
    # The dashboard serves the weights file itself.
    url = f"{running.base_url}/artifacts/{study_id(running)}/{best['trial_id']}/{artifact['artifact_id']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200 and len(response.read()) > 10_000


def study_id(running) -> int:
    return running.dashboard.study_id


def test_dashboard_page_renders_headless(running, tmp_path, headless):
    dom, console = headless(running.url, tmp_path / "dashboard.png", height=900, budget_ms=15000)
    assert "tiny" in dom  # the study's name, put there by the page's JavaScript
    assert 'class="main-svg"' in dom  # and plotly charts drawn from the API's data
    assert "Uncaught" not in console, console


def test_dashboard_command_prints_url_and_stops_on_ctrl_c(tiny_study):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "autodrop", "dashboard", "--storage", tiny_study.url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard/studies/" in first, first
        get_json(f"http://127.0.0.1:{port}/api/meta")  # it answers once the URL is printed
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "Dashboard stopped." in rest and "Traceback" not in rest


def test_dashboard_on_a_non_loopback_host_warns_before_serving(tiny_study, monkeypatch):
    import time

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = []
    real_sleep = time.sleep

    def ctrl_c_while_serving(seconds: float) -> None:
        if seconds < 60:  # the short waits of the server and its readiness check
            real_sleep(seconds)
            return
        served.append(get_json(f"http://127.0.0.1:{port}/api/meta"))  # it really serves on 0.0.0.0
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c_while_serving)
    result = CliRunner().invoke(main, ["dashboard", "--storage", tiny_study.url, "--host", "0.0.0.0",
                                       "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert served
    assert result.stderr == (f"Warning: --host 0.0.0.0 serves the dashboard beyond this machine: anyone who can "
                             f"reach port {port} can upload and delete artifacts and edit notes.\n")
    assert result.output.startswith("Warning: ") and "Dashboard stopped." in result.output


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.5", False), ("my-laptop.example", False)])
def test_only_loopback_hosts_count_as_this_machine_alone(host, loopback):
    from autodrop.outputs.dashboard import is_loopback

    assert is_loopback(host) is loopback


def test_dashboard_port_in_use_is_one_line_exit_2(tiny_study):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(main, ["dashboard", "--storage", tiny_study.url, "--port", str(port)])
    assert result.exit_code == 2
    assert f"--port {port} is already in use" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope"], "no study named 'nope' in this storage; studies there: tiny"),
        (["--artifact-dir", "/no/such/folder"], "--artifact-dir '/no/such/folder' does not exist"),
    ],
)
def test_dashboard_bad_input_is_one_line_exit_2(tiny_study, args, message):
    result = CliRunner().invoke(main, ["dashboard", "--storage", tiny_study.url, "--port", "0"] + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0


def test_dashboard_refuses_an_empty_study(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = CliRunner().invoke(main, ["dashboard", "--storage", url, "--port", "0"])
    assert result.exit_code == 2
    assert "study 'empty' has no trials yet" in result.output


def test_dashboard_of_missing_sqlite_file_creates_nothing(tmp_path):
    missing = tmp_path / "missing.db"
    result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{missing}", "--port", "0"])
    assert result.exit_code == 2
    assert not missing.exists()
