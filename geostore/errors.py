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


class GeostoreWarning(UserWarning):
    """Something the user should know that changes no result's validity (the CLI prints it as one line):
    float64 weights rounded to float32, epochs whose weights are not finite."""


def describe_foreign(exc: BaseException) -> str:
    """One line for an error geostore did not raise itself: object-store access, file system, or a bug."""
    kind = type(exc).__name__
    module = type(exc).__module__
    text = " ".join(str(exc).split())
    if kind == "NoCredentialsError" or "Unable to locate credentials" in text:
        return ("no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE), or pass storage_options")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError"):
        return f"cannot reach the object store ({text})"
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")):
        return f"object store error: {kind}: {text}"
    if isinstance(exc, OSError):
        return text or kind
    return f"unexpected {kind}: {text} (set GEOSTORE_DEBUG=1 to see the traceback)"
