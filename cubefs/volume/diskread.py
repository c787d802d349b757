"""A VM's disk read on the host: the ext4 a guest wrote, parsed in user space, merged with its image.

A disk root (vmm/disk.py) is an overlay in the guest: the image as the lower
layer, ``upper/`` and ``work/`` on an ext4 on the disk.  ``cubefs commit`` of
such a volume builds base image + upper, with overlayfs's rules: a whiteout
(a character device 0:0) deletes the name below it, a directory marked
``trusted.overlay.opaque=y`` replaces the one below instead of merging with
it, anything else in the upper replaces what the image has under that name.
Files of the image the guest never touched keep the image's chunk lists and
are not read (the disk holds only what the guest changed).

**The ext4 was written by a hostile guest**, so the host kernel never mounts
it (a crafted ext4 is kernel attack surface).  Everything is user space:

1. an O(1) clone of the snapshot (the snapshot itself is never written),
   served by our own daemon read-write in a private directory;
2. ``e2fsck -E journal_only`` replays the journal into the clone (a snapshot
   of a running guest is what a power cut leaves), then ``e2fsck -fn``
   checks it: a damaged disk is refused with e2fsck's own words, before
   anything walks it (no directory loops, no hard-linked directories, no
   names with ``/``: e2fsck rejects all of them);
3. ``fuse2fs -o ro`` serves the checked ext4 and the commit walks it like any
   directory: ``lstat`` and ``O_NOFOLLOW``, so a symlink is data and never
   followed, and the kernel's VFS resolves every name (a name can neither be
   ``..`` nor hold ``/`` past FUSE's own checks).  The walk is bounded
   (entries, apparent bytes: a sparse 16 TiB file on a 256 MiB disk would be
   16 TiB of zeros to read) and refuses overlay features it does not read
   (``redirect``, ``metacopy``: off in the guest's overlay).  What it holds in memory
   (xattrs, symlink targets) is bounded too.

Both tools parse the guest's bytes as ``nobody`` with no capabilities and
no_new_privs, the disk handed in as a descriptor; the host mounts fuse2fs's FUSE
connection itself (``ro,nosuid,nodev,noexec``, root's alone) and a watchdog kills a
fuse2fs that takes longer than WALK_TIMEOUT (see :func:`fuse2fs`).

Measured (docs/benchmarks.md, "Commit of a disk"): fuse2fs was chosen over
``debugfs rdump``, which leaves out device nodes (so every whiteout), all
xattrs (so opaque directories) and hard links, and whose listing a name with
a newline breaks.  Debian 12's fuse2fs (1.47.0) reports whole seconds: the
sub-second part of a time the guest set is lost in a disk commit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import IO

from cubefs.cow.index import BaseImage, VolumeIndex
from cubefs.dedup.ingest import Ingest
from cubefs.dedup.sources import KnownChunks, Tick, _list_dir, _node_from_stat
from cubefs.dedup.tree import Node
from cubefs.errors import BadInputError, CubefsError, NotFoundError
from cubefs.format.image import (
    F_ATIME,
    F_CTIME,
    F_GID,
    F_MODE,
    F_MTIME,
    F_PAYLOAD,
    F_RDEV,
    F_SIZE,
    F_UID,
    F_XATTRS,
    ROOT_INO,
    Image,
)
from cubefs.format.packs import ChunkLocation

UPPER = b"upper"  # vmm/guest/system.py: the overlay's upper directory at the disk's root
OVERLAY = b"trusted.overlay."
OPAQUE = b"trusted.overlay.opaque"
UNREAD = (b"trusted.overlay.redirect", b"trusted.overlay.metacopy")
CLONE_PREFIX = "cubefs-diskread-"
MNT_PREFIX = "cubefs-ext4-"  # <tmp>/cubefs-ext4-<pid>-XXXX/root: fuse2fs's mount (swept once <pid> is gone)
FSTYPE = "fuse.cubefs-disk"
MAX_ENTRIES = 2_000_000  # ~1 GiB of tree in memory at most; a guest's disk past it is refused
APPARENT_FACTOR = 16  # the upper's files may add up to 16x the disk's size (sparse files), no more
# xattrs of one file: shared xattr blocks and ea_inode values (64 KiB each) let a guest give
# every file of a small disk thousands of big values, each read into memory; real files carry a
# few (capabilities, ACLs, SELinux labels, overlayfs' own), far under these
MAX_XATTRS = 128
MAX_XATTR_BYTES = 256 << 10
# what the walk may hold in memory of xattrs and symlink targets, each xattr counted with what
# Python spends on it beside its bytes (two bytes objects and a tuple: ~100 bytes)
MAX_META_BYTES = 512 << 20
XATTR_OVERHEAD = 100
TOOL_TIMEOUT = 900.0
WALK_TIMEOUT = 900.0  # the whole read of the disk through fuse2fs; then it is killed (a wedged fuse2fs)
TOOL_USER = "nobody"  # e2fsck and fuse2fs parse the guest's ext4 as this user, no_new_privs, no capabilities

Scan = Callable[[str, Ingest, Tick, dict[bytes, ChunkLocation]], Node]


def tools_present() -> None:
    for tool, pkg in (("e2fsck", "e2fsprogs"), ("fuse2fs", "fuse2fs")):
        if shutil.which(tool) is None:
            raise CubefsError(f"{tool} is not installed on the host (Debian: apt-get install {pkg}): a VM's disk "
                              "is read in user space, never mounted by the host's kernel")


@contextmanager
def disk_tree(index: VolumeIndex, volume: str, snapshot: str, cache_dir: str) -> Iterator[tuple[str, int]]:
    """The ext4 on ``volume@snapshot``'s disk, journal replayed into an O(1) clone, checked and
    mounted read-only by fuse2fs; yields (its root directory, the disk's size)."""
    from cubefs.node.private_mount import private_mount
    from cubefs.volume.blk import disk_of
    from cubefs.volume.fs import VolumeFS

    tools_present()
    what = f"the disk of {volume}@{snapshot}"
    fs = VolumeFS(index, volume, None, f"size of {what}", snapshot)
    try:
        _ino, size = disk_of(fs)
    finally:
        fs.close()
    sweep_stale(index)
    clone = f"{CLONE_PREFIX}{os.getpid()}-{time.time_ns()}"
    index.clone(volume, snapshot, [clone])
    index.sync()
    try:
        with private_mount(f"reading {what}", None, "--volume", clone, "--volume-dir", index.directory,
                           "--cache-dir", cache_dir, "--no-server", "--raw") as mnt:
            disk = os.path.join(mnt, "disk")
            uid, gid = tool_ids()
            os.chown(disk, uid, gid)  # the clone's disk is the tools' (reached only by the fd handed in)
            check_ext4(disk, what)
            with fuse2fs(disk, what) as root:
                yield root, size
    finally:
        try:
            index.remove_volume(clone)
            index.sync()
        except NotFoundError:
            pass


def tool_ids() -> tuple[int, int]:
    """(uid, gid) the tools run as: TOOL_USER's, or 65534 where it has no passwd entry."""
    try:
        pw = pwd.getpwnam(TOOL_USER)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def confined(argv: list[str]) -> list[str]:
    """``argv`` run as the unprivileged TOOL_USER, no supplementary groups, no capabilities
    (bounding set emptied too) and no_new_privs (no setuid binary gives any back)."""
    uid, gid = tool_ids()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--inh-caps=-all",
            "--bounding-set=-all", "--", *argv]


