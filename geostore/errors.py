"""One error hierarchy for geostore; the CLI maps it to one-line messages and exit codes."""

from __future__ import annotations


class GeostoreError(Exception):
    """Base of every error geostore raises on purpose (bad input, refused operations)."""

    exit_code = 1


class SourceError(GeostoreError, ValueError):
    """A checkpoint source is missing, unreadable, unsafe or inconsistent."""

    exit_code = 2


class UnsafeCheckpointError(SourceError):
    """A checkpoint would execute code when loaded; it was rejected without running it."""


class StoreError(GeostoreError, ValueError):
    """A path is not a geostore store, or the store does not fit what was asked of it."""

    exit_code = 3


class ModelMismatchError(StoreError):
    """A store holds another model than the one being ingested into it."""
