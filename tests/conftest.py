"""Fixtures for the top-level tests; the plain helpers live in tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of 10 gray 12x12 PNGs each."""
    return write_image_folder(tmp_path / "images", {"a": 10, "b": 10, "c": 10})
