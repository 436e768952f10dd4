"""The benchmark scripts run end to end at a tiny size (no speed is asserted: that is their output)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


@pytest.mark.slow
def test_trial_throughput_runs_and_ends_with_the_speedup_line() -> None:
    lines = _run("benchmarks/trial_throughput.py", "--size", "64", "--image-size", "16", "--epochs", "1",
                 "--repeats", "1", "--pack", "2")
    assert re.fullmatch(r"speedup vs tutorial loop: \d+\.\d\dx", lines[-1]), lines[-1]
    text = "\n".join(lines)
    for label in ("(a) tutorial loop", "(b) autodrop trial loop", "(b+) the same, realistic recipe",
                  "(c) 2 trials packed", "(c+) the same, realistic recipe", "matmul rate", "peak RSS"):
        assert label in text
    assert re.fullmatch(r"realistic recipe vs plain loop: \d+\.\d\dx", lines[-2]), lines[-2]


@pytest.mark.slow
def test_search_memory_reports_peaks_and_the_data_share(tmp_path) -> None:
    lines = _run("benchmarks/search_memory.py", "--images", "400", "--small", "200", "--workers", "2",
                 "--folder", str(tmp_path))
    assert "CPU:" in lines[0] and lines[1].startswith("dataset: 400 images")
    text = "\n".join(lines)
    for label in ("400 images, first search", "200 images, 2 workers", "data's share, 2 workers"):
        assert label in text
    assert re.search(r"summed (pss|rss) -?\d+\.\d\dx", lines[-1]), lines[-1]


@pytest.mark.slow
def test_search_quality_runs_and_prints_each_table(tmp_path) -> None:
    lines = _run("benchmarks/search_quality.py", "--cases", "noisy-labels", "--trials", "6", "--long-epochs", "3",
                 "--no-confirm", "--keep", str(tmp_path))
    text = "\n".join(lines)
    for label in ("TPE, noise pruner", "random, noise pruner", "TPE, no pruning", "pruner, replayed", "median"):
        assert label in text
    assert lines[-1].startswith("total ")
