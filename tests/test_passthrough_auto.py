"""Passthrough negotiated where an image is worth it, and the trace prefetch it spares (issue 18).

Measured (docs/benchmarks.md, cubefs/fuse/passthrough.py): passthrough made warm and on-the-node
starts of the four start-up images slower (every open an OPEN round trip) and a big file's
sequential read 1.7-2.6x faster; and a remount's trace prefetch read a copied file's chunks from
the disk cache for nobody, on the disk the kernel read the copy from.  These drive
:class:`Passthrough` as the FUSE server does, on an image's metadata and a real
:class:`FileStore` (no kernel: the negotiation and the prefetch's filter are decisions made
before any file is opened)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cubefs.cache.files import FileStore, content_key
from cubefs.format.image import F_MODE, F_SIZE
from cubefs.fuse import passthrough as pt
from cubefs.fuse import protocol as p

CHUNK = 1 << 20


class _Image:
    """The parts of cubefs.format.image.Image that Passthrough reads: records, extents, chunks."""

    def __init__(self, sizes: list[int]) -> None:
        self.inodes: list[list[Any]] = [[stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, 2, 0, [], b""]]  # the root
        self._extents: dict[int, tuple[list[int], list[int]]] = {}
        self._chunks: list[tuple[bytes, int]] = []
        for size in sizes:
            rec = [stat.S_IFREG | 0o644, 0, 0, 0, 0, 0, size, 1, 0, [], b""]
            self.inodes.append(rec)
            offs = list(range(0, size, CHUNK))
            idxs = []
            for off in offs:
                idxs.append(len(self._chunks))
                length = min(CHUNK, size - off)
                self._chunks.append((hashlib.sha256(f"{len(self.inodes)}:{off}".encode()).digest(), length))
            self._extents[len(self.inodes)] = (offs, idxs)

    def __len__(self) -> int:
        return len(self.inodes)

    def record(self, ino: int) -> list[Any]:
        return self.inodes[ino - 1]

    def extents(self, ino: int) -> tuple[list[int], list[int]]:
        return self._extents.get(ino, ([], []))

    def chunk(self, idx: int) -> tuple[bytes, int]:
        return self._chunks[idx]


def _passthrough(tmp_path: Path, sizes: list[int], auto: bool = False) -> pt.Passthrough:
    fs = SimpleNamespace(image=_Image(sizes), label="test:1")
    return pt.Passthrough(fs, FileStore(str(tmp_path / "cache"), 1 << 40), lambda: -1, auto=auto)


def _copy(t: pt.Passthrough, ino: int) -> None:
    """A copy of ``ino`` written and marked, as the daemon's writer does."""
    image = t.fs.image
    size = image.record(ino)[F_SIZE]
    offs, idxs = image.extents(ino)
    key = content_key(size, [(off, *image.chunk(i)) for off, i in zip(offs, idxs, strict=True)])
    fd, tmp = t.store.begin(key)
    os.pwrite(fd, b"x", 0)
    t.store.commit(key, fd, tmp, size)


def test_auto_negotiates_only_for_an_image_with_a_big_file(tmp_path: Path) -> None:
    small = _passthrough(tmp_path / "a", [5 << 20, 48 << 20, 100], auto=True)  # python3, apt's lists
    assert not small.negotiate(p.PASSTHROUGH)  # "no open" kept: warm opens cost no round trip
    assert small.state.startswith("off: auto: no file of 64 MiB")
    big = _passthrough(tmp_path / "b", [100, pt.AUTO_MIN_FILE], auto=True)  # model weights, a data set
    assert big.negotiate(p.PASSTHROUGH) and big.state == "passthrough"
    asked = _passthrough(tmp_path / "c", [100], auto=False)  # --passthrough: always, as before
    assert asked.negotiate(p.PASSTHROUGH)
    assert not big.negotiate(0)  # a kernel without it refuses it whatever the image
    assert big.state.startswith("off: the kernel offers no FUSE passthrough")


def test_auto_says_why_in_stats(tmp_path: Path) -> None:
    t = _passthrough(tmp_path, [1 << 20], auto=True)
    t.negotiate(p.PASSTHROUGH)
    assert t.stats()["state"] == "off: auto: no file of 64 MiB or more in the image"
    assert t.open(2) == 0  # answered in cached mode


def test_the_trace_prefetch_skips_files_with_a_copy(tmp_path: Path) -> None:
    # inodes 2..5: a copied 3 MiB file, an uncopied 2 MiB one, a small one, a copied 1.5 MiB one
    t = _passthrough(tmp_path, [3 << 20, 2 << 20, 4096, 3 << 19])
    image = t.fs.image
    _copy(t, 2)
    _copy(t, 5)
    every = set(range(len(image._chunks)))
    assert t.copied_chunks(every) == set()  # not negotiated (yet): the kernel reads no copy
    t.negotiate(p.PASSTHROUGH)
    want = set(image.extents(2)[1]) | set(image.extents(5)[1])
    assert t.copied_chunks(every) == want
    assert t.copied_chunks(image.extents(5)[1]) == set(image.extents(5)[1])  # of the trace only
    t.negotiate(0)  # refused: the kernel reads no copy, so every chunk is prefetched
    assert t.copied_chunks(every) == set()


