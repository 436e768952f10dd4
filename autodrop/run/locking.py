"""A named lock shared by every process that opens one storage, on this machine or others.

Optuna's RDB storage has no compare-and-set on "how many trials are running", and creating the
schema of a new database from several processes at once fails (``duplicate key ... pg_type`` on
PostgreSQL, ``table already exists`` on SQLite). Both need the same thing: a short critical section
that only one worker of a study is in at a time. The lock lives where the storage lives:

- PostgreSQL: a transaction-level advisory lock, released by the server if the holder dies.
- SQLite file: ``flock`` on the database's folder, released by the kernel if the holder dies.
- in-memory SQLite: a lock within this process (no other process can open that storage anyway).
- any other database: no lock; a warning says what that costs.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from autodrop.config import sqlite_file, storage_dialect
from autodrop.errors import AutodropWarning, StorageError
from autodrop.run.storage import safe_url

# Held by in-memory storages, and by SQLite files where flock is missing, across threads of this process.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class StorageLock:
    """A lock named ``name`` on the storage at ``url``; hold it with ``with lock.hold(): ...``.

    Not re-entrant. Each ``hold()`` takes the lock anew, so one object can serve a whole run.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.mechanism = _lock_mechanism(url)
        self._engine: Any = None
        if self.mechanism == "none":
            warnings.warn(
                f"autodrop has no cross-process lock for {storage_dialect(url)!r} storages: create the study before "
                "starting workers (--create-only), and expect up to one extra finished trial per worker "
                "beyond --trials. PostgreSQL and SQLite have no such limit.",
                AutodropWarning,
                stacklevel=2,
            )

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block; waits for any other holder first."""
        if self.mechanism == "postgresql":
            with self._postgres_lock():
                yield
        elif self.mechanism == "sqlite-file":
            path = sqlite_file(self.url)
            assert path is not None
            folder = path.absolute().parent
            if not folder.is_dir():
                yield  # opening the storage will fail next, with the message that says why
                return
            with _folder_lock(folder):
                yield
        elif self.mechanism == "process":
            with _process_lock(f"{self.url}#{self.name}"):
                yield
        else:
            yield

    @contextmanager
    def _postgres_lock(self) -> Iterator[None]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            # A connection per hold: nothing goes stale between trials, and the server drops the
            # lock with the connection if this process dies while holding it.
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        try:
            connection = self._engine.connect()
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"cannot open storage {safe_url(self.url)!r}: {reason}") from e
        with connection, connection.begin():
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(self.name)})
            yield


def _lock_mechanism(url: str) -> str:
    dialect = storage_dialect(url)
    if dialect == "postgresql":
        return "postgresql"
    if dialect == "sqlite":
        path = sqlite_file(url)
        if path is None:
            return "process"
        try:
            import fcntl  # noqa: F401
        except ImportError:  # pragma: no cover - Windows: threads of one process are still kept apart
            return "process"
        return "sqlite-file"
    return "none"


def _lock_key(name: str) -> int:
    """Return a stable signed 64-bit key for ``name`` (PostgreSQL advisory locks take a bigint)."""
    digest = hashlib.blake2b(f"autodrop:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    import fcntl

    # The database's folder, not a file: the database file itself must not be opened and closed
    # beside SQLite (closing any descriptor drops SQLite's own POSIX locks on it), and a lock file
    # would be left behind. flock belongs to the open descriptor, so two threads of one process
    # that each open the folder also wait for each other. The sections it guards last milliseconds,
    # so one lock for every database in the folder costs nothing.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


@contextmanager
def _process_lock(key: str) -> Iterator[None]:
    with _PROCESS_LOCKS_GUARD:
        lock = _PROCESS_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield
