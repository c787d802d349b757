"""An image's start-up chunks in one plain file on the node, in the order a start reads them.

A remount of an image the node holds (disk cache kept, daemon restarted, the kernel's
caches dropped: issue 18, "on the node") prefetches the image's trace from the disk cache.
From LMDB that is one B-tree walk and a few page faults per chunk, scattered over the
environment, each fault taken under the GIL (py-lmdb's ``get``), then a zstd decode per
chunk: ``import numpy``'s 601 start-up chunks are 17.7 MB of zstd to read and 56 ms of one
core to decode into 38.9 MB, against the tree's whole run of ~160 ms, on two cores shared
with the program.  Here the same chunks lie one after another in one file per image,
``<cache dir>/hot/<image digest>``, in the trace's order, as plaintext: as the mount goes
live the kernel is asked to read it all ahead (``POSIX_FADV_WILLNEED``: one system call;
this disk reads a cold file sequentially at 0.8-2 GB/s) and each READ takes its chunks from
the kernel's pages of it (:meth:`HotFile.get_now`: ``preadv2`` with ``RWF_NOWAIT`` on the
event loop, nothing to decode), or, while those pages are still on their way, with a
blocking read in a thread (:meth:`HotFile.get_many`).  Measured (docs/benchmarks.md): the
228 READs of ``import numpy`` after a remount waited 300 ms in all in the daemon with LMDB,
110 with this file compressed.  (Session 12: the chunks are no longer prefetched into the
memory tier from here.  That prefetch, 601 chunks read, checked and handed back to the event
loop by worker threads, cost the daemon ~50 ms of CPU during the program's run, and its
threads' GIL the event loop's requests; measured alternated, numpy's daemon CPU from ready to
the run's end 163 -> 123 ms, the remount in process + run 1.50 -> 1.27x the tree, load ~4.)

Trust is the disk cache's: every chunk written here is plaintext the daemon had verified
(the memory tier, or a disk-cache entry: xxh64 checked, its SHA-256 checked before it went
in) and carries the xxh64 of its bytes, checked at every read; a chunk that fails is
dropped from the file's index and taken from the disk cache; a file whose index does not
check out is removed.  The file is written beside its final name and renamed (a torn file
is never seen), 0600 in a 0700 directory, and holds only chunks of the image its name says.
Bounded: one start-up's worth per image, cut at MAX_FILE, and the directory at most a
quarter of the disk cache's size (the least recently used first out); ``cubefs cache
trim`` / ``clear`` include it.  Format: docs/format.md, "Start-up chunks of an image".
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

import xxhash

from cubefs.cache.files import writer_alive
from cubefs.cache.tiers import TierStats
from cubefs.format.packs import CODEC_RAW  # the chunks are kept as plaintext

log = logging.getLogger(__name__)

SUBDIR = "hot"
MAGIC = b"CUBEHOT1"
# magic, version, flags, chunk count, xxh64 of the index: the file's last bytes.  Version and
# flags were one u32 version (1) before CUT: an older file reads as version 1, not cut.
FOOTER = struct.Struct("<8sHHIQ")
VERSION = 1
CUT = 1  # flag: the write stopped at MAX_FILE or the size limit, the start-up's first chunks kept
NEW_SHARE = 0.05  # a start-up with more of its chunks missing from the file writes it again
INDEX = struct.Struct("<32sB3xIIQ")  # digest, codec, plain length, stored length, xxh64 of the stored bytes
TMP_PREFIX = ".tmp-"
MAX_FILE = 256 << 20  # bytes of chunks in one file (a start-up's first ones kept): a trace's bound
RUN_CHUNKS = 256  # chunks read by one preadv (see HotFile.get_many)...
RUN_BYTES = 16 << 20  # ...and bytes
SHARE = 4  # the hot files take at most 1/SHARE of the disk cache's size, on top of it


def hot_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, SUBDIR)


def hot_path(cache_dir: str, image_digest: str) -> str:
    return os.path.join(hot_dir(cache_dir), image_digest)


class HotFile:
    """One image's start-up chunks, opened for reading.  Thread-safe: reads are ``preadv`` at
    offsets of one descriptor; :meth:`get_now` never waits on the disk (``RWF_NOWAIT``), so the
    event loop calls it."""

    def __init__(self, path: str, fd: int, index: dict[bytes, tuple[int, int, int, int, int]],
                 order: list[bytes], size: int, cut: bool = False) -> None:
        self.path = path
        self._fd: int | None = fd
        self._index = index  # digest -> (offset, stored length, codec, plain length, xxh64)
        self.order = order  # the digests as the file holds them (the trace's order)
        self.size = size
        self.cut = cut  # written short of its start-up (MAX_FILE, the size limit): its first chunks only
        self.stats = TierStats()
        self.nowait = hasattr(os, "RWF_NOWAIT")  # get_now: off once the kernel refuses it
        self._lock = threading.Lock()

    @classmethod
    def open(cls, cache_dir: str, image_digest: str) -> HotFile | None:
        """The image's hot file, checked (footer, index, size), or None: none kept, or one
        that does not check out (then removed, and logged).
        A hot file is only an optimisation: no failure here reaches the mount."""
        path = hot_path(cache_dir, image_digest)
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
            except PermissionError:  # O_NOATIME: only the owner may ask it
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("hot file %s: cannot open it (%s); the disk cache serves", path, err)
            return None
        try:
            index, order, size, cut = _read_index(fd)
        except (OSError, ValueError) as err:
            os.close(fd)
            log.warning("hot file %s is damaged (%s); removing it, the disk cache serves", path, err)
            _unlink(path)
            return None
        hot = cls(path, fd, index, order, size, cut)
        hot.nowait = hot.nowait and _nowait_works(fd, size)
        return hot

    def advise(self) -> None:
        """Ask the kernel to read the whole file ahead, now, in the background."""
        fd = self._fd
        if fd is not None:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get_many(self, digests: list[bytes]) -> dict[bytes, tuple[int, int, bytes | bytearray]]:
        """(codec, plain length, bytes) of those of ``digests`` the file holds and that check
        out; a chunk that does not is dropped from the index (the caller takes it from the disk
        cache).  Hits are the caller's to count (the chunk source, once a chunk decoded: the
        keeper's own reads serve no mount).  One ``preadv`` per run of neighbouring chunks, in
        file order, each chunk into a buffer of its own: the bytes land once, in the object the
        memory tier keeps (one read of a run, sliced, copied every byte twice: 39 MB for numpy),
        the kernel's read-ahead sees a sequential reader, and the thread lets go of the GIL
        once per run, not once per chunk: each time it takes it back while the event loop is
        busy serving requests it may wait out the interpreter's switch interval."""
        out: dict[bytes, tuple[int, int, bytes | bytearray]] = {}
        bad: list[bytes] = []
        # Each entry looked up once: another thread (a reader's, the keeper's) may drop one
        # that does not check out between a test and an index.
        found = sorted(((e, d) for d in digests if (e := self._index.get(d)) is not None), key=lambda it: it[0][0])
        for run in _runs(found):
            try:
                datas = self._preadv(run[0][0][0], [e[1] for e, _d in run])
            except OSError as err:
                log.warning("hot file %s: read failed (%s); the disk cache serves", self.path, err)
                bad += [d for _e, d in run]
                continue
            for ((_off, _length, codec, plain_len, check), d), data in zip(run, datas):
                if xxhash.xxh64_intdigest(data) != check:
                    bad.append(d)
                    continue
                out[d] = (codec, plain_len, data)
        if bad:
            log.warning("hot file %s: %d chunks do not check out; the disk cache serves them", self.path, len(bad))
            self.drop(bad)
        return out

    def get_now(self, digests: list[bytes]) -> list[bytearray] | None:
        """The bytes of every one of ``digests``, in that order, if the file holds them all and
        the kernel has them in its page cache (``preadv2`` with ``RWF_NOWAIT``: never a wait on
        the disk, so the event loop may call it); else None, and the caller takes the slow path
        (a thread, :meth:`get_many`).  Each chunk checked as :meth:`get_many` does.  A remount
        reads its start-up this way: the ``WILLNEED`` at open has the kernel read the file
        ahead, and a READ is answered from those pages, nothing else done for it (no thread
        hop, no copy kept in the memory tier, no prefetch task beside the program)."""
        fd = self._fd
        if fd is None or not self.nowait:
            return None
        entries = []
        for d in digests:
            e = self._index.get(d)
            if e is None:
                return None
            entries.append((e, d))
        out: dict[bytes, bytearray] = {}
        for run in _runs(sorted(entries, key=lambda it: it[0][0])):
            try:
                bufs = self._preadv(run[0][0][0], [e[1] for e, _d in run], os.RWF_NOWAIT)
            except BlockingIOError:  # not all in the page cache yet
                return None
            except OSError as err:  # RWF_NOWAIT refused (EOPNOTSUPP), part of it cached, closed
                if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.nowait = False
                return None
            for (e, d), data in zip(run, bufs):
                if xxhash.xxh64_intdigest(data) != e[4] or e[2] != CODEC_RAW:
                    return None  # the slow path checks it again, and drops it
                out[d] = data
        self.stats.hits += len(out)
        self.stats.bytes += sum(len(b) for b in out.values())
        return [out[d] for d in digests]

    def drop(self, digests: list[bytes]) -> None:
        """Forget chunks that turned out bad (their bytes, or their plaintext's length): the
        disk cache serves them, and the next mount's keeper writes the file again."""
        with self._lock:
            for d in digests:
                self._index.pop(d, None)
        self.stats.errors += len(digests)

    def _preadv(self, offset: int, lengths: list[int], flags: int = 0) -> list[bytearray]:
        """The chunks of ``lengths`` bytes that lie one after another from ``offset``.  A short
        read is an error: at the file's end (it was cut), or with ``RWF_NOWAIT`` where only part
        of the range is in the page cache."""
        fd = self._fd
        if fd is None:
            raise OSError("closed")
        bufs = [bytearray(n) for n in lengths]
        total = sum(lengths)
        got = os.preadv(fd, bufs, offset, flags) if flags else os.preadv(fd, bufs, offset)
        if got != total:
            raise OSError(f"short read: {got} of {total} bytes at {offset}")
        return bufs

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def as_dict(self) -> dict[str, float]:
        return {**self.stats.as_dict(), "chunks": len(self._index), "file_bytes": self.size}


