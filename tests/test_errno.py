"""Errors keep their meaning: a full disk is ENOSPC, a long name ENAMETOOLONG, through a
real FUSE mount of a volume; and the FUSE server (which /dev/fuse and virtio-fs share)
maps what the filesystem raises the same way for both transports."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from conftest import new_volume_mounted, small_tmpfs

from cubefs.fuse import protocol as p
from cubefs.fuse.server import FuseServer


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a filesystem that fills."""
    yield from small_tmpfs(tmp_path / "small", "24m")


@pytest.fixture
def volume(tmp_path: Path, small_fs: Path) -> Iterator[Path]:
    """An empty volume whose directory is on the small filesystem, mounted."""
    with new_volume_mounted(small_fs / "volumes", tmp_path / "mnt", tmp_path / "cache") as mnt:
        yield mnt


def _fill(path: Path) -> OSError:
    """Write to ``path`` until the volume is full; the error that stopped it, from
    write, fsync or close, whichever saw it first."""
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(64):  # 64 MiB into 24: it must stop
            os.write(fd, block)
        os.fsync(fd)
    except OSError as err:
        return err
    finally:
        try:
            os.close(fd)
        except OSError as err:
            return err
    raise AssertionError("64 MiB fitted on a 24 MiB filesystem")


def test_a_full_volume_is_enospc_and_works_again_after_rm(volume: Path) -> None:
    err = _fill(volume / "big")
    assert err.errno == errno.ENOSPC, err
    # What was written before stays readable, the mount is alive, and the space comes back.
    assert os.path.getsize(volume / "big") > 8 << 20
    (volume / "big").unlink()
    (volume / "small").write_bytes(b"x" * 4096)
    assert (volume / "small").read_bytes() == b"x" * 4096
    with open(volume / "synced", "wb") as f:
        f.write(b"y" * 1000)
        f.flush()
        os.fsync(f.fileno())


def test_a_name_of_256_bytes_is_enametoolong(volume: Path) -> None:
    long = "n" * 256
    for attempt in (lambda: open(volume / long, "w"), lambda: os.mkdir(volume / long),
                    lambda: os.stat(volume / long), lambda: os.symlink("t", volume / long)):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.ENAMETOOLONG, info.value
    (volume / ("n" * 255)).write_text("fits")  # the longest name a local filesystem takes
    assert (volume / ("n" * 255)).read_text() == "fits"


# -- the FUSE server itself: what virtio-fs sends through it too --------------------------------


class _FailingFs:
    """A writable filesystem whose writes raise ``error``: the fault to inject."""

    writable = True

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def write_now(self, ino: int, offset: int, data: bytes, killer: int | None = None, stamp: bool = True) -> int:
        raise self.error

    def fsync(self, ino: int) -> None:
        raise self.error


def _request(server: FuseServer, opcode: int, body: bytes) -> int:
    """Send one request; the errno of the reply (0: success)."""
    header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, 7, 5, 0, 0, 0, 0, 0)
    reply = server.handle(header + body)
    assert isinstance(reply, bytes)
    return -int.from_bytes(reply[4:8], "little", signed=True)


@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
    (OSError(errno.EMFILE, "Too many open files"), errno.EMFILE),
    (lmdb.MapFullError("mdb_put", -30792), errno.ENOSPC),  # MDB_MAP_FULL: the volume index is full
    (lmdb.DiskError("mdb_txn_commit", errno.ENOSPC), errno.ENOSPC),
    (MemoryError(), errno.ENOMEM),
    (OSError(errno.ENOENT, "a data file went missing"), errno.EIO),  # integrity, not the caller's ENOENT
    (RuntimeError("a bug"), errno.EIO),
])
def test_the_server_keeps_errnos_for_both_transports(error: BaseException, expected: int,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    server = FuseServer(_FailingFs(error))
    server.minor = 31  # past INIT
    assert _request(server, p.WRITE, bytes(p.WRITE_IN.size) + b"data") == expected
    assert _request(server, p.FSYNC, bytes(16)) == expected
    if expected == errno.EIO:
        assert "answering EIO" in caplog.text  # the unexpected keeps its traceback in the log
    else:
        assert caplog.text.count("answering") == 1  # said once, not once per request
