"""Fixtures for the top-level tests; the plain helpers live in tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of 10 gray 12x12 PNGs each."""
    return write_image_folder(tmp_path / "images", {"a": 10, "b": 10, "c": 10})


@pytest.fixture(autouse=True)
def _float32_unless_the_test_is_about_precision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` precision trains in bf16 on a CPU with native bf16 (AMX, AVX512-BF16), which would move
    the exact comparisons many tests make (packed against separate, export against the search) on
    such a machine only. The tests about precision fake the hardware's answer themselves."""
    if "precision" in request.node.path.name:
        return
    from autodrop.training import device

    monkeypatch.setattr(device, "native_bf16", lambda _device: False)
