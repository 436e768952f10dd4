"""Fixtures for report, export and dashboard: one finished tiny study, made once per test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Small enough that the whole study takes seconds on a 2-core CPU; big enough for every figure.
TINY_SEARCH = dict(
    data="digits", image_size=16, train_per_class=30, epochs=2, batch_size=64, trials=6, pruner="none",
    device="cpu", study="tiny",
)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--enable-logging=stderr", "--v=0",
]


class TinyStudy:
    """A finished tiny study on disk: its folder, storage URL and name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "study.db"
        self.url = f"sqlite:///{self.db}"
        self.name = TINY_SEARCH["study"]
        self.artifact_dir = folder / "study-artifacts"

    def copy_to(self, folder: Path) -> "TinyStudy":
        """Return a copy of the study's database (without its artifacts) in ``folder``, to edit."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.db, folder / "study.db")
        return TinyStudy(folder)

    def load(self):
        import optuna

        return optuna.load_study(study_name=self.name, storage=self.url)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    """A finished six-trial digits study, its weights kept beside the database."""
    import torch

    from autodrop.api import search

    study = TinyStudy(tmp_path_factory.mktemp("tiny-study"))
    # One thread: on a small shared CPU box, torch's thread pool fighting other processes makes
    # this tiny network tens of times slower, and one thread loses nothing at this size.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        search(**TINY_SEARCH, storage=study.url)
    finally:
        torch.set_num_threads(threads)
    return study


REQUIRE_CHROMIUM_ENV = "AUTODROP_REQUIRE_CHROMIUM"  # CI sets it: the browser tests must run there


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def skip_without_chromium() -> None:
    """Skip the test, saying why, where Chromium is missing; fail it where CI requires Chromium."""
    if find_chromium() is not None:
        return
    reason = "Chromium is not installed (apt-get install chromium); the headless rendering check needs it."
    if os.environ.get(REQUIRE_CHROMIUM_ENV) == "1":
        pytest.fail(f"{REQUIRE_CHROMIUM_ENV}=1 but {reason}")
    pytest.skip(reason)


def run_chromium(
    url: str, screenshot: Path, *, height: int = 2400, budget_ms: int = 10000, offline: bool = False
) -> tuple[str, str]:
    """Load ``url`` headless; save a screenshot and return (rendered DOM, console log lines).

    ``offline`` sends every request but loopback to a closed port, so a page that needs the
    network cannot render.
    """
    skip_without_chromium()
    chromium = find_chromium()
    with tempfile.TemporaryDirectory(prefix="autodrop-chromium-") as profile:
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1280,{height}",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom",
             *(["--proxy-server=http://127.0.0.1:9"] if offline else []), url],
            capture_output=True, text=True, timeout=180,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, "\n".join(console)


@pytest.fixture
def headless():
    """Return run_chromium; skips the test, saying why, where Chromium is not installed (fails it in CI)."""
    skip_without_chromium()
    return run_chromium


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that needs the finished study runs a real (tiny) search first: it is end-to-end.
    for item in items:
        if "tiny_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