def check_ext4(disk: str, what: str) -> None:
    """Replay the journal (into the clone) and check the result; BadInputError naming what
    e2fsck found if the filesystem is damaged.  e2fsck runs confined, the disk handed in as
    an open descriptor (``/proc/self/fd/N``: its directory is root's, 0700)."""
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        _run(confined(["e2fsck", "-E", "journal_only", "-y", f"/proc/self/fd/{fd}"]), what, ok=(0, 1), fds=(fd,))
        res = _run(confined(["e2fsck", "-fn", f"/proc/self/fd/{fd}"]), what, ok=None, fds=(fd,))
    finally:
        os.close(fd)
    if res.returncode != 0:
        raise BadInputError(f"{what} is not a sound ext4 (e2fsck -fn exited {res.returncode}: "
                            f"{_gist(res.stdout + res.stderr)}); nothing was read from it")


def _gist(out: str) -> str:
    """e2fsck's first line that says what is wrong (not its banner, pass names or advice)."""
    for line in out.splitlines():
        line = line.strip()
        if line and not line.startswith(("e2fsck ", "Pass ", "Warning")) and ": clean," not in line:
            return line[:200]
    return "no detail"


_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "E2FSCK_CONFIG": "/dev/null"}


def _run(argv: list[str], what: str, ok: tuple[int, ...] | None,
         fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    tool = argv[argv.index("--") + 1] if "--" in argv else argv[0]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
                             env=_ENV, pass_fds=fds)
    except subprocess.TimeoutExpired:
        raise BadInputError(f"{what}: {tool} took over {TOOL_TIMEOUT:.0f} s; refused") from None
    if ok is not None and res.returncode not in ok:
        shown = " ".join(argv[argv.index(tool):-1])
        raise BadInputError(f"{what} is not a sound ext4 ({shown} exited {res.returncode}: "
                            f"{_gist(res.stdout + res.stderr)}); nothing was read from it")
    return res


