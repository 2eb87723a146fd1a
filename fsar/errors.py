"""The one error family for expected failures.

Anything raised as an ``FsarError`` is the user's input or environment, not a bug: the CLI prints
its message as one line and exits 2. Every other exception is a bug and keeps its traceback.
Subclasses also derive from the builtin they used to be (``ValueError``, ``RuntimeError``) so that
callers catching those keep working.
"""

from __future__ import annotations


class FsarError(Exception):
    """An expected failure; ``str(err)`` names the problem and the fix in one line."""


class StoreError(FsarError, ValueError):
    """A path given as a feature store is not one, or cannot be read (damaged, truncated, newer)."""


class DatasetError(FsarError, ValueError):
    """A dataset folder or split list cannot be used as given; the message names the file."""


class ConfigError(FsarError, ValueError):
    """A configuration problem; the message names the key and how to fix it."""
