"""The node's disk cache (LMDB): bounded, shared by processes, damage-tolerant."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from conftest import mounted, run_cubefs

from cubefs.cache.disk import DiskCache, StoredChunk
from cubefs.errors import FormatVersionError


def _chunk(n: int = 100_000) -> tuple[bytes, StoredChunk]:
    data = os.urandom(n)
    return hashlib.sha256(data).digest(), StoredChunk(0, n, data)


def test_bounded_and_survives_restart(tmp_path: Path) -> None:
    cache = DiskCache(str(tmp_path), max_bytes=450_000)
    chunks = [_chunk() for _ in range(4)]
    cache.put_many(chunks)
    assert cache.used_bytes <= 450_000 and len(cache.digests()) == 4
    cache.put_many([_chunk()])
    kept = set(cache.digests())
    assert chunks[0][0] not in kept  # first in, first out of probation
    assert cache.used_bytes <= 450_000
    cache.close()
    again = DiskCache(str(tmp_path), max_bytes=450_000)
    assert set(again.digests()) == kept
    assert again.get_many([chunks[3][0]])[chunks[3][0]].data == chunks[3][1].data
    assert again.trim(0) > 0 and again.digests() == [] and again.used_bytes == 0
    again.close()


def test_a_one_off_scan_does_not_flush_what_is_in_use(tmp_path: Path) -> None:
    """S3-FIFO's point: chunks read again (a start-up's shared base) survive an
    agent streaming a dataset twice the size of the cache through it once."""
    cache = DiskCache(str(tmp_path), max_bytes=1_000_000)
    hot = [_chunk(50_000) for _ in range(6)]
    cache.put_many(hot)
    for _ in range(2):
        assert len(cache.get_many([d for d, _ in hot])) == 6
    for _ in range(40):  # 2 MB, each chunk once
        cache.put_many([_chunk(50_000)])
    assert cache.used_bytes <= 1_000_000
    assert set(d for d, _ in hot) <= set(cache.digests())
    # A chunk evicted from probation and asked for again comes back into main.
    info = cache.info()
    assert int(info["ghost_entries"]) > 0
    cache.close()


def test_limit_holds_under_a_workload_bigger_than_the_cache(tmp_path: Path) -> None:
    """30 MB through a 5 MB cache: the accounted bytes and the file itself stay bounded."""
    cache = DiskCache(str(tmp_path), max_bytes=5_000_000)
    for _ in range(30):
        cache.put_many([_chunk(50_000) for _ in range(20)])
        hot = cache.digests()[:5]
        cache.get_many(hot)
    info = cache.info()
    assert int(info["used_bytes"]) <= 5_000_000
    assert int(info["file_bytes"]) <= 3 * 5_000_000, info  # LMDB reuses freed pages
    assert int(info["entries"]) * 50_000 <= 5_000_000
    cache.close()


_WRITER = """
import hashlib, os, sys
from cubefs.cache.disk import DiskCache, StoredChunk
cache = DiskCache(sys.argv[1], 3_000_000)
for _ in range(40):
    items = []
    for _ in range(10):
        data = os.urandom(20_000)
        items.append((hashlib.sha256(data).digest(), StoredChunk(0, len(data), data)))
    cache.put_many(items)
    cache.get_many([d for d, _ in items[:3]])