# -- fuse2fs, confined ---------------------------------------------------------------
#
# fuse2fs (libfuse 2) cannot mount as an unprivileged user without the setuid fusermount,
# which no_new_privs disables.  So the host mounts the FUSE connection itself (root, nosuid,
# nodev, noexec, ro; only uid 0 may use it: no allow_other) and hands fuse2fs the open
# /dev/fuse the way fusermount would: libfuse, told ``auto_unmount``, asks "fusermount" for the
# descriptor over the socket in _FUSE_COMMFD, and in fuse2fs's own mount namespace
# /usr/bin/fusermount is a bind mount of FAKE_FUSERMOUNT, which passes on the one it inherited.

FAKE_FUSERMOUNT = """#!/usr/bin/python3 -I
import os, socket, sys
if "-u" in sys.argv[1:]:
    sys.exit(0)  # the host unmounts
sock = socket.socket(fileno=int(os.environ["_FUSE_COMMFD"]))
socket.send_fds(sock, [b"\\0"], [int(os.environ["CUBEFS_FUSE_FD"])])
"""
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def fuse2fs(disk: str, what: str, timeout: float | None = None) -> Iterator[str]:
    """``disk`` (an ext4 in a file) served read-only by a confined fuse2fs, mounted in a
    private directory; yields the mountpoint.  Past ``timeout`` seconds (WALK_TIMEOUT) fuse2fs
    is killed, which fails every request waiting on it (a wedged fuse2fs hangs no lstat)."""
    timeout = WALK_TIMEOUT if timeout is None else timeout
    top = tempfile.mkdtemp(prefix=f"{MNT_PREFIX}{os.getpid()}-")
    os.chmod(top, 0o711)  # the tool reaches stub/ and nothing else here
    stub, root, fake = (os.path.join(top, n) for n in ("stub", "root", "fusermount"))
    os.mkdir(stub)
    os.chmod(stub, 0o755)  # whatever the umask (cubefs runs with 077)
    os.mkdir(root, 0o700)
    with open(fake, "w") as f:
        f.write(FAKE_FUSERMOUNT)
    os.chmod(fake, 0o755)
    log = tempfile.TemporaryFile()
    proc: subprocess.Popen[bytes] | None = None
    fired = threading.Event()
    try:
        dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
            data = f"fd={dev},rootmode=40000,user_id=0,group_id=0".encode()
            if _libc.mount(b"cubefs-disk", os.fsencode(root), FSTYPE.encode(), flags, data) != 0:
                err = ctypes.get_errno()
                raise CubefsError(f"{what}: cannot mount a FUSE connection for fuse2fs: {os.strerror(err)}")
            fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
            try:
                proc = subprocess.Popen(
                    _private_fusermount(fake, root, confined(["fuse2fs", f"/proc/self/fd/{fd}", stub, "-f", "-o",
                                                              "ro,auto_unmount,fsname=cubefs-disk,subtype=cubefs-disk"])),
                    pass_fds=(dev, fd), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**_ENV, "CUBEFS_FUSE_FD": str(dev)})
            finally:
                os.close(fd)
        finally:
            os.close(dev)  # fuse2fs holds the only one now: killed, the connection ends

        def kill() -> None:
            fired.set()
            if proc is not None:
                proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                os.stat(root)  # answered once fuse2fs has the filesystem open
            except OSError:
                raise BadInputError(f"{what}: fuse2fs could not serve it ({_gist(_tail(log))}); nothing was read "
                                    "from it") from None
            yield root
        except OSError as err:
            if fired.is_set():
                raise BadInputError(f"{what}: fuse2fs did not finish within {timeout:.0f} s; refused") from None
            raise err
        except BadInputError:
            if fired.is_set():
                raise BadInputError(f"{what}: fuse2fs did not finish within {timeout:.0f} s; refused") from None
            raise
        finally:
            watchdog.cancel()
    finally:
        _unmount(root)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(top, ignore_errors=True)


