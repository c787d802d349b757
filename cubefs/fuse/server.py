"""FUSE requests → :class:`cubefs.image.fs.ImageFS`, message in, message out.

Transport-independent: :mod:`cubefs.fuse.kernel` feeds it requests read from
``/dev/fuse``; a vhost-user-fs backend feeds it the same messages from a
virtio queue.  ``handle`` answers at once whenever it can (every metadata
operation, and reads the memory tier holds) and returns a coroutine only for
a read that must wait for chunks; the transport runs that as a task.

What makes a warm mount as fast as a local disk is asking the kernel to cache
everything, because an image never changes:

* OPEN and OPENDIR answer ``ENOSYS`` when the kernel supports "no open": it
  then never sends them again, keeps file pages across opens (keep_cache) and
  caches directory listings in the page cache (cache_dir);
* symlink targets are cached (``CACHE_SYMLINKS``), entries, negative entries
  and attributes for ``cache_timeout``; FLUSH answers ``ENOSYS`` once.

So a program re-run on a warm mount makes almost no FUSE requests at all.

A writable filesystem (a volume, :class:`cubefs.volume.fs.VolumeFS`)
gets the writing operations too, and keeps all of the above: the daemon is
its only writer, so every change the kernel caches passes through it, and a
rollback (the one change that does not) invalidates what the kernel was
told (:meth:`FuseServer.invalidations`).  Only packed attributes are not
cached here for it, since they change.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import lmdb
from cachetools import LRUCache

from cubefs.fuse import protocol as p
from cubefs.fuse.passthrough import FH_CACHED, FH_PASSTHROUGH
from cubefs.image.fs import FsError, StateError

log = logging.getLogger(__name__)

Reply = bytes | list[bytes | memoryview] | None  # a list goes out in one writev; None: no reply (FORGET)
Handler = Callable[[int, int, memoryview], "Reply | Coroutine[Any, Any, Reply]"]

# What we ask for at INIT, if the kernel offers it.
WANTED_FLAGS = (
    p.ASYNC_READ | p.BIG_WRITES | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO | p.PARALLEL_DIROPS | p.MAX_PAGES
    | p.CACHE_SYMLINKS
)
# And for a volume, which clears privileges itself (cubefs/volume/fs.py: _drop_privileges).
WANTED_WRITABLE = WANTED_FLAGS | p.HANDLE_KILLPRIV_V2
# A volume mounted with --writeback-cache: write(2) fills the page cache, and the kernel sends
# WRITEs of whole runs of pages later (design.md, "The FUSE volume path: round trips").
WRITEBACK_CACHE = 1 << 16
WRITE_CACHE = 1  # fuse_write_in.write_flags FUSE_WRITE_CACHE: pages written back from the page cache
MAX_PAGES = 256  # reads and writes of up to 1 MiB per request
MAX_WRITE = MAX_PAGES * 4096
REQUEST_BUFFER = MAX_PAGES * 4096 + 4096  # what a transport must be able to receive
MAX_READAHEAD = 4 * 1024 * 1024
NAME_MAX = 255
NO_ATTR = bytes(p.ATTR.size)  # a negative entry's attributes


# Errors the application can act on, passed through as they are (a full disk is
# not corruption: "cp" says "No space left on device", a database frees space or
# fails over, a build cleans up): everything else that is not an FsError stays
# EIO with a traceback in the log, since only a bug or a failing disk gets there.
PASSED_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG, errno.EMFILE, errno.ENFILE,
    errno.ENOMEM, errno.EIO,
})
_BY_REASON = {os.strerror(code): code for code in PASSED_ERRNOS}
QUIET_SECONDS = 60.0  # one log line per errno and this long: a full disk fails every write


def errno_of(err: BaseException) -> int | None:
    """The errno that says what ``err`` means to the application, or None (unexpected)."""
    if isinstance(err, FsError):
        return err.errno
    if isinstance(err, OSError) and err.errno in PASSED_ERRNOS:
        return err.errno
    if isinstance(err, (lmdb.MapFullError, lmdb.DiskError)):  # a full disk, or a volume index that reached its map
        return errno.ENOSPC
    if isinstance(err, (MemoryError, lmdb.MemoryError)):
        return errno.ENOMEM
    if isinstance(err, lmdb.Error):  # LMDB's own EDQUOT, EROFS...: the C binding keeps only the message
        code = getattr(err, "code", 0)
        return code if code in PASSED_ERRNOS else _BY_REASON.get(str(err).rsplit(": ", 1)[-1])
    return None


def _encode_rdev(rdev: int) -> int:
    """The kernel's 32-bit ``new_encode_dev`` of a device number."""
    if not rdev:  # every file but a device node: every attribute reply
        return 0
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


