"""The README's two set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_a_search_and_the_tests():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("autodrop search --data digits")
    assert "pytest" in commands[1]


def test_ci_runs_the_readmes_test_command_verbatim():
    test_command = _setup_commands()[1]
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_ci_requires_the_browser_and_postgresql_tests_to_run_and_stops_a_hung_test():
    ci = (REPO / ".ci" / "run").read_text()
    assert "export AUTODROP_REQUIRE_CHROMIUM=1" in ci and "export AUTODROP_REQUIRE_POSTGRES=1" in ci
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "pytest-timeout" in pyproject and 'addopts = "-ra"' in pyproject and "timeout = " in pyproject
