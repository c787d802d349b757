"""A read-only mount in a private temporary directory, for commands that read a tree
(``cubefs commit`` reads a snapshot, ``cubefs export`` an image) through the same
daemon, caches and checks as any reader."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from cubefs.errors import CubefsError


@contextmanager
def private_mount(what: str, ref: str | None, *options: str) -> Iterator[str]:
    """``cubefs mount [REF] MOUNTPOINT *options`` on a fresh directory; yields the mountpoint."""
    mnt = tempfile.mkdtemp(prefix="cubefs-mnt-")
    try:
        _cubefs(what, "mount", *([ref] if ref else []), mnt, *options)
        try:
            yield mnt
        finally:
            _cubefs(what, "umount", mnt)
    finally:
        shutil.rmtree(mnt, ignore_errors=True)


def _cubefs(what: str, *args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise CubefsError(f"{what}: cubefs {args[0]} failed: {res.stderr.strip()}")
