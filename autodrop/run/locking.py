"""A named lock shared by every process that opens one storage, on this machine or others.

Optuna's RDB storage has no compare-and-set on "how many trials are running", and creating the
schema of a new database from several processes at once fails (``duplicate key ... pg_type`` on
PostgreSQL, ``table already exists`` on SQLite). Both need the same thing: a short critical section
that only one worker of a study is in at a time. The lock lives where the storage lives:

- PostgreSQL: a transaction-level advisory lock, released by the server if the holder dies.
- SQLite file: ``flock`` on the database's folder, released by the kernel if the holder dies; where
  the filesystem refuses that (NFS), a POSIX lock on a lock file in that folder; where it refuses
  both, a one-line error that says to use PostgreSQL.
- in-memory SQLite: a lock within this process (no other process can open that storage anyway).
- any other database: no lock; a warning says what that costs.
"""

from __future__ import annotations

import errno
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

LOCK_FILE_NAME = ".autodrop-lock"  # only where the folder cannot be flock-ed (NFS)
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
    refused: OSError | None = None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as e:  # NFS refuses flock on a folder opened read-only
            refused = e
        if refused is None:
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
            return
    finally:
        os.close(descriptor)
    with _lock_file(folder, refused):
        yield


@contextmanager
def _lock_file(folder: Path, refused: OSError) -> Iterator[None]:
    """Hold a POSIX lock on a lock file in ``folder``: what network filesystems that refuse flock
    on a folder still honour. The file (``.autodrop-lock``) stays behind."""
    import fcntl

    path = folder / LOCK_FILE_NAME
    # POSIX locks belong to the process, not the descriptor: threads of one process queue here.
    with _process_lock(str(path)):
        try:
            # O_NOFOLLOW: a symbolic link planted at the lock's path (by anyone who can write to the
            # study's folder) is refused, never followed to a file of the user's to create or lock.
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX)
            except OSError:
                os.close(descriptor)
                raise
        except OSError as e:
            if e.errno == errno.ELOOP or path.is_symlink():
                raise StorageError(
                    f"the lock file {str(path)!r} is a symbolic link, which autodrop does not follow; remove it "
                    "(autodrop makes a plain file there)."
                ) from e
            raise StorageError(
                f"cannot lock the SQLite study in {str(folder)!r}: its filesystem refuses file locks "
                f"({refused.strerror or refused}; {e.strerror or e}), as NFS often does. Put the study on a local "
                "disk, or use PostgreSQL (--storage postgresql+psycopg://...) to share it between machines."
            ) from e
        try:
            yield
        finally:
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_UN)
            finally:
                os.close(descriptor)


@contextmanager
def _process_lock(key: str) -> Iterator[None]:
    with _PROCESS_LOCKS_GUARD:
        lock = _PROCESS_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield
