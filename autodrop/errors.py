"""The one family of exceptions autodrop raises for problems a user can fix."""

from __future__ import annotations


class AutodropError(Exception):
    """Base of every error a user can act on; the CLI prints it as one line and exits 2."""


class ConfigError(AutodropError):
    """A setting is out of range, unknown, or clashes with another."""


class DataError(AutodropError):
    """The images cannot be read or cannot be split as asked."""


class ModelError(AutodropError):
    """The model cannot be found, built, or has nothing to search."""


class StorageError(AutodropError):
    """The study's storage cannot be reached or does not hold what was asked for."""


class AutodropWarning(UserWarning):
    """Something was skipped or adjusted, and the user should know (a broken image, say)."""
