"""Decoded images on disk, so that a second search of the same folder skips decoding, and the
processes of one search share one copy of them.

Decoding and resizing is the slow part of reading a folder (the more so for large photos), and
every search of the same folder at the same size decodes the same pixels. The cache keeps the
decoded, already split uint8 arrays in one raw ``.images`` file per (folder, image size, channels,
validation share) under ``$AUTODROP_CACHE_DIR`` (default ``~/.cache/autodrop``; ``off`` disables it).

The file is read memory-mapped, never into memory: the arrays a trial trains on are views of the
file's pages in the operating system's page cache, so every worker process on the machine reads
the same physical pages instead of holding a decoded copy each, and pages of a set larger than
memory can be dropped and read again rather than swapped.

A cache is never trusted blindly: it stores the digest of the listing it was built from (every
file's path, class, size and modification time) and is used only if the listing read now is
identical; a file shorter than its header says (a partial copy) is rebuilt. A stale cache is
rebuilt and replaced, so one folder never accumulates old copies.

Layout: 8 bytes of magic, the header's length (8 bytes, little-endian), a JSON header (key digest,
replayed warnings, each array's dtype, shape and offset, the file's total size), then the arrays,
each at an offset aligned to ``_ALIGN`` bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from autodrop.errors import AutodropWarning

CACHE_ENV = "AUTODROP_CACHE_DIR"
FORMAT_VERSION = 3  # bump when what is stored, or how images are decoded, changes
SUFFIX = ".images"
_MAGIC = b"ADIMG\x00\x03\n"
_ALIGN = 4096  # a page: an array's first row starts a page of its own
_WRITE_ROWS_BYTES = 1 << 24  # rows gathered per write: a bounded buffer, never a copy of the whole set
_OFF = ("off", "none", "0", "false", "no")


@dataclass(frozen=True)
class Rows:
    """The rows ``index`` of ``source``: written to the cache a chunk at a time, so storing a split
    never holds a gathered copy of the whole set beside the decoded one."""

    source: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def chunks(self) -> Any:
        """Yield the rows in order, a bounded number at a time."""
        row_bytes = max(int(np.prod(self.source.shape[1:], dtype=np.int64)) * self.source.itemsize, 1)
        step = max(1, _WRITE_ROWS_BYTES // row_bytes)
        for start in range(0, len(self.index), step):
            yield self.source[self.index[start : start + step]]

    def gather(self) -> np.ndarray:
        return self.source[self.index]


Stored = Union[np.ndarray, Rows]


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
    build: Callable[[], Mapping[str, Stored]],
) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays for these files, memory-mapped from the cache when it matches them exactly.

    ``settings`` (image size, channels, ...) and the files' listing form the key. Warnings of
    type AutodropWarning raised while building (skipped files) are stored and shown again on
    every cached load, so a cached search says the same things as the first. A freshly built
    set is written to the cache and then read back mapped, so the first search shares its pages
    with its workers just as later ones do; without a cache the arrays stay in memory.
    """
    folder = cache_dir()
    if folder is None:
        return _in_memory(build())
    key = {"version": FORMAT_VERSION, "root": str(root.resolve()), "settings": settings, "files": listing(groups)}
    slot = hashlib.sha256(
        json.dumps([key["version"], key["root"], settings], sort_keys=True).encode()
    ).hexdigest()[:32]
    path = folder / f"{slot}{SUFFIX}"
    # The listing of a large folder is megabytes of text; its digest is what is stored and compared.
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    cached = _read(path, digest)
    if cached is not None:
        arrays, messages = cached
        for message in messages:
            warnings.warn(message, AutodropWarning, stacklevel=2)
        return arrays
    failure: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutodropWarning)
        try:
            built = build()
        except BaseException as e:  # the warnings are shown first: they may say why it failed
            failure = e
    messages = []
    for w in caught:
        if issubclass(w.category, AutodropWarning):
            messages.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if failure is not None:
        raise failure
    if _write(path, digest, messages, built):
        del built  # the decoded copy goes; the mapped file takes its place
        reread = _read(path, digest)
        if reread is not None:
            return reread[0]
        raise OSError(f"the decoded-image cache {str(path)!r} just written cannot be read back")  # pragma: no cover
    return _in_memory(built)


def _in_memory(arrays: Mapping[str, Stored]) -> dict[str, np.ndarray]:
    return {name: a.gather() if isinstance(a, Rows) else a for name, a in arrays.items()}


def _read(path: Path, digest: str) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """Return the arrays (mapped, copy-on-write) and warnings stored at ``path`` if it was built from
    the key whose digest is ``digest`` and is whole, else None."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None  # another format or version, or not a cache at all: rebuild
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length < 1 << 30:
                return None
            header = json.loads(f.read(length).decode())
            size = os.fstat(f.fileno()).st_size
        if header["key"] != digest:
            return None  # stale: some file was added, removed, changed or touched
        if size != header["size"]:
            return None  # cut short (a partial copy) or grown: not what was written
        arrays = {}
        for name, spec in header["arrays"].items():
            shape, dtype, offset = tuple(spec["shape"]), np.dtype(spec["dtype"]), spec["offset"]
            if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > size:
                return None
            if 0 in shape:
                arrays[name] = np.empty(shape, dtype)  # numpy cannot map zero bytes
            else:
                # "c": pages are shared with every other reader until written to, and a write (none is
                # made) would stay private to this process rather than change the cache.
                arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
        messages = [str(m) for m in header["warnings"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None  # unreadable or malformed: rebuild
    return arrays, messages


def _layout(digest: str, messages: list[str], arrays: Mapping[str, Stored]) -> tuple[bytes, dict[str, int], int]:
    """Return the header bytes (magic and length included), each array's offset and the file's size."""
    specs: dict[str, dict[str, Any]] = {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()}
    header: dict[str, Any] = {"key": digest, "warnings": messages, "arrays": specs, "size": 0}
    # Offsets depend on the header's length, which depends on the offsets' digits: reserve room for
    # them (and the size) by laying out twice, with the first pass's figures as the widest ones.
    offsets: dict[str, int] = {}
    for _ in range(2):
        text = json.dumps(header).encode()
        position = _aligned(len(_MAGIC) + 8 + len(text) + 64)
        for name, a in arrays.items():
            offsets[name] = position
            specs[name]["offset"] = position
            position = _aligned(position + int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize)
        header["size"] = position
    text = json.dumps(header).encode()
    assert len(_MAGIC) + 8 + len(text) <= min(offsets.values(), default=_ALIGN)
    return _MAGIC + len(text).to_bytes(8, "little") + text, offsets, header["size"]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _write(path: Path, digest: str, messages: list[str], arrays: Mapping[str, Stored]) -> bool:
    """Store the arrays atomically (a reader sees the old file or the complete new one); return
    whether it was written."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            header, offsets, size = _layout(digest, messages, arrays)
            f.write(header)
            for name, a in arrays.items():
                f.seek(offsets[name])
                for chunk in (a.chunks() if isinstance(a, Rows) else (a,)):
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            f.truncate(size)  # the padding after the last array
        os.replace(tmp, path)
        return True
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
        return False