Entry = tuple[int, int, int, int, int]  # offset, stored length, codec, plain length, xxh64


def _runs(found: list[tuple[Entry, bytes]]) -> Iterator[list[tuple[Entry, bytes]]]:
    """``found`` (index entries and digests, in file order) in runs of chunks that lie one after
    another in the file, each at most RUN_CHUNKS chunks (IOV_MAX is 1024) and RUN_BYTES."""
    run: list[tuple[Entry, bytes]] = []
    end = size = 0
    for item in found:
        off, length = item[0][0], item[0][1]
        if run and (off != end or len(run) >= RUN_CHUNKS or size + length > RUN_BYTES):
            yield run
            run, size = [], 0
        run.append(item)
        end, size = off + length, size + length
    if run:
        yield run


def _nowait_works(fd: int, size: int) -> bool:
    """Whether this kernel and filesystem take ``RWF_NOWAIT`` on a buffered read of the file (a
    byte of its footer, just read: cached); without it :meth:`HotFile.get_now` never serves, and
    the mount prefetches the file's chunks into memory as before."""
    try:
        os.preadv(fd, [bytearray(1)], size - 1, os.RWF_NOWAIT)
    except BlockingIOError:  # takes the flag (the page went already)
        return True
    except OSError as err:  # EOPNOTSUPP, EINVAL: refused; anything else is said, and read the slow way
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            log.warning("hot file: a probe read failed (%s): its chunks are read the slow way", err)
        return False
    return True


