"""Measure FastCDC chunk-size trade-offs on real root filesystems.

Why this exists: the block-deduplicated container image format cuts every
regular file with FastCDC and stores each unique chunk as its own zstd frame,
addressed by the SHA-256 of its plaintext.  The average chunk size is a format
constant that is hard to change later, so it is chosen by measurement rather
than by folklore: smaller chunks find more duplicate data (within an image and
across image versions) but compress worse, and every chunk costs a manifest
record (~60 bytes) plus one index entry.  This script quantifies that
trade-off on actual root filesystem trees.

For each directory given on the command line (a "corpus") it walks the tree
without following symlinks or crossing mount points, reads every regular file
once (hard-linked inodes count once, as in a tar/OCI layer) and, for each
average size (min = avg/4, max = avg*4) plus a one-chunk-per-file baseline,
reports chunk counts, unique chunks, logical/unique bytes, the zstd-compressed
size of the unique chunks (each chunk compressed on its own, as the format
stores them), median/mean chunk size and single-thread chunk+SHA-256 throughput
(CPU time of the chunking thread; file reading and compression excluded).
When two or more corpora are given it also reports, for every pair, how much
they share: unique stored bytes of both together versus each one alone.

Usage (from the repository root)::

    .venv/bin/python tools/bench/chunk_sizes.py /var/tmp/cubefs-test/rootfs.tmp /usr

Only reads the given trees; writes nothing but the report on stdout (progress
goes to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import statistics
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyfastcdc
import zstandard

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
DEFAULT_AVG_KIB = (16, 32, 64, 128, 256)
WHOLE_FILE = 0  # avg size sentinel for the one-chunk-per-file baseline


@dataclass
class ConfigStats:
    """Accumulated results of one chunking configuration over one corpus."""

    avg: int
    min_size: int
    max_size: int
    chunker: pyfastcdc.FastCDC | None
    chunks: int = 0
    logical: int = 0
    cpu_seconds: float = 0.0
    lengths: array[int] = field(default_factory=lambda: array("Q"))
    unique_len: dict[bytes, int] = field(default_factory=dict)
    unique_zstd: dict[bytes, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human-readable name of the configuration."""
        return "whole file" if self.avg == WHOLE_FILE else f"{self.avg // KIB} KiB"

    @property
    def unique_bytes(self) -> int:
        """Plaintext bytes that must be stored once after deduplication."""
        return sum(self.unique_len.values())

    @property
    def zstd_bytes(self) -> int:
        """Bytes stored after compressing every unique chunk separately."""
        return sum(self.unique_zstd.values())


@dataclass
class CorpusStats:
    """Results for one root filesystem tree."""

    root: str
    configs: list[ConfigStats]
    files: int = 0
    empty_files: int = 0
    skipped: int = 0
    wall_seconds: float = 0.0


_tls = threading.local()


def _compressed_sizes(views: Sequence[memoryview], level: int) -> list[int]:
    """Compress each view as an independent zstd frame and return the sizes."""
    cctx: zstandard.ZstdCompressor | None = getattr(_tls, "cctx", None)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=level)
        _tls.cctx = cctx
    return [len(cctx.compress(v)) for v in views]


def iter_regular_files(root: bytes, stats: CorpusStats) -> Iterator[bytes]:
    """Yield regular files under root.

    Symlinks are not followed, mount points are not crossed and a hard-linked
    inode is yielded once.
    """
    root_dev = os.lstat(root).st_dev
    seen_inodes: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError as exc:
            print(
                f"warning: cannot list {exc.filename!r}: {exc.strerror}",
                file=sys.stderr,
            )
            stats.skipped += 1
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.stat(follow_symlinks=False).st_dev == root_dev:
                        stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        if key in seen_inodes:
                            continue
                        seen_inodes.add(key)
                    yield entry.path
            except OSError:
                stats.skipped += 1


