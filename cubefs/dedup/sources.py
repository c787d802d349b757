"""Build sources: a directory tree or a tarball, turned into a :class:`Node` tree.

Both read without ever following a symlink or writing anything: a directory
is walked with ``lstat`` and ``O_NOFOLLOW``, a tarball is read as a stream and
its members placed into the in-memory tree.  Hostile input is refused with a
one-line :class:`BadInputError` naming the member: a ``..`` component, a hard
link to something outside (or not earlier in) the archive, or a member that
would be written *through* a symlink.  A symlink's target is data and is kept
verbatim, absolute or not (root filesystems are full of absolute symlinks);
it can never pull content from outside the tree into the image, because the
build never resolves it.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
import tarfile
from collections.abc import Callable
from decimal import Decimal
from typing import IO
from urllib.parse import unquote_to_bytes

import zstandard

from cubefs.dedup.ingest import WHOLE_READ, Ingest, open_nofollow
from cubefs.dedup.tree import ChunkBatch, Node, new_dir
from cubefs.errors import BadInputError, NotFoundError

Tick = Callable[[int, int], None]  # (files, bytes) progress callback


def _xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    out = []
    for name in names:
        try:
            out.append((name.encode(), os.getxattr(path, name, follow_symlinks=False)))
        except OSError as err:
            if err.errno != errno.ENODATA:
                raise
    return out


def _node_from_stat(st: os.stat_result) -> Node:
    return Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        rdev=st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0,
        size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
    )


def _list_dir(path: bytes) -> list[bytes]:
    """List a directory without touching its atime, so a rebuild sees the same tree."""
    fd = open_nofollow(path, os.O_DIRECTORY)
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


class KnownChunks:
    """A file's chunks known without reading it (a ChunkBatch that is already done)."""

    def __init__(self, chunks: list[tuple[int, bytes, int]]) -> None:
        self.chunks = chunks

    def result(self) -> list[tuple[int, bytes, int]]:
        return self.chunks


Reuse = Callable[[bytes, os.stat_result], "list[tuple[int, bytes, int]] | None"]