def _read_index(fd: int) -> tuple[dict[bytes, tuple[int, int, int, int, int]], list[bytes], int, bool]:
    size = os.fstat(fd).st_size
    if size < FOOTER.size:
        raise ValueError("shorter than its footer")
    magic, version, flags, count, check = FOOTER.unpack(os.pread(fd, FOOTER.size, size - FOOTER.size))
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a version {VERSION} hot file")
    start = size - FOOTER.size - count * INDEX.size
    if start < 0:
        raise ValueError("shorter than its index")
    raw = os.pread(fd, count * INDEX.size, start)
    if len(raw) != count * INDEX.size or xxhash.xxh64_intdigest(raw) != check:
        raise ValueError("its index does not check out")
    index: dict[bytes, tuple[int, int, int, int, int]] = {}
    order: list[bytes] = []
    pos = 0
    for digest, codec, plain_len, length, sum_ in INDEX.iter_unpack(raw):
        if digest in index:
            raise ValueError(f"chunk {digest.hex()[:16]} twice")
        index[digest] = (pos, length, codec, plain_len, sum_)
        order.append(digest)
        pos += length
    if pos != start:
        raise ValueError(f"{start} bytes of chunks where its index says {pos}")
    return index, order, size, bool(flags & CUT)


def write_hot(cache_dir: str, image_digest: str, batches: Iterable[list[tuple[bytes, bytes]]], max_bytes: int) -> int:
    """Write the image's hot file from the (digest, plaintext) pairs ``batches`` yield, in
    order, in place of any older one, cut at ``max_bytes`` (and MAX_FILE); then evict other
    images' hot files beyond ``max_bytes`` in all.  Written a batch at a time (a start-up's
    chunks are tens of MiB), the index last.  Returns the bytes written (0: no chunks)."""
    limit = min(MAX_FILE, max_bytes)
    directory = hot_dir(cache_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    path = hot_path(cache_dir, image_digest)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{image_digest}.{os.getpid()}")
    entries: list[bytes] = []
    pos = 0
    cut = False
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb",
                  buffering=1 << 20) as f:
            for batch in batches:
                for digest, data in batch:
                    if pos + len(data) > limit:
                        cut = True
                        break
                    entries.append(INDEX.pack(digest, CODEC_RAW, len(data), len(data), xxhash.xxh64_intdigest(data)))
                    f.write(data)
                    pos += len(data)
                else:
                    continue
                break
            index = b"".join(entries)
            f.write(index)
            f.write(FOOTER.pack(MAGIC, VERSION, CUT if cut else 0, len(entries), xxhash.xxh64_intdigest(index)))
        if not entries:
            _unlink(tmp)
            return 0
        os.rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    trim_hot(cache_dir, max_bytes, keep=path)
    return pos + len(index) + FOOTER.size