ATTRS_MAX = 65536  # inodes whose packed attributes a server keeps
_AHEAD: dict[str, LRUCache[int, bytes]] = {}  # image digest -> its packed attributes, built ahead


def _image_digest(fs: Any) -> str:
    image = getattr(fs, "image", None)
    return str(getattr(image, "digest", ""))


def attrs_ahead(fs: Any, step: float = 0.002) -> Iterator[int]:
    """Build the packed attributes of ``fs``'s inodes (an ImageFS) for the FuseServer this
    process makes next for the same image, ``step`` seconds of it at a time (yields the count
    so far): a daemon kept ready (cubefs.node.spare) steps through it while it waits for its
    request, so that its first LOOKUPs and READDIRPLUSes find them built, and a request that
    comes waits at most a step (a step of a fixed 128 inodes was ~1 ms on deb-python, 145 ms
    where files have thousands of chunks).  Measured on deb-python (8,348 inodes): a first
    READDIRPLUS of a large directory took 108-250 us alone against 42-50 us with them built,
    and 0.4-1.7 ms in a remounted run's daemon (the program on the other core).  What a
    server takes is what was built so far (at most ATTRS_MAX)."""
    digest = _image_digest(fs)
    if not digest or getattr(fs, "writable", False):
        return
    attrs: LRUCache[int, bytes] = LRUCache(maxsize=ATTRS_MAX)
    _AHEAD.clear()  # one image's, the next mount's
    _AHEAD[digest] = attrs
    until = time.monotonic() + step
    for ino in range(1, min(len(fs.image), ATTRS_MAX) + 1):
        try:
            attrs[ino] = _pack_attr(ino, fs.getattr(ino))
        except FsError:
            pass
        if time.monotonic() >= until:
            yield len(attrs)
            until = time.monotonic() + step
    yield len(attrs)


def _take_ahead(fs: Any) -> LRUCache[int, bytes] | None:
    """The attributes built ahead for ``fs``'s image, if any; those of another image (a spare
    whose tag moved serves the new one) are dropped, not kept for nothing."""
    attrs = _AHEAD.pop(_image_digest(fs), None)
    _AHEAD.clear()
    return attrs


