"""Decoded images on disk, so that a second search of the same folder skips decoding.

Decoding and resizing is the slow part of reading a folder (the more so for large photos), and
every search of the same folder at the same size decodes the same pixels. The cache keeps the decoded uint8 arrays in one ``.npz`` file per (folder, image size,
channels) under ``$AUTODROP_CACHE_DIR`` (default ``~/.cache/autodrop``; ``off`` disables it).

A cache is never trusted blindly: it stores the listing it was built from (every file's path,
class, size and modification time) and is used only if the listing read now is identical. A
stale cache is rebuilt and replaced, so one folder never accumulates old copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from autodrop.errors import AutodropWarning

CACHE_ENV = "AUTODROP_CACHE_DIR"
FORMAT_VERSION = 2  # bump when what is stored, or how images are decoded, changes
_OFF = ("off", "none", "0", "false", "no")


def cache_dir() -> Path | None:
    """Return the folder caches go in, or None when caching is switched off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in _OFF or not value.strip():
            return None
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autodrop"


def listing(groups: Sequence[Sequence[tuple[Path, str]]]) -> list[list[list[Any]]]:
    """Return each file's [path, class, size, mtime in ns], group by group: what the cache is keyed on."""
    result = []
    for files in groups:
        rows = []
        for path, label in files:
            try:
                stat = path.stat()
            except OSError:
                # Gone since the folder was listed: decoding it fails too and is skipped with a warning naming it.
                continue
            rows.append([str(path.resolve()), label, stat.st_size, stat.st_mtime_ns])
        result.append(rows)
    return result


def cached_arrays(
    root: Path,
    settings: dict[str, Any],
    groups: Sequence[Sequence[tuple[Path, str]]],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays for these files, from the cache when it matches them exactly.

    ``settings`` (image size, channels, ...) and the files' listing form the key. Warnings of
    type AutodropWarning raised while building (skipped files) are stored and shown again on
    every cached load, so a cached search says the same things as the first.
    """
    folder = cache_dir()
    if folder is None:
        return build()
    key = {"version": FORMAT_VERSION, "root": str(root.resolve()), "settings": settings, "files": listing(groups)}
    slot = hashlib.sha256(
        json.dumps([key["version"], key["root"], settings], sort_keys=True).encode()
    ).hexdigest()[:32]
    path = folder / f"{slot}.npz"
    # The listing of a large folder is megabytes of text; its digest is what is stored and compared.
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    cached = _read(path, digest)
    if cached is not None:
        arrays, messages = cached
        for message in messages:
            warnings.warn(message, AutodropWarning, stacklevel=2)
        return arrays
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutodropWarning)
        arrays = build()
    messages = []
    for w in caught:
        if issubclass(w.category, AutodropWarning):
            messages.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _write(path, digest, messages, arrays)
    return arrays


def _read(path: Path, digest: str) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """Return the arrays and warnings stored at ``path`` if it was built from the key whose digest is ``digest``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["__key__"]) != digest:
                return None  # stale: some file was added, removed, changed or touched
            messages = json.loads(str(stored["__warnings__"]))
            arrays = {name: stored[name] for name in stored.files if not name.startswith("__")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None  # unreadable or from another version: rebuild
    return arrays, messages


def _write(path: Path, digest: str, messages: list[str], arrays: dict[str, np.ndarray]) -> None:
    """Store the arrays atomically: a reader sees the old file or the complete new one."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, __key__=np.array(digest), __warnings__=np.array(json.dumps(messages)), **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        # A partial file can be as large as the data set: remove it whatever stopped the write, Ctrl-C included.
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if not isinstance(e, OSError):
            raise
        warnings.warn(
            f"cannot write the decoded-image cache in {str(path.parent)!r} ({e.strerror or e}); images will be "
            f"decoded again next time. Set {CACHE_ENV} to a writable folder, or to 'off'.",
            AutodropWarning,
            stacklevel=3,
        )