def _unmount(root: str) -> None:
    """Unmount fuse2fs's mount, if it is one (not by ismount: a mount whose fuse2fs has died
    fails every stat with ENOTCONN); lazily if it is busy."""
    if _libc.umount2(os.fsencode(root), 0) != 0 and ctypes.get_errno() == errno.EBUSY:
        _libc.umount2(os.fsencode(root), _MNT_DETACH)


def _private_fusermount(fake: str, root: str, argv: list[str]) -> list[str]:
    """``argv`` in a mount namespace of its own, where fusermount is FAKE_FUSERMOUNT and the
    host's mount of ``root`` is not (so an unmount by the host ends the connection).  By
    unshare(1) and a shell rather than a preexec_fn: nothing runs between fork and exec."""
    script = 'mount --bind "$1" /usr/bin/fusermount && umount -l "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", fake, root, *argv]


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read()[-4000:].decode(errors="replace")


def sweep_stale(index: VolumeIndex) -> None:
    """What a reader that was killed left (its pid is gone): fuse2fs mounts under
    ``<tmp>/cubefs-ext4-<pid>-*`` (unmounted: fuse2fs then ends), then clones, with the
    private mount still serving one unmounted first."""
    from cubefs.cow.lock import holder_of
    from cubefs.node.private_mount import _cubefs

    tmp = tempfile.gettempdir()
    for top in os.listdir(tmp):
        pid = top[len(MNT_PREFIX):].partition("-")[0] if top.startswith(MNT_PREFIX) else ""
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        _unmount(os.path.join(tmp, top, "root"))
        shutil.rmtree(os.path.join(tmp, top), ignore_errors=True)
    for vol in index.volumes():
        if not vol.name.startswith(CLONE_PREFIX):
            continue
        pid = vol.name[len(CLONE_PREFIX):].partition("-")[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        holder = holder_of(index, vol.name)
        if holder is not None and str(holder.get("mountpoint", "")).startswith(os.path.join(tmp, "cubefs-mnt-")):
            for attempt in range(50):  # busy until the fuse2fs unmounted above has closed the disk
                try:
                    _cubefs(f"sweeping {vol.name}", "umount", str(holder["mountpoint"]))
                    break
                except CubefsError:
                    time.sleep(0.1 * (attempt < 49))
            else:
                continue
            shutil.rmtree(str(holder["mountpoint"]), ignore_errors=True)
        if holder_of(index, vol.name) is None:
            try:
                index.remove_volume(vol.name)
            except NotFoundError:
                pass


# -- the merged tree -----------------------------------------------------------------


class Merge:
    """Base image + an overlay's upper directory, as the build's :class:`Node` tree."""

    def __init__(self, image: Image | None, known: dict[bytes, ChunkLocation], disk_size: int,
                 max_entries: int = MAX_ENTRIES, max_bytes: int | None = None) -> None:
        self.known = known
        self.max_entries = max_entries
        # the walk's bytes: files' apparent sizes, and the xattrs and symlink targets it holds in memory
        self.max_bytes = max_bytes if max_bytes is not None else max(disk_size * APPARENT_FACTOR, 1 << 30)
        self.nbytes = 0
        self.max_meta = min(MAX_META_BYTES, self.max_bytes)
        self.meta = 0
        self.unread: dict[int, tuple[Node, bytes]] = {}  # base files whose chunks this store lacks
        self.reused = 0
        self.root = self._from_image(image) if image is not None else Node(stat.S_IFDIR | 0o755, children={})

    def _from_image(self, image: Image) -> Node:
        """The image's tree, each file's chunks as the image lists them (nothing read)."""
        nodes: dict[int, Node] = {}

        def node_of(ino: int, path: bytes) -> Node:
            if ino in nodes:  # a hard link: the same node under another name
                return nodes[ino]
            rec = image.record(ino)
            mode = rec[F_MODE]
            node = Node(mode, rec[F_UID], rec[F_GID], rec[F_ATIME], rec[F_MTIME], rec[F_CTIME], rec[F_RDEV],
                        rec[F_SIZE] if stat.S_ISREG(mode) else 0, [(bytes(k), bytes(v)) for k, v in rec[F_XATTRS]])
            if stat.S_ISDIR(mode):
                node.children = {}
            elif stat.S_ISLNK(mode):
                node.target = bytes(rec[F_PAYLOAD])
            elif stat.S_ISREG(mode):
                offs, idxs = image.extents(ino)
                chunks = [(off, *image.chunk(idx)) for off, idx in zip(offs, idxs)]
                if all(digest in self.known for _o, digest, _n in chunks):
                    node.extents.append(KnownChunks(chunks))
                else:
                    self.unread[id(node)] = (node, path)
            nodes[ino] = node
            return node

        root = node_of(ROOT_INO, b"")
        stack = [(ROOT_INO, b"", root)]
        while stack:
            ino, path, dnode = stack.pop()
            assert dnode.children is not None
            for name, child in image.entries(ino):
                name = bytes(name)
                node = node_of(child, path + b"/" + name)
                dnode.children[name] = node
                if node.is_dir:
                    stack.append((child, path + b"/" + name, node))
        return root

    def apply_upper(self, upper: str, ingest: Ingest, tick: Tick) -> None:
        """Lay the overlay's upper directory over the tree; its regular files go to ``ingest``."""
        top = os.fsencode(upper)
        st = os.lstat(top)
        if not stat.S_ISDIR(st.st_mode):
            raise BadInputError(f"{upper} is not a directory")
        self._attrs_from(self.root, st, top)
        hardlinks: dict[tuple[int, int], Node] = {}
        dirs_seen = {(st.st_dev, st.st_ino)}
        entries = 0
        pending: list[tuple[bytes, int, int, Node, bytes]] = []
        stack: list[tuple[bytes, bytes, Node]] = [(top, b"", self.root)]
        while stack:
            dpath, rel, dnode = stack.pop()
            assert dnode.children is not None
            try:
                names = sorted(_list_dir(dpath))
            except OSError as err:
                raise BadInputError(f"cannot list {os.fsdecode(rel) or '/'} on the disk: {err.strerror}") from None
            for name in names:
                entries += 1
                if entries > self.max_entries:
                    raise BadInputError(f"the disk's upper directory has over {self.max_entries:,} entries; refused")
                path, child_rel = dpath + b"/" + name, rel + b"/" + name
                try:
                    st = os.lstat(path)
                except OSError as err:
                    raise BadInputError(f"cannot read {os.fsdecode(child_rel)} on the disk: {err.strerror}") from None
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout
                    dnode.children.pop(name, None)
                    continue
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in hardlinks:
                    dnode.children[name] = hardlinks[key]
                    continue
                xattrs = self._xattrs(path, child_rel)
                node = _node_from_stat(st)
                node.xattrs = [(k, v) for k, v in xattrs if not k.startswith(OVERLAY)]
                if stat.S_ISDIR(st.st_mode):
                    if key in dirs_seen:
                        raise BadInputError(f"{os.fsdecode(child_rel)} on the disk is a directory seen twice; refused")
                    dirs_seen.add(key)
                    below = dnode.children.get(name)
                    opaque = dict(xattrs).get(OPAQUE) == b"y"
                    node.children = below.children if (below is not None and below.is_dir and not opaque
                                                       and below.children is not None) else {}
                    stack.append((path, child_rel, node))
                elif stat.S_ISLNK(st.st_mode):
                    node.target = os.readlink(path)
                    self._count(len(node.target), child_rel, meta=True)
                elif stat.S_ISREG(st.st_mode):
                    self._count(st.st_size, child_rel)
                    pending.append((path, st.st_size, st.st_blocks, node, child_rel))
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    hardlinks[key] = node
                dnode.children[name] = node
        done = 0
        for files, (path, size, blocks, node, rel) in enumerate(pending, 1):
            ingest.add_file(path, size, blocks, node.extents, rel)
            done += size
            tick(files, done)

    def _count(self, n: int, rel: bytes, meta: bool = False) -> None:
        self.nbytes += n
        self.meta += n if meta else 0
        if self.meta > self.max_meta:
            raise BadInputError(f"the disk's xattrs and symlinks add up to over {self.max_meta:,} bytes in memory; "
                                f"refused at {os.fsdecode(rel)}")
        if self.nbytes > self.max_bytes:
            raise BadInputError(f"the disk's files, xattrs and symlinks add up to over {self.max_bytes:,} bytes "
                                f"(sparse files or xattrs past {APPARENT_FACTOR}x the disk's size); refused at "
                                f"{os.fsdecode(rel)}")

    def _attrs_from(self, node: Node, st: os.stat_result, path: bytes) -> None:
        new = _node_from_stat(st)
        node.mode, node.uid, node.gid = new.mode, new.uid, new.gid
        node.atime_ns, node.mtime_ns, node.ctime_ns = new.atime_ns, new.mtime_ns, new.ctime_ns
        node.xattrs = [(k, v) for k, v in self._xattrs(path, b"/") if not k.startswith(OVERLAY)]

    def _xattrs(self, path: bytes, rel: bytes) -> list[tuple[bytes, bytes]]:
        """The file's xattrs, bounded (MAX_XATTRS, MAX_XATTR_BYTES) before they are all read,
        and counted against the walk's bytes."""
        try:
            xattrs = self._read_xattrs(path, rel)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.ENODATA):
                return []
            raise BadInputError(f"cannot read the xattrs of {os.fsdecode(rel)} on the disk: {err.strerror}") from None
        if any(k in UNREAD for k, _v in xattrs):
            raise BadInputError(f"{os.fsdecode(rel)} on the disk uses overlayfs redirect_dir or metacopy, which a "
                                "commit does not read; refused")
        return xattrs

    def _read_xattrs(self, path: bytes, rel: bytes) -> list[tuple[bytes, bytes]]:
        names = os.listxattr(path, follow_symlinks=False)  # at most 64 KiB of names (XATTR_LIST_MAX)
        if len(names) > MAX_XATTRS:
            raise BadInputError(f"{os.fsdecode(rel)} on the disk has {len(names)} xattrs, over {MAX_XATTRS}; refused")
        out, size = [], 0
        for name in names:
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError as err:
                if err.errno == errno.ENODATA:
                    continue
                raise
            key = os.fsencode(name)
            size += len(key) + len(value)
            if size > MAX_XATTR_BYTES:
                raise BadInputError(f"{os.fsdecode(rel)} on the disk has over {MAX_XATTR_BYTES >> 10} KiB of xattrs; "
                                    "refused")
            self._count(len(key) + len(value) + XATTR_OVERHEAD, rel, meta=True)
            out.append((key, value))
        return out

    def unread_reachable(self) -> list[tuple[Node, bytes]]:
        """The base image's files still in the tree whose chunks the target store lacks."""
        if not self.unread:
            return []
        out, stack, seen = [], [self.root], set()
        while stack:
            node = stack.pop()
            for child in (node.children or {}).values():
                if child.is_dir:
                    stack.append(child)
                elif id(child) in self.unread and id(child) not in seen:
                    seen.add(id(child))
                    out.append(self.unread[id(child)])
        return out