class FuseServer:
    def __init__(self, fs: Any, cache_timeout: float = 3600.0) -> None:
        self.fs = fs  # an ImageFS, or a VolumeFS (writable)
        self.writable = bool(getattr(fs, "writable", False))
        self.caller = (0, 0)  # uid, gid of the request being handled
        self.timeout = int(cache_timeout)
        self.ops: Counter[str] = Counter()  # requests by operation, for stats and metrics
        self.read_bytes = 0
        self.minor = 0  # negotiated protocol minor; 0 until INIT
        self.no_open = False
        self.no_opendir = False
        self.kernel_flags = 0  # what the kernel offered at INIT (64 bits)
        self.destroyed = False
        self.passthrough: Any = None  # a cubefs.fuse.passthrough.Passthrough (kernel image mounts)
        self.uring = False  # a ring is ready: FUSE_OVER_IO_URING is asked for at INIT (kernel.KernelSession)
        self.uring_on = False  # INIT took the ring
        self._passthrough_on = False  # negotiated at this session's INIT
        # Answer CREATE with ENOSYS (a Linux kernel then sends MKNOD, and with "no open" keeps
        # no file handle, so a close sends no RELEASE): set by the /dev/fuse transport.  An
        # untar onto a volume makes one request a file fewer (RELEASE, 1,405 of 15,967 for
        # python3.11); nothing is lost, as a volume keeps nothing per open file (OPEN already
        # answers ENOSYS) and its writes and flushes reach it by inode (design.md, "The FUSE
        # volume path: round trips").
        self.mknod_creates = False
        # A volume answers a missing name or xattr without an exception (VolumeFS.find,
        # find_xattr): an untar's negative LOOKUP and two GETXATTRs a file.
        self._find: Callable[[int, bytes], int] | None = getattr(fs, "find", None)
        self._find_xattr: Callable[[int, bytes], bytes | None] | None = getattr(fs, "find_xattr", None)
        # An image never changes, so an inode's packed attributes are built once;
        # a READDIRPLUS would otherwise rebuild hundreds per request.  A daemon kept ready
        # built its image's ahead (attrs_ahead).
        self._attrs: LRUCache[int, bytes] = (None if self.writable else _take_ahead(fs)) or LRUCache(maxsize=ATTRS_MAX)
        self._said: dict[int, float] = {}  # errno -> when it was last logged (see QUIET_SECONDS)
        self._generations: dict[int, int] = {}  # inode -> generation, bumped by a rollback (writeback cache)
        self._handlers: dict[int, Handler] = {
            p.INIT: self._init,
            p.DESTROY: self._destroy,
            p.LOOKUP: self._lookup,
            p.GETATTR: self._getattr,
            p.READLINK: self._readlink,
            p.OPEN: self._open,
            p.OPENDIR: self._opendir,
            p.READ: self._read,
            p.READDIR: self._readdir,
            p.READDIRPLUS: self._readdirplus,
            p.RELEASE: self._release,
            p.IOCTL: self._ioctl,
            p.RELEASEDIR: self._ok,
            p.STATFS: self._statfs,
            p.GETXATTR: self._getxattr,
            p.LISTXATTR: self._listxattr,
            p.ACCESS: self._access,
            p.LSEEK: self._lseek,
        }
        if self.writable:
            self._handlers.update({
                p.SETATTR: self._setattr,
                p.SYMLINK: self._symlink,
                p.MKNOD: self._mknod,
                p.MKDIR: self._mkdir,
                p.UNLINK: self._unlink,
                p.RMDIR: self._rmdir,
                p.RENAME: self._rename,
                p.RENAME2: self._rename2,
                p.LINK: self._link,
                p.CREATE: self._create,
                p.WRITE: self._write,
                p.FSYNC: self._fsync,
                p.FSYNCDIR: self._fsync,
                p.SETXATTR: self._setxattr,
                p.REMOVEXATTR: self._removexattr,
                p.FALLOCATE: self._fallocate,
            })

    def handle(self, request: bytes | memoryview) -> Reply | Coroutine[Any, Any, Reply]:
        """The reply to one request, or a coroutine that produces it.  ``request`` may be
        a view of the transport's buffer, valid only until this returns: a coroutine
        must copy whatever of it it keeps (a write's data; a 1 MiB copy per request
        was the biggest cost of a sequential write)."""
        _len, opcode, unique, nodeid, uid, gid, _pid, _ext, _pad = p.IN_HEADER.unpack_from(request)
        self.ops[p.OPCODE_NAMES.get(opcode) or str(opcode)] += 1
        if opcode in (p.FORGET, p.BATCH_FORGET):
            if self.writable:  # an image's inodes live as long as the mount; a volume's may be unlinked
                self._forget(opcode, nodeid, memoryview(request)[p.IN_HEADER.size :])
            return None
        self.caller = (uid, gid)
        handler = self._handlers.get(opcode)
        if handler is None or (not self.minor and opcode != p.INIT):
            # FLUSH and INTERRUPT among them: ENOSYS makes the kernel stop sending them.
            return p.error_reply(unique, errno.ENOSYS if self.minor or opcode == p.INIT else errno.EIO)
        try:
            out = handler(unique, nodeid, memoryview(request)[p.IN_HEADER.size :])
        except FsError as err:
            if unique & p.UNIQUE_RESEND and self.writable:
                return self._replayed(opcode, unique, nodeid, memoryview(request)[p.IN_HEADER.size :], err)
            return p.error_reply(unique, err.errno)
        except Exception as err:
            return p.error_reply(unique, self._failed(err, f"FUSE {p.OPCODE_NAMES.get(opcode)} of inode {nodeid}"))
        return out

    def _failed(self, err: Exception, what: str) -> int:
        """The errno to answer for ``err`` (not an FsError), logged: a traceback if it
        was unexpected (then EIO), one line a minute per errno if it was not."""
        code = errno_of(err)
        if code is None:
            log.exception("%s failed; answering EIO", what)
            return errno.EIO
        now = time.monotonic()
        if now - self._said.get(code, -QUIET_SECONDS) >= QUIET_SECONDS:
            self._said[code] = now
            log.warning("%s failed: %s; answering %s (said once a minute)", what, err, errno.errorcode[code])
        return code

    # -- replies ------------------------------------------------------------

    def _attr(self, ino: int) -> bytes:
        packed = None if self.writable else self._attrs.get(ino)
        if packed is None:
            packed = _pack_attr(ino, self.fs.getattr(ino))
            if not self.writable:
                self._attrs[ino] = packed
        return packed

    def _entry(self, ino: int) -> bytes:
        gen = self._generations.get(ino, 0) if self._generations else 0
        out = p.ENTRY_OUT.pack(ino, gen, self.timeout, self.timeout, 0, 0) + self._attr(ino)
        if self.writable:
            self.fs.remember(ino)  # the kernel now holds a reference until it FORGETs
        return out

    # -- operations ---------------------------------------------------------

    def _init(self, unique: int, _nodeid: int, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = p.INIT_IN.unpack_from(body)
        if major > p.KERNEL_MAJOR:  # the kernel retries INIT with our major
            return p.reply(unique, p.INIT_OUT.pack(p.KERNEL_MAJOR, p.MAX_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        if major < p.KERNEL_MAJOR or minor < p.MIN_MINOR:
            log.error("FUSE protocol %d.%d is too old (need %d.%d)", major, minor, p.KERNEL_MAJOR, p.MIN_MINOR)
            raise FsError(errno.EPROTO)
        self.minor = min(minor, p.MAX_MINOR)
        # flags2 follows flags in a 7.36+ kernel's INIT, whatever minor we answer
        self.kernel_flags = flags | (int.from_bytes(body[16:20], "little") << 32 if len(body) >= 20 else 0)
        self.no_open = bool(flags & p.NO_OPEN_SUPPORT)
        self.no_opendir = bool(flags & p.NO_OPENDIR_SUPPORT)
        wanted = WANTED_WRITABLE if self.writable else WANTED_FLAGS
        if self.writable and getattr(self.fs, "writeback_cache", False):  # cubefs mount --writeback-cache
            wanted |= WRITEBACK_CACHE
        flags2 = depth = 0
        self._passthrough_on = self.passthrough is not None and self.passthrough.negotiate(self.kernel_flags)
        if self._passthrough_on:  # OPEN is then answered: see cubefs.fuse.passthrough
            self.no_open = False
            wanted |= p.INIT_EXT
            flags2, depth = p.PASSTHROUGH >> 32, 1  # backing files on a plain local filesystem
        # FUSE over io_uring, if the transport set up a ring (cubefs.fuse.kernel) and the kernel offers it
        self.uring_on = bool(self.uring and self.kernel_flags & p.OVER_IO_URING)
        if self.uring_on:
            wanted |= p.INIT_EXT
            flags2 |= p.OVER_IO_URING >> 32
        log.info("FUSE protocol 7.%d (kernel 7.%d), flags %#x%s", self.minor, minor, flags & wanted,
                 ", passthrough" if self._passthrough_on else "")
        began = getattr(self.fs, "session_began", None)
        if began is not None:  # a new session: the kernel holds nothing of the filesystem yet
            began()
        # The kernel keeps the smaller of this and its device's read-ahead, which the
        # transport may have raised (see kernel.KernelSession): offer what we like.
        return p.reply(unique, p.INIT_OUT.pack(
            p.KERNEL_MAJOR, self.minor, max(max_readahead, MAX_READAHEAD), flags & wanted,
            64, 48, MAX_WRITE, 1, MAX_PAGES, 0, flags2, depth,
        ))

    def session(self) -> dict[str, Any]:
        """What INIT settled, for a daemon that replaces this one on the same session
        (it gets no INIT): see :meth:`resume` and kernel.KernelSession.adopt."""
        return {"minor": self.minor, "no_open": self.no_open, "no_opendir": self.no_opendir,
                "kernel_flags": self.kernel_flags}  # passthrough not resumed: see cubefs.fuse.passthrough

    def resume(self, state: dict[str, Any]) -> None:
        self.minor = int(state["minor"])
        self.no_open = bool(state["no_open"])
        self.no_opendir = bool(state["no_opendir"])
        self.kernel_flags = int(state.get("kernel_flags", 0))

    def export_state(self) -> dict[str, Any]:
        """Everything a daemon that takes over this session in another process needs (a VM
        saved with its root attached, restored elsewhere; vmm/vhost_user_fs.py): what INIT
        settled, and what the kernel holds of the filesystem (a volume's references).
        Nothing else here is per session: OPEN answers no file handle, and the attribute
        cache only saves work."""
        return {"session": self.session(), "fs": self.fs.export_refs()}

    def import_state(self, state: dict[str, Any]) -> int:
        """Take over the session ``state`` describes (instead of an INIT): StateError, with
        nothing changed, if it is malformed or for another filesystem.  Returns the number
        of kernel references taken over."""
        try:
            session, refs = state["session"], state["fs"]
            minor = session["minor"]
            checked = {"minor": minor, "no_open": bool(session["no_open"]),
                       "no_opendir": bool(session["no_opendir"]), "kernel_flags": int(session["kernel_flags"])}
            if not isinstance(refs, dict) or not isinstance(minor, int) or not (
                    minor == 0 or p.MIN_MINOR <= minor <= p.MAX_MINOR):
                raise ValueError(minor)
        except (KeyError, TypeError, ValueError):
            raise StateError("malformed FUSE session in the saved state") from None
        taken = int(self.fs.import_refs(refs))  # checks everything before it changes anything
        self.resume(checked)
        self.destroyed = False
        return taken

    def _destroy(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        """The kernel unmounted.  /dev/fuse ends here; a VM's root over virtio-fs may be
        mounted again (after a rollback, a restore), which begins with a new INIT."""
        self.destroyed = True
        self.minor = 0
        ended = getattr(self.fs, "session_ended", None)
        if ended is not None:
            ended()
        return p.reply(unique)

    def _ok(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        return p.reply(unique)

    def _lookup(self, unique: int, parent: int, body: memoryview) -> bytes:
        name = p.cstring(body)
        if len(name) > NAME_MAX:  # as a local filesystem answers (the kernel lets FUSE names reach 1024)
            raise FsError(errno.ENAMETOOLONG)
        if self._find is not None:
            child = self._find(parent, name)
            return p.reply(unique, self._entry(child) if child else self._negative_entry())
        try:
            return p.reply(unique, self._entry(self.fs.lookup_ino(parent, name)))
        except FsError as err:
            if err.errno != errno.ENOENT:
                raise
            return p.reply(unique, self._negative_entry())

    def _negative_entry(self) -> bytes:
        """A negative entry (nodeid 0) the kernel caches for the entry timeout: Python probes
        many paths that do not exist, and an untar looks up each name before creating it."""
        return p.ENTRY_OUT.pack(0, 0, self.timeout, 0, 0, 0) + NO_ATTR

    def _getattr(self, unique: int, ino: int, _body: memoryview) -> bytes:
        return p.reply(unique, p.ATTR_OUT.pack(self.timeout, 0, 0) + self._attr(ino))

    def _readlink(self, unique: int, ino: int, _body: memoryview) -> bytes:
        return p.reply(unique, self.fs.readlink(ino))

    def _open(self, unique: int, ino: int, body: memoryview) -> bytes:
        if self.no_open:
            return p.error_reply(unique, errno.ENOSYS)  # never again: see the module docstring
        flags, _ = p.OPEN_IN.unpack_from(body)
        self.fs.open(ino, flags)
        if self._passthrough_on:
            bid = self.passthrough.open(ino)
            if not isinstance(bid, int):
                return self._open_later(unique, bid)
            return self._open_reply(unique, bid)
        return p.reply(unique, p.OPEN_OUT.pack(0, p.FOPEN_KEEP_CACHE, 0))

    def _open_reply(self, unique: int, backing_id: int) -> bytes:
        """A passthrough open (the kernel refuses KEEP_CACHE beside it), or a cached one;
        the file handle says which, for RELEASE."""
        if backing_id > 0:
            return p.reply(unique, p.OPEN_OUT.pack(FH_PASSTHROUGH, p.FOPEN_PASSTHROUGH, backing_id))
        return p.reply(unique, p.OPEN_OUT.pack(FH_CACHED, p.FOPEN_KEEP_CACHE, 0))

    async def _open_later(self, unique: int, work: Coroutine[Any, Any, int]) -> Reply:
        try:
            return self._open_reply(unique, await work)
        except Exception as err:
            return p.error_reply(unique, self._failed(err, f"FUSE open {unique}"))

    def _release(self, unique: int, ino: int, body: memoryview) -> bytes:
        if self._passthrough_on:
            self.passthrough.release(ino, p.RELEASE_IN.unpack_from(body)[0])
        return p.reply(unique)

    def _ioctl(self, unique: int, _ino: int, _body: memoryview) -> bytes:
        """Python's open() asks every file isatty() (TCGETS).  The kernel forwards every
        ioctl on a FUSE file, passthrough or not, and remembers no answer (measured on
        6.18: ENOSYS each time), so this is answered here first thing, inline."""
        return p.error_reply(unique, errno.ENOTTY)

    def _opendir(self, unique: int, ino: int, _body: memoryview) -> bytes:
        if self.no_opendir:
            return p.error_reply(unique, errno.ENOSYS)
        self.fs.opendir(ino)
        return p.reply(unique, p.OPEN_OUT.pack(0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR, 0))

    def _read(self, unique: int, ino: int, body: memoryview) -> Reply | Coroutine[Any, Any, Reply]:
        # The inode comes from the header: with "no open" there is no file handle.
        _fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        parts = self.fs.read_now(ino, offset, size)
        if parts is None:
            return self._read_later(unique, ino, offset, size)
        if self._passthrough_on:
            self.passthrough.served(ino, offset, parts)
        return self._read_reply(unique, parts)

    def _read_reply(self, unique: int, parts: list[bytes | memoryview]) -> Reply:
        self.read_bytes += sum(len(x) for x in parts)
        return p.reply_parts(unique, parts)

    async def _read_later(self, unique: int, ino: int, offset: int, size: int) -> Reply:
        try:
            parts = await self.fs.read(ino, offset, size)
        except FsError as err:
            return p.error_reply(unique, err.errno)
        except Exception as err:
            return p.error_reply(unique, self._failed(err, f"FUSE read of inode {ino} [{offset}+{size}]"))
        if self._passthrough_on:
            self.passthrough.served(ino, offset, parts)
        return self._read_reply(unique, parts)

    def _listing(self, unique: int, ino: int, body: memoryview, plus: bool) -> bytes:
        """Offsets 1 and 2 are '.' and '..' (which the kernel never looks up from a
        READDIRPLUS, so they carry no entry and count no reference); entry i of the
        filesystem's listing is offset i + 3."""
        _fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        parts: list[bytes] = []
        used = 0
        dots = [(b".", ino, 1), (b"..", ino, 2)][offset:] if offset < 2 else []
        for name, child, nxt in dots:
            rec = p.dirent(child, nxt, name, stat.S_IFDIR >> 12)
            if plus:
                rec = bytes(p.ENTRY_OUT.size + p.ATTR.size) + rec
            parts.append(rec)
            used += len(rec)
        for name, child, nxt in self.fs.readdir(ino, max(offset - 2, 0)):
            attr = self._attr(child)
            mode = p.ATTR.unpack_from(attr)[9]
            rec = p.dirent(child, nxt + 2, name, stat.S_IFMT(mode) >> 12)
            if used + len(rec) + (p.ENTRY_OUT.size + p.ATTR.size if plus else 0) > size:
                break
            if plus:
                rec = self._entry(child) + rec  # after the size check: an entry sent is a reference held
            parts.append(rec)
            used += len(rec)
        return p.reply(unique, b"".join(parts))

    def _readdir(self, unique: int, ino: int, body: memoryview) -> bytes:
        return self._listing(unique, ino, body, plus=False)

    def _readdirplus(self, unique: int, ino: int, body: memoryview) -> bytes:
        return self._listing(unique, ino, body, plus=True)

    def _statfs(self, unique: int, _nodeid: int, _body: memoryview) -> bytes:
        s = self.fs.statfs()
        return p.reply(unique, p.KSTATFS.pack(
            s["blocks"], s["bfree"], s["bfree"], s["files"], s["ffree"], s["bsize"], s["namemax"], s["bsize"], 0,
        ))

    def _sized(self, unique: int, value: bytes, size: int) -> bytes:
        """getxattr/listxattr: size 0 asks how big; too small a buffer is ERANGE."""
        if size == 0:
            return p.reply(unique, p.GETXATTR_OUT.pack(len(value), 0))
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return p.reply(unique, value)

    def _getxattr(self, unique: int, ino: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        name = p.cstring(body, p.GETXATTR_IN.size)
        if self._find_xattr is None:
            return self._sized(unique, self.fs.getxattr(ino, name), size)
        value = self._find_xattr(ino, name)
        return p.error_reply(unique, errno.ENODATA) if value is None else self._sized(unique, value, size)

    def _listxattr(self, unique: int, ino: int, body: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(body)
        return self._sized(unique, b"".join(n + b"\0" for n in self.fs.listxattr(ino)), size)

    def _access(self, unique: int, ino: int, body: memoryview) -> bytes:
        (mask, _) = p.ACCESS_IN.unpack_from(body)
        self.fs.getattr(ino)
        if mask & os.W_OK and not self.writable:
            raise FsError(errno.EROFS)
        return p.reply(unique)

    def _lseek(self, unique: int, ino: int, body: memoryview) -> bytes:
        _fh, offset, whence, _ = p.LSEEK_IN.unpack_from(body)
        return p.reply(unique, p.LSEEK_OUT.pack(self.fs.lseek(ino, offset, whence)))

    # -- writing (volumes) ------------------------------------------------------

    def _replayed(self, opcode: int, unique: int, parent: int, body: memoryview, err: FsError) -> Reply:
        """A request the kernel sent again (FUSE_NOTIFY_RESEND: its daemon died) may have
        been done before the daemon died: a create that finds its name, a removal that
        does not, is what that looks like, and is answered as the success it was."""
        if err.errno == errno.ENOENT and opcode in (p.UNLINK, p.RMDIR, p.RENAME, p.RENAME2):
            log.info("FUSE %s replayed after a restart: done before; answering success", p.OPCODE_NAMES[opcode])
            return p.reply(unique)
        offsets = {p.CREATE: p.CREATE_IN.size, p.MKDIR: p.MKDIR_IN.size, p.MKNOD: p.MKNOD_IN.size, p.SYMLINK: 0,
                   p.LINK: p.LINK_IN.size}
        if err.errno != errno.EEXIST or opcode not in offsets:
            return p.error_reply(unique, err.errno)
        name = p.cstring(body, offsets[opcode])
        try:
            entry = self._entry(self.fs.lookup_ino(parent, name))
        except FsError:
            return p.error_reply(unique, err.errno)
        log.info("FUSE %s replayed after a restart: done before; answering with the entry", p.OPCODE_NAMES[opcode])
        if opcode == p.CREATE:
            return p.reply(unique, entry + p.OPEN_OUT.pack(0, p.FOPEN_KEEP_CACHE, 0))
        return p.reply(unique, entry)

    def _kernel_times(self) -> bool:
        """Whether the kernel keeps regular files' mtime and ctime (a writeback cache agreed
        at INIT) and sends them with FATTR_MTIME/FATTR_CTIME when they change."""
        return bool(self.writable and self.kernel_flags & WRITEBACK_CACHE
                    and getattr(self.fs, "writeback_cache", False))

    def invalidations(self, inodes: set[int], names: set[tuple[int, bytes]]) -> list[bytes]:
        """Notifications that make the kernel forget ``inodes`` and ``names``; only those
        it may have cached (it looked them up, or holds the inode) are worth sending."""
        known = self.fs.known_inodes()
        msgs = [p.inval_entry(parent, name) for parent, name in names if (parent, name) in self.fs.dentries]
        msgs += [p.inval_inode(ino) for ino in inodes if ino in known]
        if self._kernel_times():
            # The kernel owns a cached regular file's size and times (it keeps its own over ours,
            # and no notification resets them): only a new kernel inode shows the snapshot's.  So
            # every cached name goes (an inode no file holds open goes with its last name), and a
            # changed inode gets a new generation, so that looking it up again makes a new one
            # (the kernel's old one, if a file still holds it, then fails with EIO).
            for ino in inodes:
                self._generations[ino] = self._generations.get(ino, 0) + 1
            msgs += [p.inval_entry(parent, name) for parent, name in self.fs.dentries if (parent, name) not in names]
        return msgs

    def _forget(self, opcode: int, nodeid: int, body: memoryview) -> None:
        if opcode == p.FORGET:
            self._forget_one(nodeid, p.FORGET_IN.unpack_from(body)[0])
            return
        count, _ = p.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            ino, n = p.FORGET_ONE.unpack_from(body, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size)
            self._forget_one(ino, n)

    def _forget_one(self, ino: int, n: int) -> None:
        """A FORGET has no reply, so nothing may escape it: the last one of an unlinked
        inode drops its blocks, a transaction that a full disk fails (lmdb.DiskError,
        which ended the daemon and the mount with it), and the volume retries later."""
        try:
            self.fs.forget(ino, n)
        except Exception as err:
            self._failed(err, f"FUSE forget of inode {ino}")

    async def _later(self, unique: int, work: Coroutine[Any, Any, bytes]) -> Reply:
        try:
            return p.reply(unique, await work)
        except FsError as err:
            return p.error_reply(unique, err.errno)
        except Exception as err:
            return p.error_reply(unique, self._failed(err, f"FUSE request {unique}"))

    def _setattr(self, unique: int, ino: int, body: memoryview) -> Reply | Coroutine[Any, Any, Reply]:
        (valid, _pad, _fh, size, _lo, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _u4, uid, gid,
         _u5) = p.SETATTR_IN.unpack_from(body)
        fields = {"size": size, "mode": mode, "uid": uid, "gid": gid, "atime_ns": atime * 10**9 + atimensec,
                  "mtime_ns": mtime * 10**9 + mtimensec, "ctime_ns": ctime * 10**9 + ctimensec,
                  "caller_uid": self.caller[0], "caller_gid": self.caller[1]}

        done = self.fs.setattr_now(ino, valid, fields)
        if done is not None:  # the attributes as changed: no second look-up (tar sends 3 SETATTRs a file)
            return p.reply(unique, p.ATTR_OUT.pack(self.timeout, 0, 0) + _pack_attr(ino, done))

        async def work() -> bytes:
            await self.fs.setattr(ino, valid, fields)
            return p.ATTR_OUT.pack(self.timeout, 0, 0) + self._attr(ino)

        return self._later(unique, work())

    def _mknod(self, unique: int, parent: int, body: memoryview) -> bytes:
        mode, rdev, _umask, _ = p.MKNOD_IN.unpack_from(body)
        ino = self.fs.mknod(parent, p.cstring(body, p.MKNOD_IN.size), mode, _decode_rdev(rdev), *self.caller)
        return p.reply(unique, self._entry(ino))

    def _mkdir(self, unique: int, parent: int, body: memoryview) -> bytes:
        mode, _umask = p.MKDIR_IN.unpack_from(body)
        return p.reply(unique, self._entry(self.fs.mkdir(parent, p.cstring(body, p.MKDIR_IN.size), mode,
                                                         *self.caller)))

    def _symlink(self, unique: int, parent: int, body: memoryview) -> bytes:
        name, target = p.cstrings(body)
        return p.reply(unique, self._entry(self.fs.symlink(parent, name, target, *self.caller)))

    def _create(self, unique: int, parent: int, body: memoryview) -> bytes:
        if self.mknod_creates and self.no_open:
            # Once: the kernel then creates with MKNOD and opens without a request (no OPEN,
            # so no RELEASE at close either): one round trip a file fewer (see mknod_creates).
            return p.error_reply(unique, errno.ENOSYS)
        _flags, mode, _umask, _ = p.CREATE_IN.unpack_from(body)
        ino = self.fs.create(parent, p.cstring(body, p.CREATE_IN.size), mode, *self.caller)
        return p.reply(unique, self._entry(ino) + p.OPEN_OUT.pack(0, p.FOPEN_KEEP_CACHE, 0))

    def _link(self, unique: int, ino: int, body: memoryview) -> bytes:
        (old,) = p.LINK_IN.unpack_from(body)
        return p.reply(unique, self._entry(self.fs.link(old, ino, p.cstring(body, p.LINK_IN.size))))

    def _unlink(self, unique: int, parent: int, body: memoryview) -> bytes:
        self.fs.unlink(parent, p.cstring(body))
        return p.reply(unique)

    def _rmdir(self, unique: int, parent: int, body: memoryview) -> bytes:
        self.fs.rmdir(parent, p.cstring(body))
        return p.reply(unique)

    def _rename(self, unique: int, parent: int, body: memoryview) -> bytes:
        (newdir,) = p.RENAME_IN.unpack_from(body)
        old, new = p.cstrings(body, p.RENAME_IN.size)
        self.fs.rename(parent, old, newdir, new, 0)
        return p.reply(unique)

    def _rename2(self, unique: int, parent: int, body: memoryview) -> bytes:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(body)
        old, new = p.cstrings(body, p.RENAME2_IN.size)
        self.fs.rename(parent, old, newdir, new, flags)
        return p.reply(unique)

    def _write(self, unique: int, ino: int, body: memoryview) -> Reply | Coroutine[Any, Any, Reply]:
        _fh, offset, size, write_flags, *_ = p.WRITE_IN.unpack_from(body)
        data = body[p.WRITE_IN.size : p.WRITE_IN.size + size]
        # The writer's group if it lacks CAP_FSETID (HANDLE_KILLPRIV_V2: see VolumeFS.write_now)
        killer = self.caller[1] if write_flags & p.WRITE_KILL_SUIDGID else None
        # Pages of a writeback cache: the kernel took the file's times when they were written
        # and sends them itself if they changed (a SETATTR of its times); stamped here with the
        # daemon's clock, the record kept a later mtime than the kernel showed, which a stat
        # after the kernel let the inode go would see (a file written in the tick it was made
        # in sends no times at all: VolumeFS.tick_ns).
        stamp = not (write_flags & WRITE_CACHE and self._kernel_times())
        done = self.fs.write_now(ino, offset, data, killer, stamp)
        if done is not None:
            return p.reply(unique, p.WRITE_OUT.pack(done, 0))

        kept = bytes(data)  # the request buffer is reused once we return

        async def work() -> bytes:
            return p.WRITE_OUT.pack(await self.fs.write(ino, offset, kept, killer, stamp), 0)

        return self._later(unique, work())

    def _fsync(self, unique: int, ino: int, _body: memoryview) -> bytes:
        self.fs.fsync(ino)
        return p.reply(unique)

    def _setxattr(self, unique: int, ino: int, body: memoryview) -> bytes:
        size, flags = p.SETXATTR_IN.unpack_from(body)
        name = p.cstring(body, p.SETXATTR_IN.size)
        start = p.SETXATTR_IN.size + len(name) + 1
        self.fs.setxattr(ino, name, bytes(body[start : start + size]), flags)
        return p.reply(unique)

    def _removexattr(self, unique: int, ino: int, body: memoryview) -> bytes:
        self.fs.removexattr(ino, p.cstring(body))
        return p.reply(unique)

    def _fallocate(self, unique: int, ino: int, body: memoryview) -> Coroutine[Any, Any, Reply]:
        _fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body)

        async def work() -> bytes:
            await self.fs.fallocate(ino, offset, length, mode)
            return b""

        return self._later(unique, work())


def _pack_attr(ino: int, a: Any) -> bytes:
    """fuse_attr of ``a`` (an :class:`cubefs.image.fs.Attr`)."""
    at, atn = divmod(a.atime_ns, 10**9)
    mt, mtn = divmod(a.mtime_ns, 10**9)
    ct, ctn = divmod(a.ctime_ns, 10**9)
    return p.ATTR.pack(ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn, a.mode, a.nlink, a.uid, a.gid,
                       _encode_rdev(a.rdev), 65536, 0)


def _decode_rdev(rdev: int) -> int:
    """The inverse of :func:`_encode_rdev`."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)