def scan_directory(src: str, ingest: Ingest, tick: Tick, reuse: Reuse | None = None) -> Node:
    """Walk ``src`` depth first; file data goes to ``ingest`` as it is read, except for
    files whose chunks ``reuse`` already knows (a commit's files the volume never changed)."""
    root_path = os.fsencode(os.path.abspath(src))
    try:
        st = os.lstat(root_path)
    except FileNotFoundError:
        raise NotFoundError(f"source directory {src} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"source {src} is not a directory or a tarball")
    root = _node_from_stat(st)
    root.children = {}
    root.xattrs = _xattrs(root_path)
    hardlinks: dict[tuple[int, int], Node] = {}
    stack: list[tuple[bytes, Node]] = [(root_path, root)]
    pending: list[tuple[bytes, int, int, list[ChunkBatch]]] = []
    while stack:
        dpath, dnode = stack.pop()
        assert dnode.children is not None
        try:
            names = sorted(_list_dir(dpath))
        except OSError as err:
            raise BadInputError(f"cannot list {os.fsdecode(dpath)}: {err.strerror}") from None
        for name in names:
            path = dpath + b"/" + name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # vanished while we walked
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in hardlinks:
                dnode.children[name] = hardlinks[key]
                continue
            node = _node_from_stat(st)
            node.xattrs = _xattrs(path)
            if stat.S_ISDIR(st.st_mode):
                node.children = {}
                stack.append((path, node))
            elif stat.S_ISLNK(st.st_mode):
                node.target = os.readlink(path)
                # readlink updates the link's atime (relatime) and no flag prevents it:
                # record the atime it leaves, so building the tree again sees the same.
                node.atime_ns = os.lstat(path).st_atime_ns
            elif stat.S_ISREG(st.st_mode):
                known = reuse(path, st) if reuse is not None else None
                if known is not None:
                    node.extents.append(KnownChunks(known))
                else:
                    pending.append((path, st.st_size, st.st_blocks, node.extents))
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                hardlinks[key] = node
            dnode.children[name] = node
    # File data goes to the workers only once the walk is done: a walk beside
    # them waits for the GIL after every lstat (measured: 26 us instead of 4,
    # and 15% of the build's throughput); alone it takes ~0.1 s for a rootfs.
    nbytes = 0
    for files, (path, size, blocks, extents) in enumerate(pending, 1):
        ingest.add_file(path, size, blocks, extents, path[len(root_path):])
        nbytes += size
        tick(files, nbytes)
    return root


# -- tarballs ---------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _open_tar_stream(path: str) -> tuple[IO[bytes], tarfile.TarFile]:
    raw = open(path, "rb")
    head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    stream: IO[bytes] = raw
    if head == _ZSTD_MAGIC:
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[assignment]
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*")
    except tarfile.TarError as err:
        raw.close()
        raise BadInputError(f"tarball {path}: not a readable tar archive ({err})") from None
    return raw, tf


def _member_parts(name: str, where: str, what: str = "member") -> list[bytes]:
    raw = name.encode("utf-8", "surrogateescape")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise BadInputError(f"{where}: {what} {name!r} escapes the tree ('..' component)")
    if any(len(p) > 255 or b"\0" in p for p in parts):
        raise BadInputError(f"{where}: {what} {name[:80]!r}... has a name over 255 bytes or a NUL")
    return parts


def _pax_ns(member: tarfile.TarInfo, key: str, default: int) -> int:
    value = member.pax_headers.get(key)
    if value is None:
        return default
    try:
        return int(Decimal(value) * 1_000_000_000)
    except ArithmeticError:
        return default


def _tar_node(m: tarfile.TarInfo) -> Node:
    if m.isdir():
        kind = stat.S_IFDIR
    elif m.issym():
        kind = stat.S_IFLNK
    elif m.ischr():
        kind = stat.S_IFCHR
    elif m.isblk():
        kind = stat.S_IFBLK
    elif m.isfifo():
        kind = stat.S_IFIFO
    else:
        kind = stat.S_IFREG
    mtime = _pax_ns(m, "mtime", int(m.mtime) * 1_000_000_000)
    node = Node(
        # Linux symlinks are always 0777, whatever the archive says: as extracted, so mounted.
        mode=kind | (0o777 if kind == stat.S_IFLNK else m.mode & 0o7777),
        uid=m.uid,
        gid=m.gid,
        atime_ns=_pax_ns(m, "atime", mtime),
        mtime_ns=mtime,
        ctime_ns=_pax_ns(m, "ctime", mtime),
    )
    if m.ischr() or m.isblk():
        node.rdev = os.makedev(m.devmajor, m.devminor)
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):  # GNU tar, star
            node.xattrs.append((key[13:].encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):  # bsdtar: URL-encoded name, base64 value
            name = unquote_to_bytes(key[17:])
            if all(n != name for n, _v in node.xattrs):
                node.xattrs.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
    if m.issym():
        node.target = m.linkname.encode("utf-8", "surrogateescape")
    if m.isdir():
        node.children = {}
    return node


def scan_tarball(path: str, ingest: Ingest, tick: Tick) -> Node:
    """Read a tar stream (plain, gzip, bzip2, xz or zstd) into a tree."""
    if not os.path.exists(path):
        raise NotFoundError(f"source {path} does not exist")
    raw, tf = _open_tar_stream(path)
    try:
        return apply_tar(tf, new_dir(), ingest, _Progress(tick), f"tarball {path}")
    finally:
        tf.close()
        raw.close()


class _Progress:
    """Files and bytes ingested so far, across the layers of an image."""

    def __init__(self, tick: Tick) -> None:
        self.tick = tick
        self.files = 0
        self.bytes = 0

    def add(self, n: int) -> None:
        self.files += 1
        self.bytes += n
        self.tick(self.files, self.bytes)


WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"


def apply_tar(tf: tarfile.TarFile, root: Node, ingest: Ingest, progress: _Progress, where: str,
              layer: bool = False, dropped: list[str] | None = None) -> Node:
    """Apply a tar stream onto the tree ``root``; returns the (maybe replaced) root.

    With ``layer``, the stream is an OCI layer over what earlier layers built:
    ``DIR/.wh.NAME`` deletes NAME, ``DIR/.wh..wh..opq`` hides everything earlier
    layers put in DIR (this layer's entries stay, wherever the marker comes), an
    entry replaces one of another type (a directory with its subtree), and a
    hard link may point at a file of an earlier layer.  ``where`` names the
    stream in errors.  With a ``dropped`` list, character and block devices are
    left out and named there: an image from elsewhere has no business shipping
    a way into the host's devices (a runtime makes /dev itself).
    """
    # Keyed by a directory's children dict, which a repeated directory entry keeps.
    added: dict[int, set[bytes]] = {}  # names this stream put in the directory
    opaque: list[dict[bytes, Node]] = []
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as err:
            raise BadInputError(f"{where}: corrupt or truncated archive ({err})") from None
        if m is None:
            break
        parts = _member_parts(m.name, where)
        if not parts:  # "./": the root itself
            if m.isdir():
                fresh = _tar_node(m)
                fresh.children = root.children
                root = fresh
            continue
        parent = _parent_dir(root, parts, m.name, where)
        assert parent.children is not None
        leaf = parts[-1]
        if layer and leaf.startswith(WHITEOUT):
            if leaf == OPAQUE:
                opaque.append(parent.children)
            else:
                parent.children.pop(leaf[len(WHITEOUT):], None)
            continue
        added.setdefault(id(parent.children), set()).add(leaf)
        if m.islnk():
            target_parts = _member_parts(m.linkname, where, what=f"hard link {m.name!r} →")
            target = _resolve(root, target_parts)
            if target is None or target.is_dir:
                raise BadInputError(
                    f"{where}: hard link {m.name!r} points to {m.linkname!r}, which is not an earlier file"
                )
            parent.children[leaf] = target
            continue
        if dropped is not None and (m.ischr() or m.isblk()):
            dropped.append(f"{m.name} ({m.devmajor}:{m.devminor})")
            continue
        node = _tar_node(m)
        old = parent.children.get(leaf)
        if node.is_dir and old is not None and old.is_dir:
            node.children = old.children  # a repeated directory updates metadata only
        if m.isreg():
            node.size = m.size
            _ingest_member(tf, m, node, ingest, where, b"/" + b"/".join(parts))
            progress.add(m.size)
        parent.children[leaf] = node
    for children in opaque:
        keep = added.get(id(children), set())
        for name in [n for n in children if n not in keep]:
            del children[name]
    return root


def _ingest_member(tf: tarfile.TarFile, m: tarfile.TarInfo, node: Node, ingest: Ingest, where: str,
                   name: bytes) -> None:
    f = tf.extractfile(m)
    assert f is not None
    try:
        if m.size <= WHOLE_READ:
            data = f.read()
            got = len(data)
            if got == m.size:
                ingest.add_data(data, node.extents, name)
        else:
            got = ingest.add_stream(f.read, 0, node.extents, name)
    except (tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as err:
        raise BadInputError(f"{where}: member {m.name!r} is truncated ({err})") from None
    if got != m.size:
        raise BadInputError(f"{where}: member {m.name!r} is truncated")


def _resolve(root: Node, parts: list[bytes]) -> Node | None:
    node = root
    for p in parts:
        if node.children is None:
            return None
        nxt = node.children.get(p)
        if nxt is None:
            return None
        node = nxt
    return node


def _parent_dir(root: Node, parts: list[bytes], name: str, where: str) -> Node:
    """The directory a member goes into, creating missing parents like tar does."""
    node = root
    for i, p in enumerate(parts[:-1]):
        assert node.children is not None
        nxt = node.children.get(p)
        if nxt is None:
            nxt = node.children[p] = new_dir()
        elif not nxt.is_dir:
            kind = "a symlink" if stat.S_ISLNK(nxt.mode) else "not a directory"
            path = b"/".join(parts[: i + 1]).decode("utf-8", "replace")
            raise BadInputError(f"{where}: member {name!r} would be written through {path!r}, which is {kind}")
        node = nxt
    return node


def is_tarball(path: str) -> bool:
    if os.path.isdir(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if head[:4] == _ZSTD_MAGIC or head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return True
    return tarfile.is_tarfile(path)
