"""The FUSE wire protocol: the message layouts of ``linux/fuse.h`` that cubefs speaks.

A FUSE request is a 40-byte ``fuse_in_header`` followed by an operation's
argument struct (and, for some, NUL-terminated names); a reply is a 16-byte
``fuse_out_header`` (length, negative errno, the request's ``unique``)
followed by the operation's result struct.  The same messages travel over
``/dev/fuse`` (:mod:`cubefs.fuse.kernel`) and over a virtio-fs queue, so this
module knows nothing about either.

We answer INIT with protocol 7.31 at most: every struct below has its 7.31
size, and nothing newer (extension headers, STATX) is ever sent to us.
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
MAX_MINOR = 31  # what we implement; the kernel then speaks exactly this
MIN_MINOR = 27  # 4.18+: everything below is laid out as here

ROOT_ID = 1

# Opcodes (the ones we answer or must know not to answer).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
IOCTL = 39

OPCODE_NAMES = {
    1: "lookup", 2: "forget", 3: "getattr", 4: "setattr", 5: "readlink", 6: "symlink", 8: "mknod",
    9: "mkdir", 10: "unlink", 11: "rmdir", 12: "rename", 13: "link", 14: "open", 15: "read",
    16: "write", 17: "statfs", 18: "release", 20: "fsync", 21: "setxattr", 22: "getxattr",
    23: "listxattr", 24: "removexattr", 25: "flush", 26: "init", 27: "opendir", 28: "readdir",
    29: "releasedir", 30: "fsyncdir", 31: "getlk", 32: "setlk", 33: "setlkw", 34: "access",
    35: "create", 36: "interrupt", 37: "bmap", 38: "destroy", 39: "ioctl", 40: "poll",
    41: "notify_reply", 42: "batch_forget", 43: "fallocate", 44: "readdirplus", 45: "rename2",
    46: "lseek", 47: "copy_file_range", 48: "setupmapping", 49: "removemapping", 50: "syncfs",
    51: "tmpfile", 52: "statx",
}

# INIT flags (fuse_init_in.flags / fuse_init_out.flags).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28  # the server clears suid/sgid/caps on write, truncate, chown (7.33; no struct changes)
INIT_EXT = 1 << 30  # our INIT reply carries flags2 (the kernel reads it whatever minor we answer)
# In fuse_init_in.flags2 (bit 32 and up of the 64 flags; 7.36+ kernels send it, whatever we answer).
HAS_RESEND = 1 << 39  # Linux 6.9: the kernel takes NOTIFY_RESEND (see kernel.KernelSession.adopt)
PASSTHROUGH = 1 << 37  # Linux 6.9 (7.40): OPEN may name a backing file the kernel reads itself
OVER_IO_URING = 1 << 41  # Linux 6.14: requests through io_uring ring entries (cubefs.fuse.uring)

# fuse_write_in.write_flags
WRITE_KILL_SUIDGID = 1 << 2  # with HANDLE_KILLPRIV_V2: the writer lacks CAP_FSETID

# fuse_open_out.open_flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7  # with a backing_id; the kernel refuses (EIO) KEEP_CACHE beside it

# ioctls on /dev/fuse (Linux 6.9): register a backing file (needs CAP_SYS_ADMIN in the
# daemon's user namespace) -> a backing id, and drop one.  _IOW(229, 1|2, ...)
DEV_IOC_BACKING_OPEN = 0x4010E501  # struct fuse_backing_map (16 bytes)
DEV_IOC_BACKING_CLOSE = 0x4004E502  # uint32 backing id
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 max_stack_depth unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # times are signed: before 1970 is negative
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec); then ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy; then ATTR
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id (padding before 7.40)
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
GETXATTR_IN = struct.Struct("<II")  # size padding; then name\0
GETXATTR_OUT = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
INTERRUPT_IN = struct.Struct("<Q")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
DIRENT = struct.Struct("<QQII")  # ino off namelen type; then name, padded to 8 bytes
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy; then count x FORGET_ONE
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # times are signed, as in ATTR
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding; then name\0
MKDIR_IN = struct.Struct("<II")  # mode umask; then name\0
RENAME_IN = struct.Struct("<Q")  # newdir; then oldname\0 newname\0
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding; then oldname\0 newname\0
LINK_IN = struct.Struct("<Q")  # oldnodeid; then newname\0
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags; then name\0
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding; then data
WRITE_OUT = struct.Struct("<II")  # size padding
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("<II")  # size flags; then name\0 value
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7  # no payload: requeue every request read from the device and not yet answered
UNIQUE_RESEND = 1 << 63  # set in the unique of a request the kernel sends again
INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino offset length
INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen padding; then name\0

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and INIT_OUT.size == 64
assert ATTR.size == 88 and ENTRY_OUT.size + ATTR.size == 128 and KSTATFS.size == 80


def reply(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_parts(unique: int, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A reply as buffers for one writev: the header, then ``parts`` uncopied."""
    size = OUT_HEADER.size + sum(len(x) for x in parts)
    return [OUT_HEADER.pack(size, 0, unique), *parts]


def error_reply(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def dirent(ino: int, next_off: int, name: bytes, dtype: int) -> bytes:
    rec = DIRENT.pack(ino, next_off, len(name), dtype) + name
    return rec + b"\0" * (-len(rec) % 8)


def notify(code: int, payload: bytes) -> bytes:
    """An unsolicited message to the kernel: unique 0, the notification code as the error."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload


def resend() -> bytes:
    """Ask the kernel to send again what a daemon read and never answered (a daemon that
    died: its replacement on the same ``/dev/fuse`` descriptor sends this first)."""
    return notify(NOTIFY_RESEND, b"")


def inval_inode(ino: int) -> bytes:
    """Drop the kernel's cached attributes and pages of ``ino``."""
    return notify(NOTIFY_INVAL_INODE, INVAL_INODE_OUT.pack(ino, 0, 0))


def inval_entry(parent: int, name: bytes) -> bytes:
    """Drop the kernel's cached lookup of ``name`` in ``parent``."""
    return notify(NOTIFY_INVAL_ENTRY, INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0")


def cstrings(body: bytes | memoryview, start: int = 0) -> tuple[bytes, bytes]:
    """The two NUL-terminated strings at ``start`` (RENAME, SYMLINK)."""
    raw = bytes(body[start:])
    a, _, rest = raw.partition(b"\0")
    return a, rest.partition(b"\0")[0]


def cstring(body: bytes | memoryview, start: int = 0) -> bytes:
    """The NUL-terminated string at ``start`` of a request body."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]
