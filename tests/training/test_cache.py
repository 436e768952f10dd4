"""The decoded-image cache: a second load of a folder skips decoding; a changed folder is re-read."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from autodrop.config import DataConfig
from autodrop.errors import AutodropWarning
from autodrop.training import cache
from autodrop.training import data as data_module
from autodrop.training.cache import CACHE_ENV
from autodrop.training.data import load_data


def _write_folder(root: Path, per_class: int = 6, size: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 100 * c, 20, size=(size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every image the loader decodes."""
    calls: list[Path] = []
    real = data_module._decode

    def counting(path: Path, size: int) -> np.ndarray:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(data_module, "_decode", counting)
    return calls


_SPLITS = ("train_images", "train_labels", "val_images", "val_labels")


def _same(a, b) -> None:
    for name in _SPLITS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_second_load_skips_decoding(tmp_path: Path, cache_folder: Path, decode_calls: list[Path]) -> None:
    root = _write_folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=8)
    first = load_data(config)
    assert len(decode_calls) == 12
    assert len(list(cache_folder.glob("*" + cache.SUFFIX))) == 1
    second = load_data(config)
    assert len(decode_calls) == 12  # nothing decoded the second time
    _same(first, second)


def test_touching_a_file_rebuilds_the_cache(tmp_path: Path, cache_folder: Path, decode_calls: list[Path]) -> None:
    root = _write_folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=8)
    load_data(config)
    target = root / "cat" / "0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_data(config)
    assert len(decode_calls) == 24  # stale: decoded again
    load_data(config)
    assert len(decode_calls) == 24  # and the rebuilt cache is used
    assert len(list(cache_folder.glob("*" + cache.SUFFIX))) == 1  # replaced, not accumulated


def test_changed_pixels_are_read_again(tmp_path: Path, cache_folder: Path) -> None:
    from PIL import Image

    root = _write_folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=10, val_fraction=0.5)
    before = load_data(config)
    Image.fromarray(np.full((10, 10), 255, np.uint8), "L").save(root / "cat" / "0.png")
    after = load_data(config)
    all_before = torch.cat([before.train_images, before.val_images])
    all_after = torch.cat([after.train_images, after.val_images])
    assert (all_after == 255).all(dim=(1, 2, 3)).any()
    assert not (all_before == 255).all(dim=(1, 2, 3)).any()


def test_added_file_and_other_image_size_are_not_served_from_cache(
    tmp_path: Path, cache_folder: Path, decode_calls: list[Path]
) -> None:
    root = _write_folder(tmp_path / "images")
    load_data(DataConfig(source=str(root), image_size=8))
    load_data(DataConfig(source=str(root), image_size=12))
    assert len(decode_calls) == 24
    (root / "dog" / "extra.png").write_bytes((root / "dog" / "0.png").read_bytes())
    grown = load_data(DataConfig(source=str(root), image_size=8))
    assert len(grown.train_labels) + len(grown.val_labels) == 13


def test_cache_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode_calls: list[Path]) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = _write_folder(tmp_path / "images")
    load_data(DataConfig(source=str(root), image_size=8))
    load_data(DataConfig(source=str(root), image_size=8))
    assert len(decode_calls) == 24
    assert not (tmp_path / "home").exists()


def test_corrupt_cache_is_rebuilt(tmp_path: Path, cache_folder: Path, decode_calls: list[Path]) -> None:
    root = _write_folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=8)
    first = _in_memory(load_data(config))
    (cache_file,) = cache_folder.glob("*" + cache.SUFFIX)
    # Written in place, as a user or a disk tool might (autodrop only ever replaces the file whole);
    # a process that had it mapped would be hit by SIGBUS, so this one holds a copy.
    cache_file.write_bytes(b"not a cache file")
    second = load_data(config)
    assert len(decode_calls) == 24
    _same(first, second)


def test_cut_short_cache_is_rebuilt(tmp_path: Path, cache_folder: Path, decode_calls: list[Path]) -> None:
    root = _write_folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=8)
    first = _in_memory(load_data(config))
    (cache_file,) = cache_folder.glob("*" + cache.SUFFIX)
    whole = cache_file.read_bytes()
    partial = cache_file.with_suffix(".part")
    partial.write_bytes(whole[: len(whole) - 100])  # a copy that stopped early: header intact, data short
    os.replace(partial, cache_file)
    second = load_data(config)
    assert len(decode_calls) == 24
    _same(first, second)


def _in_memory(data):
    """Return ``data`` with its arrays copied out of the mapped cache file."""
    return dataclasses.replace(data, **{name: getattr(data, name).clone() for name in _SPLITS})


def test_skipped_files_are_reported_again_from_cache(tmp_path: Path, cache_folder: Path) -> None:
    root = _write_folder(tmp_path / "images")
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    config = DataConfig(source=str(root), image_size=8)
    for _ in range(2):
        with pytest.warns(AutodropWarning, match="broken.png"):
            load_data(config)


def test_unwritable_cache_folder_warns_and_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # a folder inside a file cannot be made
    root = _write_folder(tmp_path / "images")
    with pytest.warns(AutodropWarning, match="cannot write the decoded-image cache"):
        data = load_data(DataConfig(source=str(root), image_size=8))
    assert len(data.train_labels) + len(data.val_labels) == 12


def test_train_and_val_folders_are_cached_together(
    tmp_path: Path, cache_folder: Path, decode_calls: list[Path]
) -> None:
    _write_folder(tmp_path / "ds" / "train")
    _write_folder(tmp_path / "ds" / "val", per_class=3)
    config = DataConfig(source=str(tmp_path / "ds"), image_size=8)
    first = load_data(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = load_data(config)
    assert len(decode_calls) == 18
    _same(first, second)
    assert len(second.val_labels) == 6


def test_file_deleted_after_the_folder_was_listed_is_skipped_with_a_warning(
    tmp_path: Path, cache_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _write_folder(tmp_path / "images")
    gone = root / "cat" / "3.png"
    real_list = data_module._list_classes

    def list_then_delete(folder: Path):
        listed = real_list(folder)
        gone.unlink()  # another process removes it before the loader reads it
        return listed

    monkeypatch.setattr(data_module, "_list_classes", list_then_delete)
    with pytest.warns(AutodropWarning, match="3.png"):
        data = load_data(DataConfig(source=str(root), image_size=8))
    assert len(data.train_labels) + len(data.val_labels) == 11


class _InterruptedRows(cache.Rows):
    """Ctrl-C lands after its first chunk: the cache file has been partly written."""

    def chunks(self):
        yield self.source[:1]
        raise KeyboardInterrupt


def test_interrupted_cache_write_leaves_no_partial_file(cache_folder: Path) -> None:
    arrays = {"images0": np.zeros((64, 8, 8), np.uint8), "labels0": _InterruptedRows(np.zeros(64), np.arange(64))}
    with pytest.raises(KeyboardInterrupt):
        cache._write(cache_folder / ("slot" + cache.SUFFIX), "digest", [], arrays)
    assert list(cache_folder.iterdir()) == []
