"""Start-up stays light: help and other non-training commands import neither torch nor torchvision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("args", [["--help"], ["search", "--help"], ["--version"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    out = _run(
        "import sys\n"
        "import autodrop.cli\n"
        "try:\n"
        f"    autodrop.cli.main({args!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('TORCH', 'torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    assert out.strip().splitlines()[-1] == "TORCH False False"


def test_training_modules_do_not_import_torchvision() -> None:
    out = _run(
        "import sys\n"
        "import autodrop.run.search, autodrop.training.packed, autodrop.training.loop, autodrop.training.data\n"
        "print('TV', 'torchvision' in sys.modules)\n"
    )
    assert out.strip().splitlines()[-1] == "TV False"