cache.close()
"""


def test_processes_share_one_cache(tmp_path: Path) -> None:
    """Three processes write 8 MB each into one 3 MB cache at the same time: the
    limit holds and every entry left is intact (LMDB serializes the writers)."""
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    cache = DiskCache(str(tmp_path), 3_000_000)
    digests = cache.digests()
    assert digests and cache.used_bytes <= 3_000_000
    found = cache.get_many(digests)
    assert len(found) == len(digests)
    assert all(hashlib.sha256(c.data).digest() == d for d, c in found.items())
    assert cache.stats.errors == 0
    cache.close()


def test_a_flipped_bit_on_disk_is_a_miss_and_the_entry_goes(tmp_path: Path) -> None:
    cache = DiskCache(str(tmp_path), 10_000_000)
    digest, chunk = _chunk()
    cache.put_many([(digest, chunk)])
    cache.close()
    data_file = tmp_path / "chunks.lmdb" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    at = raw.find(chunk.data[5000:5064])
    assert at > 0
    raw[at] ^= 0x10
    data_file.write_bytes(bytes(raw))
    cache = DiskCache(str(tmp_path), 10_000_000)
    assert cache.get_many([digest]) == {}
    assert cache.stats.errors == 1 and cache.digests() == []
    cache.close()


def test_garbage_cache_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "chunks.lmdb").mkdir()
    (tmp_path / "chunks.lmdb" / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    cache = DiskCache(str(tmp_path), 1_000_000)
    digest, chunk = _chunk()
    cache.put_many([(digest, chunk)])
    assert digest in cache.get_many([digest])
    assert [p.name for p in tmp_path.iterdir() if ".bad-" in p.name]
    cache.close()


def _set_version(tmp_path: Path, version: int) -> None:
    env = lmdb.open(str(tmp_path / "chunks.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"version", version.to_bytes(4, "little"), db=env.open_db(b"meta", txn=txn))
    env.close()


def test_newer_cache_version_is_refused_older_is_set_aside(tmp_path: Path) -> None:
    DiskCache(str(tmp_path), 1_000_000).close()
    _set_version(tmp_path, 99)
    with pytest.raises(FormatVersionError, match="format version 99 is not supported"):
        DiskCache(str(tmp_path), 1_000_000)
    _set_version(tmp_path, 1)  # an older cubefs's cache: disposable
    cache = DiskCache(str(tmp_path), 1_000_000)
    assert cache.digests() == []
    assert [p.name for p in tmp_path.iterdir() if ".bad-" in p.name]
    cache.close()


def test_full_disk_makes_the_cache_smaller_not_reads_fail(tmp_path: Path) -> None:
    """The cache on a 1 MiB tmpfs: puts beyond it fail quietly, counted; what was
    stored stays readable."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    try:
        cache = DiskCache(str(small), 100_000_000, reserve=0)  # no reserve: the disk itself fills
        first = _chunk(200_000)
        assert cache.put_many([first]) == 1
        for _ in range(10):
            cache.put_many([_chunk(200_000)])
        assert cache.stats.not_cached >= 1 and cache.stats.quarantined == 0
        assert cache.get_many([first[0]])[first[0]].data == first[1].data
        cache.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_mounts_share_the_node_cache_and_the_cli_manages_it(tmp_path: Path) -> None:
    """Two mounts of one image at once, one --cache-dir: what the first fetched, the
    second reads from disk.  ``cubefs cache`` shows, trims and clears it while they run."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3_000_000))
    store = f"file://{tmp_path / 'store'}"
    cache = tmp_path / "cache"
    run_cubefs("build", str(src), "--tag", "shared:1", "--store", store)
    with mounted("shared:1", tmp_path / "a", store, cache) as a, mounted("shared:1", tmp_path / "b", store, cache) as b:
        assert (tmp_path / "a" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        time.sleep(0.5)  # disk writes happen off the read path
        assert (tmp_path / "b" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        stats_b = b.stats()
        tiers_b = stats_b["tiers"]
        # from the disk cache, or (FUSE passthrough) from the local copy the first mount wrote
        local = tiers_b["disk"]["hits"] + (stats_b.get("passthrough") or {}).get("passthrough_opens", 0)
        assert tiers_b["store"]["requests"] == 0 and local >= 1, stats_b
        assert a.stats()["tiers"]["store"]["requests"] >= 1
        info = json.loads(run_cubefs("cache", "stats", "--cache-dir", str(cache), "--json").stdout)
        assert info["entries"] >= 10 and 3_000_000 <= info["used_bytes"] < 4_000_000, info
        trimmed = json.loads(run_cubefs("cache", "trim", "--to", "1M", "--cache-dir", str(cache), "--json").stdout)
        assert trimmed["used_bytes"] <= 1 << 20 and trimmed["freed_bytes"] >= info["used_bytes"] - (1 << 20)
        cleared = json.loads(run_cubefs("cache", "clear", "--cache-dir", str(cache), "--json").stdout)
        assert cleared["entries"] == 0 and cleared["used_bytes"] == 0
    res = run_cubefs("cache", "trim", "--cache-dir", str(cache), check=False)
    assert res.returncode == 2 and "--to" in res.stderr
    res = run_cubefs("cache", "stats", "--cache-dir", str(tmp_path / "nowhere"), check=False)
    assert res.returncode == 3 and "no disk cache" in res.stderr
