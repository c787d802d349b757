"""The in-memory tree a build assembles before it is encoded as an image.

Sources (a directory walk, a tar stream, later OCI layers) add nodes in
whatever order they meet them; :func:`number_tree` then assigns inode numbers
depth first in byte-sorted name order, so the encoding depends only on the
tree, never on the order of the input.  A hard link is one :class:`Node`
reachable under several names; its ``nlink`` is counted here, not trusted
from the source.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Protocol

from cubefs.format.image import InodeSpec


class ChunkBatch(Protocol):
    """Chunks of one file queued together; ``result()`` waits until a worker has
    hashed them and gives their (file offset, digest, plaintext length)."""

    def result(self) -> list[tuple[int, bytes, int]]: ...


@dataclass(eq=False)
class Node:
    mode: int
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    size: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    target: bytes | None = None
    children: dict[bytes, Node] | None = None
    extents: list[ChunkBatch] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def new_dir(mode: int = stat.S_IFDIR | 0o755, mtime_ns: int = 0) -> Node:
    return Node(mode=mode, atime_ns=mtime_ns, mtime_ns=mtime_ns, ctime_ns=mtime_ns, children={})


@dataclass
class NumberedTree:
    inodes: list[InodeSpec]
    chunks: list[tuple[bytes, int]]  # chunk table: (digest, plaintext length), first use order
    logical_bytes: int
    files: int


def number_tree(root: Node) -> NumberedTree:
    """Assign inode numbers and chunk-table indices; waits for pending chunks."""
    order: list[Node] = []
    ino_of: dict[int, int] = {}
    links: dict[int, int] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        key = id(node)
        links[key] = links.get(key, 0) + 1
        if key in ino_of:
            continue
        ino_of[key] = len(order) + 1
        order.append(node)
        if node.children is not None:
            for name in sorted(node.children, reverse=True):
                stack.append(node.children[name])

    chunk_index: dict[bytes, int] = {}
    chunks: list[tuple[bytes, int]] = []
    inodes: list[InodeSpec] = []
    logical = files = 0
    for node in order:
        spec = InodeSpec(
            mode=node.mode,
            uid=node.uid,
            gid=node.gid,
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
            rdev=node.rdev,
            xattrs=sorted(node.xattrs),
            nlink=links[id(node)],
        )
        if node.children is not None:
            spec.entries = [(name, ino_of[id(node.children[name])]) for name in sorted(node.children)]
            spec.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
            spec.size = 4096
        elif stat.S_ISLNK(node.mode):
            spec.target = node.target or b""
            spec.size = len(spec.target)
        elif stat.S_ISREG(node.mode):
            files += 1
            spec.size = node.size
            logical += node.size
            extents = []
            for pending in node.extents:
                for off, digest, ulen in pending.result():
                    idx = chunk_index.get(digest)
                    if idx is None:
                        idx = chunk_index[digest] = len(chunks)
                        chunks.append((digest, ulen))
                    extents.append((off, idx))
            spec.extents = extents
        inodes.append(spec)
    return NumberedTree(inodes, chunks, logical, files)
