"""The error types every part of cubefs raises, and the exit codes they map to.

One hierarchy so that the CLI can turn any failure into a one-line message and
an exit code a script can act on, without knowing which layer raised it.
"""

from __future__ import annotations

# Exit codes (documented in README "Exit codes"); stable for scripts.
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure (a bug): the traceback goes to the log
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)
EXIT_NOT_FOUND = 3  # image, tag, object or mount does not exist
EXIT_BAD_INPUT = 4  # the source tree/tarball or stored data is malformed or hostile
EXIT_STORE = 5  # the object store is unreachable or failed after retries
EXIT_FORMAT = 6  # stored data has a format version this reader does not know


class CubefsError(Exception):
    """Base of all expected failures; ``str(err)`` is the one-line message."""

    exit_code = EXIT_ERROR


class UsageError(CubefsError):
    exit_code = EXIT_USAGE


class NotFoundError(CubefsError):
    exit_code = EXIT_NOT_FOUND


class BadInputError(CubefsError):
    """The input to a build is malformed or hostile (e.g. a ``../`` tar member)."""

    exit_code = EXIT_BAD_INPUT


class CorruptDataError(CubefsError):
    """Stored bytes failed an integrity check (digest mismatch, truncation)."""

    exit_code = EXIT_BAD_INPUT


class FormatVersionError(CubefsError):
    """Stored data declares a format or version this reader does not understand."""

    exit_code = EXIT_FORMAT


class StoreError(CubefsError):
    """The object store refused or failed a request in a way retries cannot fix."""

    exit_code = EXIT_STORE


class StoreUnavailableError(StoreError):
    """A transient failure (connection refused, timeout, 5xx): worth retrying."""


class ObjectNotFoundError(NotFoundError):
    def __init__(self, store: str, key: str) -> None:
        super().__init__(f"object {key!r} not found in store {store}")
        self.store = store
        self.key = key