def read_regular_file(path: bytes) -> bytes | None:
    """Return the file's contents, refusing to follow a symlink swapped in meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError:
            return None


def make_configs(avg_kib: Sequence[int]) -> list[ConfigStats]:
    """Build one FastCDC configuration per average size, plus the baseline."""
    configs = []
    for kib in avg_kib:
        avg = kib * KIB
        lo, hi = avg // 4, avg * 4
        chunker = pyfastcdc.FastCDC(avg, min_size=lo, max_size=hi)
        configs.append(ConfigStats(avg=avg, min_size=lo, max_size=hi, chunker=chunker))
    configs.append(ConfigStats(avg=WHOLE_FILE, min_size=0, max_size=0, chunker=None))
    return configs


def scan_corpus(
    root: str,
    avg_kib: Sequence[int],
    level: int,
    pool: ThreadPoolExecutor,
    inflight_limit: int,
) -> CorpusStats:
    """Chunk, hash and compress every regular file of one tree, all configurations."""
    stats = CorpusStats(root=root, configs=make_configs(avg_kib))
    pending: deque[tuple[ConfigStats, list[bytes], Future[list[int]], int]] = deque()
    pending_bytes = 0

    def drain(limit: int) -> None:
        nonlocal pending_bytes
        while pending and pending_bytes > limit:
            cfg, digests, fut, nbytes = pending.popleft()
            cfg.unique_zstd.update(zip(digests, fut.result(), strict=True))
            pending_bytes -= nbytes

    started = time.monotonic()
    next_report = GIB
    total = 0
    for path in iter_regular_files(os.fsencode(root), stats):
        data = read_regular_file(path)
        if data is None:
            stats.skipped += 1
            continue
        stats.files += 1
        if not data:
            stats.empty_files += 1
            continue
        total += len(data)
        whole = memoryview(data)
        for cfg in stats.configs:
            t0 = time.thread_time()
            if cfg.chunker is None:
                pieces = [(whole, hashlib.sha256(whole).digest())]
            else:
                pieces = [(c.data, hashlib.sha256(c.data).digest()) for c in cfg.chunker.cut_buf(whole)]
            cfg.cpu_seconds += time.thread_time() - t0
            new_digests: list[bytes] = []
            new_views: list[memoryview] = []
            for view, digest in pieces:
                size = len(view)
                cfg.chunks += 1
                cfg.logical += size
                cfg.lengths.append(size)
                if digest not in cfg.unique_len:
                    cfg.unique_len[digest] = size
                    new_digests.append(digest)
                    new_views.append(view)
            if new_views:
                nbytes = sum(len(v) for v in new_views)
                pending.append(
                    (
                        cfg,
                        new_digests,
                        pool.submit(_compressed_sizes, new_views, level),
                        nbytes,
                    )
                )
                pending_bytes += nbytes
        drain(inflight_limit)
        if total >= next_report:
            elapsed = time.monotonic() - started
            print(
                f"  {root}: {total / GIB:.1f} GiB, {stats.files} files, {elapsed:.0f} s",
                file=sys.stderr,
            )
            next_report += GIB
    drain(-1)
    stats.wall_seconds = time.monotonic() - started
    return stats


def mib(n: float) -> str:
    """Format a byte count in MiB."""
    return f"{n / MIB:,.1f}"


def pct(part: float, whole: float) -> str:
    """Format a ratio as a percentage."""
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a markdown table, right-aligning every column but the first."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def report_corpus(stats: CorpusStats, meta_bytes: int, level: int) -> None:
    """Print the per-configuration markdown table of one corpus."""
    logical = stats.configs[0].logical
    baseline = stats.configs[-1]
    base_total = baseline.zstd_bytes + meta_bytes * baseline.chunks
    print(f"### Corpus `{stats.root}`")
    print()
    print(
        f"{stats.files:,} regular files ({stats.empty_files:,} empty, "
        f"{stats.skipped:,} skipped), "
        f"{mib(logical)} MiB logical, scanned in {stats.wall_seconds:.0f} s. "
        f"zstd level {level}, one frame per unique chunk; "
        f"meta = {meta_bytes} B x chunks."
    )
    print()
    header = [
        "avg",
        "min/max",
        "chunks",
        "unique chunks",
        "logical MiB",
        "unique MiB",
        "dedup saved",
        "zstd unique MiB",
        "zstd/logical",
        "meta MiB",
        "zstd+meta MiB",
        "vs whole file",
        "median",
        "mean",
        "chunk+hash MB/s",
    ]
    rows = []
    for cfg in stats.configs:
        unique = cfg.unique_bytes
        zstd_bytes = cfg.zstd_bytes
        meta = meta_bytes * cfg.chunks
        total = zstd_bytes + meta
        median = statistics.median(cfg.lengths) if cfg.lengths else 0
        mean = cfg.logical / cfg.chunks if cfg.chunks else 0
        limits = "-" if cfg.chunker is None else f"{cfg.min_size // KIB}/{cfg.max_size // KIB} KiB"
        rate = cfg.logical / 1e6 / cfg.cpu_seconds if cfg.cpu_seconds else 0.0
        rows.append(
            [
                cfg.label,
                limits,
                f"{cfg.chunks:,}",
                f"{len(cfg.unique_len):,}",
                mib(cfg.logical),
                mib(unique),
                pct(cfg.logical - unique, cfg.logical),
                mib(zstd_bytes),
                pct(zstd_bytes, cfg.logical),
                mib(meta),
                mib(total),
                f"{100.0 * (total - base_total) / base_total:+.1f}%" if base_total else "-",
                f"{median / KIB:.1f} KiB",
                f"{mean / KIB:.1f} KiB",
                f"{rate:,.0f}",
            ]
        )
    print_table(header, rows)


def report_pair(a: CorpusStats, b: CorpusStats) -> None:
    """Print how much two corpora share when stored in one chunk store."""
    print(f"### Union `{a.root}` (A) + `{b.root}` (B)")
    print()
    print(
        "A+B = two separate stores; union = one shared store. "
        "'A new given B' is what storing A costs when B is already stored."
    )
    print()
    header = [
        "avg",
        "A unique MiB",
        "B unique MiB",
        "union unique MiB",
        "shared MiB",
        "A zstd MiB",
        "B zstd MiB",
        "A+B zstd MiB",
        "union zstd MiB",
        "saved by sharing",
        "A new given B (zstd MiB)",
        "B new given A (zstd MiB)",
        "union unique chunks",
    ]
    rows = []
    for ca, cb in zip(a.configs, b.configs, strict=True):
        shared = ca.unique_len.keys() & cb.unique_len.keys()
        shared_bytes = sum(ca.unique_len[d] for d in shared)
        shared_zstd = sum(ca.unique_zstd[d] for d in shared)
        ua, ub = ca.unique_bytes, cb.unique_bytes
        za, zb = ca.zstd_bytes, cb.zstd_bytes
        z_union = za + zb - shared_zstd
        rows.append(
            [
                ca.label,
                mib(ua),
                mib(ub),
                mib(ua + ub - shared_bytes),
                mib(shared_bytes),
                mib(za),
                mib(zb),
                mib(za + zb),
                mib(z_union),
                pct(za + zb - z_union, za + zb),
                f"{mib(z_union - zb)} ({pct(z_union - zb, za)})",
                f"{mib(z_union - za)} ({pct(z_union - za, zb)})",
                f"{len(ca.unique_len) + len(cb.unique_len) - len(shared):,}",
            ]
        )
    print_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="root filesystem directories to measure")
    parser.add_argument(
        "--avg-kib",
        type=int,
        nargs="+",
        default=list(DEFAULT_AVG_KIB),
        help="FastCDC average sizes in KiB (min = avg/4, max = avg*4); default: %(default)s",
    )
    parser.add_argument("--level", type=int, default=3, help="zstd level (default: %(default)s)")
    parser.add_argument(
        "--meta-bytes",
        type=int,
        default=60,
        help="metadata bytes per chunk reference (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="compression threads (default: CPU count - 1, %(default)s)",
    )
    parser.add_argument(
        "--inflight-mib",
        type=int,
        default=512,
        help="max MiB of chunks queued for compression (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    for root in args.roots:
        if not Path(root).is_dir():
            parser.error(f"not a directory: {root}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Scan every corpus, then print per-corpus and pairwise tables."""
    args = parse_args(argv)
    corpora: list[CorpusStats] = []
    with ThreadPoolExecutor(max_workers=max(1, args.threads)) as pool:
        for root in args.roots:
            print(f"scanning {root} ...", file=sys.stderr)
            corpora.append(scan_corpus(root, args.avg_kib, args.level, pool, args.inflight_mib * MIB))
    print(f"## FastCDC chunk size sweep (pyfastcdc {pyfastcdc.__version__}, zstandard {zstandard.__version__})")
    print()
    for stats in corpora:
        report_corpus(stats, args.meta_bytes, args.level)
    for a, b in itertools.combinations(corpora, 2):
        report_pair(a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