def keep_hot(cache_dir: str, image_digest: str, digests: list[bytes],
             plain_of: Callable[[list[bytes]], dict[bytes, bytes]], current: HotFile | None, max_bytes: int) -> int:
    """Make the image's hot file hold ``digests`` (a start-up's chunks, in its order), as
    plaintext, unless it already does: the same order, and at most NEW_SHARE of what it could
    hold missing.  What it could hold: a file that was cut (MAX_FILE, the size limit) only the
    start-up up to its last chunk; and only chunks ``plain_of`` gives (a delta, a chunk the
    disk cache evicted, are left out of every write: counted as missing they made every
    remount of such an image write its file again).  ``plain_of`` gives the plaintext of those
    the node has (verified: the memory tier, the disk cache decoded).  Blocking (reads and a
    write): run it in a thread.  Returns the bytes written."""
    if current is not None and not current.stats.errors and _holds(current, digests, plain_of):
        return 0

    def batches() -> Iterator[list[tuple[bytes, bytes]]]:
        for i in range(0, len(digests), 64):
            part = digests[i : i + 64]
            old = current.get_many(part) if current is not None else {}
            got = {d: v[2] for d, v in old.items() if v[0] == CODEC_RAW}
            got.update(plain_of([d for d in part if d not in got]))
            yield [(d, got[d]) for d in part if d in got]

    return write_hot(cache_dir, image_digest, batches(), max_bytes)


def _holds(current: HotFile, digests: list[bytes], plain_of: Callable[[list[bytes]], dict[bytes, bytes]]) -> bool:
    """Whether ``current`` holds the start-up ``digests`` as well as a new write could."""
    scope = digests
    if current.cut and current.order:
        try:
            scope = digests[: digests.index(current.order[-1]) + 1]
        except ValueError:
            return False
    inside = [d for d in scope if d in current]
    if inside != current.order:
        return False
    missing = [d for d in scope if d not in current]
    allowed = NEW_SHARE * len(scope)
    if len(missing) <= allowed:
        return True
    # Of those missing, only the ones the node could give would be written: counted a batch
    # at a time (their plaintext not kept), stopping once too many are.
    could = 0
    for i in range(0, len(missing), 64):
        could += len(plain_of(missing[i : i + 64]))
        if could > allowed:
            return False
    return True


def trim_hot(cache_dir: str, target: int, keep: str | None = None) -> int:
    """Remove hot files, least recently used first (a mount's use touches its mtime), until
    the directory holds at most ``target`` bytes; and temporaries whose writer is dead.
    Returns the bytes freed."""
    directory = hot_dir(cache_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    freed = 0
    files: list[tuple[float, int, str]] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if name.startswith(TMP_PREFIX):
            if not writer_alive(name.rpartition(".")[2]):
                freed += _unlink(path, st.st_blocks * 512)
            continue
        files.append((st.st_mtime, st.st_blocks * 512, path))
    used = sum(b for _t, b, _p in files)
    for _mtime, blocks, path in sorted(files):
        if used <= target:
            break
        if path == keep:
            continue
        freed += _unlink(path, blocks)
        used -= blocks
    return freed


def clear_hot(cache_dir: str) -> int:
    """Remove every hot file; returns the bytes freed."""
    return trim_hot(cache_dir, 0)


def touch(path: str) -> None:
    """Note a use (eviction is least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _unlink(path: str, size: int = 0) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    except OSError as err:  # a directory in its place, a read-only disk: left, never fatal
        log.warning("hot file %s: cannot remove it (%s)", path, err)
        return 0
    return size