def test_a_chunk_a_file_without_a_copy_shares_is_prefetched(tmp_path: Path) -> None:
    """Images are deduplicated: a copied file's chunk may be another big file's too, which the
    daemon serves (no copy yet): that chunk stays in the prefetch."""
    t = _passthrough(tmp_path, [2 << 20, 2 << 20])
    image = t.fs.image
    shared = image._extents[2][1][0]
    image._extents[3][1][0] = shared  # inode 3 starts with inode 2's first chunk
    _copy(t, 2)
    t.negotiate(p.PASSTHROUGH)
    assert t.copied_chunks(range(len(image._chunks))) == set(image.extents(2)[1]) - {shared}


def test_a_copy_changed_since_its_mark_is_prefetched(tmp_path: Path) -> None:
    t = _passthrough(tmp_path, [2 << 20])
    _copy(t, 2)
    t.negotiate(p.PASSTHROUGH)
    every = set(t.fs.image.extents(2)[1])
    assert t.copied_chunks(every) == every
    (copy,) = [c for c in (tmp_path / "cache" / "files").rglob("*") if c.is_file() and "." not in c.name]
    with open(copy, "r+b") as f:  # any write changes its ctime: the mark no longer holds
        f.write(b"y")
    assert t.copied_chunks(every) == set()


def test_the_big_file_question_is_answered_once_per_image(tmp_path: Path) -> None:
    """Asked at INIT, on a remount's path: a daemon prepared ahead (cubefs.node.spare) answers
    it while it waits, and the INIT finds the answer by the image's digest."""
    image = _Image([100, 2 << 20])
    image.digest = "ab" * 32  # type: ignore[attr-defined]
    pt._BIG.pop(image.digest, None)  # type: ignore[attr-defined]
    assert not pt.has_big_file(image)
    image.inodes[1][F_SIZE] = pt.AUTO_MIN_FILE  # an image never changes: the answer is kept
    assert not pt.has_big_file(image)
    other = _Image([100, pt.AUTO_MIN_FILE])  # no digest: asked each time
    assert pt.has_big_file(other)
    other.inodes[2][F_MODE] = stat.S_IFDIR | 0o755  # a directory that size is not a file
    assert not pt.has_big_file(other)
    sparse = _Image([100, 1 << 20])  # a sparse file (a big lastlog): its holes are not stored bytes
    sparse.inodes[2][F_SIZE] = pt.AUTO_MIN_FILE * 4
    assert not pt.has_big_file(sparse)


def test_an_auto_mount_that_declines_makes_no_copies_directory(tmp_path: Path) -> None:
    """for_mount makes the copies' store only once passthrough is negotiated: a mount of an
    image without a big file (most) touches nothing of it; one whose directory cannot be used
    is refused at INIT, and goes on in cached mode."""
    disk = SimpleNamespace(directory=str(tmp_path / "cache"), max_bytes=1 << 30, reserve=0.05)
    small = SimpleNamespace(image=_Image([100]), label="s:1", source=SimpleNamespace(disk=disk))
    t = pt.for_mount(small, lambda: -1, auto=True)
    assert t is not None and not t.negotiate(p.PASSTHROUGH)
    assert t.copied_chunks([0]) == set() and t.open(2) == 0
    assert not (tmp_path / "cache").exists()
    big = SimpleNamespace(image=_Image([pt.AUTO_MIN_FILE]), label="b:1", source=SimpleNamespace(disk=disk))
    t = pt.for_mount(big, lambda: -1, auto=True)
    assert t is not None and t.negotiate(p.PASSTHROUGH)
    assert (tmp_path / "cache" / "files").is_dir()
    (tmp_path / "blocked").write_bytes(b"")  # a file where the cache directory should be
    bad = SimpleNamespace(directory=str(tmp_path / "blocked"), max_bytes=1 << 30, reserve=0.05)
    t = pt.for_mount(SimpleNamespace(image=big.image, label="b:1", source=SimpleNamespace(disk=bad)), lambda: -1,
                     auto=True)
    assert t is not None and t.copied_chunks([0]) == set()  # before INIT: no error, nothing left out
    assert not t.negotiate(p.PASSTHROUGH)
    assert t.state.startswith("off: cannot use the cache's files/ directory")


def test_a_mount_request_from_older_code_keeps_its_meaning() -> None:
    """A request made before passthrough had a mode (a daemon replaced by ``serve --upgrade``,
    a restart) carries a bool: True was ``--passthrough`` (on), False not asking (the default,
    now auto); anything else is refused, never taken as "on"."""
    from cubefs.node.mount import passthrough_mode

    assert passthrough_mode(True) == "on" and passthrough_mode(False) == "auto" and passthrough_mode(None) == "auto"
    assert [passthrough_mode(m) for m in ("auto", "on", "off")] == ["auto", "on", "off"]
    with pytest.raises(ValueError):
        passthrough_mode("sometimes")


def test_copies_leave_the_cache_reserve_free(tmp_path: Path) -> None:
    """Copies are written by default where auto negotiates passthrough: like the disk cache they
    stop short of the free space --cache-reserve leaves the filesystem (ENOSPC, the file then
    read through the daemon), instead of filling it."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    tight = FileStore(str(tmp_path / "a"), 1 << 40, reserve=free)  # nothing above the reserve
    with pytest.raises(OSError) as err:
        tight.begin("ab" * 32, 1 << 20)
    assert err.value.errno == errno.ENOSPC
    fd, tmp = FileStore(str(tmp_path / "b"), 1 << 40, reserve=0.0001).begin("ab" * 32, 1 << 20)
    os.close(fd)
    assert os.path.exists(tmp)
