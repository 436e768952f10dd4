"""Files the outputs write for the user: checked before any work, written with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from autodrop.errors import ConfigError


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """Return ``path`` as an absolute Path if a file can be written there, else raise ConfigError
    naming ``option`` (the command-line option that gave it)."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; give a file name.")
    parent = target.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r} cannot be written: folder {str(parent)!r} does not exist.")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{option} {str(path)!r} cannot be written: permission denied.")
    return target


def write_text(path: Path, text: str, option: str) -> None:
    """Write ``text`` to ``path``, or raise ConfigError naming ``option``."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{option} {str(path)!r} cannot be written: {e.strerror or e}.") from e