def merged_scan(upper: str | None, image: Image | None, base: BaseImage | None, disk_size: int,
                cache_dir: str, stack: ExitStack, counts: dict[str, int]) -> Scan:
    """A ``scan`` for cubefs.dedup.builder.build: the base image's tree with ``upper`` laid over."""
    from cubefs.node.private_mount import private_mount

    def scan(_src: str, ingest: Ingest, tick: Tick, known: dict[bytes, ChunkLocation]) -> Node:
        merge = Merge(image, known, disk_size)
        if upper is not None:
            merge.apply_upper(upper, ingest, tick)
        unread = merge.unread_reachable()
        if unread and base is not None:  # another store than the base's: read these from the image
            mnt = stack.enter_context(private_mount(f"reading {base.ref}", base.ref, "--store", base.store,
                                                    *(["--s3-endpoint", base.s3_endpoint] if base.s3_endpoint
                                                      else []), "--cache-dir", cache_dir))
            for node, path in unread:
                st = os.lstat(os.fsencode(mnt) + path)
                ingest.add_file(os.fsencode(mnt) + path, st.st_size, st.st_blocks, node.extents, path)
        counts["reused"] = _count_known(merge.root)
        return merge.root

    return scan


def _count_known(root: Node) -> int:
    n, stack, seen = 0, [root], set()
    while stack:
        node = stack.pop()
        for child in (node.children or {}).values():
            if child.is_dir:
                stack.append(child)
            elif id(child) not in seen and any(isinstance(e, KnownChunks) for e in child.extents):
                seen.add(id(child))
                n += 1
    return n
