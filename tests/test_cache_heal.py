"""A damaged or full disk cache costs a miss, never a read: the damaged one is set
aside and a fresh one started, under a running mount too; a full filesystem stops
the caching, not the serving; ``cubefs cache`` works on either."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted, run_cubefs, small_tmpfs

from cubefs.cache.disk import DiskCache, StoredChunk

PAGE = 4096


def _chunks(n: int, size: int = 3000) -> list[tuple[bytes, StoredChunk]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((hashlib.sha256(data).digest(), StoredChunk(0, size, data)))
    return out


def _damage(data_file: Path, how: str) -> None:
    """Damage a cache file as a bad disk or a bad day would, in place (a running
    process that maps it sees the change)."""
    with open(data_file, "r+b") as f:
        raw = f.read()
        if how == "branch":  # every branch page's child pointers point past the end
            hit = 0
            for page in range(2, len(raw) // PAGE):
                base = page * PAGE
                if struct.unpack_from("<H", raw, base + 10)[0] != 0x01:
                    continue
                lower = struct.unpack_from("<H", raw, base + 12)[0]
                for i in range((lower - 16) // 2):
                    node = struct.unpack_from("<H", raw, base + 16 + 2 * i)[0]
                    f.seek(base + node + 3)
                    f.write(b"\x7f")
                hit += 1
            assert hit, "no branch page to damage"
        elif how == "meta":  # both meta pages overwritten past their header
            for base in (0, PAGE):
                f.seek(base + 16)
                f.write(os.urandom(200))
        elif how == "last-page":  # a meta page that names pages past the end: LMDB would SIGBUS
            for base in (0, PAGE):
                f.seek(base + 136)
                f.write(struct.pack("<Q", len(raw) // PAGE * 4))
        elif how == "truncate":
            f.truncate(len(raw) // 2)
        else:
            raise ValueError(how)


@pytest.mark.parametrize("how", ["branch", "meta", "last-page", "truncate"])
def test_an_open_cache_damaged_is_a_miss_and_starts_afresh(tmp_path: Path, how: str) -> None:
    cache = DiskCache(str(tmp_path), 1 << 30)
    items = _chunks(400)  # enough keys for branch pages
    assert cache.put_many(items) == 400
    _damage(tmp_path / "chunks.lmdb" / "data.mdb", how)
    assert cache.get_many([d for d, _ in items]) == {}  # no exception, no SIGBUS: misses
    assert cache.stats.quarantined == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("chunks.lmdb.bad-")]
    assert len(aside) == 1
    assert cache.put_many(items[:5]) == 5  # the fresh one works
    assert len(cache.get_many([d for d, _ in items])) == 5
    assert cache.info()["quarantined_total"] == 1
    cache.close()
    again = DiskCache(str(tmp_path), 1 << 30)  # and opens again
    assert len(again.digests()) == 5 and again.stats.quarantined == 0
    again.close()


_OTHER = """
import sys, time
from cubefs.cache.disk import DiskCache
cache = DiskCache(sys.argv[1], 1 << 30)
print(len(cache.digests()), flush=True)
sys.stdin.readline()  # the test damages and heals the cache meanwhile
print(len(cache.digests()), cache.stats.quarantined, flush=True)
cache.close()
"""


def test_another_process_follows_to_the_fresh_cache(tmp_path: Path) -> None:
    """Two processes share a cache; one finds it damaged and sets it aside.  The
    other moves to the fresh one at its next call, without setting it aside again."""
    cache = DiskCache(str(tmp_path), 1 << 30)
    items = _chunks(400)
    cache.put_many(items)
    other = subprocess.Popen([sys.executable, "-c", _OTHER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "400"
        _damage(tmp_path / "chunks.lmdb" / "data.mdb", "branch")
        assert cache.get_many([d for d, _ in items]) == {} and cache.stats.quarantined == 1
        cache.put_many(items[:3])
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().split() == ["3", "0"]
    finally:
        other.wait(timeout=30)
        cache.close()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("chunks.lmdb.bad-")]) == 1


def test_an_old_world_readable_cache_is_made_private(tmp_path: Path) -> None:
    cache = DiskCache(str(tmp_path / "c"), 1 << 20)
    cache.put_many(_chunks(2))
    cache.close()
    env = tmp_path / "c" / "chunks.lmdb"
    os.chmod(tmp_path / "c", 0o755)
    os.chmod(env, 0o755)
    for f in env.iterdir():
        os.chmod(f, 0o644)
    DiskCache(str(tmp_path / "c"), 1 << 20).close()
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(env).st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in env.iterdir()} == {0o600}


# -- under a running mount -----------------------------------------------------------------------


@pytest.fixture
def many_files(tmp_path: Path, local_store: str) -> tuple[Path, str]:
    """An image of 500 small files: 500 chunks, so the cache's tree has branch pages."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(500):
        (src / f"f{i:03d}").write_bytes(os.urandom(2000 + i))
    run_cubefs("build", str(src), "--tag", "many:1", "--store", local_store)
    return src, local_store


def _read_all(mnt: Path, src: Path) -> None:
    for f in sorted(src.iterdir()):
        assert (mnt / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("how", ["branch", "meta", "last-page", "truncate"])
def test_damage_under_a_running_mount_costs_misses_not_reads(tmp_path: Path, many_files: tuple[Path, str],
                                                             how: str) -> None:
    src, store = many_files
    cache = tmp_path / "cache"
    with mounted("many:1", tmp_path / "warm", store, cache):
        _read_all(tmp_path / "warm", src)
        time.sleep(0.5)  # disk writes happen off the read path
    # --no-prefetch: the first mount published its trace, and prefetching it would
    # load every chunk before the damage below.
    with mounted("many:1", tmp_path / "mnt", store, cache, "--no-prefetch") as m:
        _damage(cache / "chunks.lmdb" / "data.mdb", how)
        _read_all(tmp_path / "mnt", src)  # every byte right, from the store
        stats = m.stats()
        disk = stats["tiers"]["disk"]
        assert stats["read_errors"] == 0 and disk["quarantined"] == 1, stats
        assert stats["tiers"]["store"]["hits"] >= 1
        text = run_cubefs("stats", str(tmp_path / "mnt")).stdout
        assert "1 damaged caches set aside" in text
        metrics = run_cubefs("stats", str(tmp_path / "mnt"), "--prometheus").stdout
        assert 'cubefs_cache_quarantined{' in metrics and 'tier="disk"} 1' in metrics
    logs = "".join(p.read_text() for p in (cache / "logs").iterdir())
    assert f"disk cache {cache} is damaged" in logs and "set aside as chunks.lmdb.bad-" in logs
    with mounted("many:1", tmp_path / "mnt", store, cache) as m:  # remount: the fresh cache serves
        _read_all(tmp_path / "mnt", src)
        time.sleep(0.5)
        assert m.stats()["tiers"]["disk"]["quarantined"] == 0
    res = run_cubefs("cache", "clear", "--cache-dir", str(cache), "--json")
    cleared = json.loads(res.stdout)
    assert cleared["entries"] == 0 and cleared["quarantined_bytes"] == 0
    assert not [p for p in cache.iterdir() if ".bad-" in p.name]


def test_cache_commands_on_a_damaged_cache(tmp_path: Path) -> None:
    for action in (["stats"], ["trim", "--to", "1M"], ["clear"]):
        cache = DiskCache(str(tmp_path), 1 << 30)
        cache.put_many(_chunks(400))
        cache.close()
        _damage(tmp_path / "chunks.lmdb" / "data.mdb", "truncate")
        res = run_cubefs("cache", *action, "--cache-dir", str(tmp_path), check=False)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        assert "damaged: set aside and started afresh" in res.stdout


# -- a full filesystem ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    yield from small_tmpfs(tmp_path / "small", "20m")


def test_the_cache_stops_at_its_reserve_and_reads_go_on(tmp_path: Path, local_store: str, small_fs: Path) -> None:
    """A 20 MiB filesystem, a 24 MiB image, a 40% reserve: the cache stops caching
    when 8 MiB are left free, every read still succeeds, ``cache trim`` works."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(2 << 20))
    run_cubefs("build", str(src), "--tag", "big:1", "--store", local_store)
    cache = small_fs / "cache"
    with mounted("big:1", tmp_path / "mnt", local_store, cache, "--cache-reserve", "40%") as m:
        for f in sorted(src.iterdir()):
            assert (tmp_path / "mnt" / f.name).read_bytes() == f.read_bytes()
        time.sleep(0.5)
        st = os.statvfs(small_fs)
        free = st.f_bavail * st.f_frsize
        assert free >= 0.4 * st.f_blocks * st.f_frsize - (2 << 20), free  # at most one batch past it
        stats = m.stats()
        assert stats["read_errors"] == 0 and stats["tiers"]["disk"]["not_cached"] > 0, stats
        assert stats["tiers"]["disk"]["quarantined"] == 0
        res = run_cubefs("cache", "stats", "--cache-dir", str(cache), "--json")
        assert json.loads(res.stdout)["used_bytes"] > 4 << 20, res.stdout  # it did cache, up to the reserve
        res = run_cubefs("cache", "trim", "--to", "1M", "--cache-dir", str(cache), "--json")
        trimmed = json.loads(res.stdout)
        assert trimmed["used_bytes"] <= 1 << 20 and trimmed["freed_bytes"] > 3 << 20
        for f in sorted(src.iterdir())[:2]:  # still serving
            assert (tmp_path / "mnt" / f.name).read_bytes() == f.read_bytes()


def test_one_batch_bigger_than_the_room_is_cached_up_to_the_reserve(small_fs: Path) -> None:
    """A prefetch hands the cache a whole directory at once: 16 MiB in one batch on a
    20 MiB filesystem that keeps 8 MiB free.  What fits is cached, the rest counted
    ``not_cached``; the batch is not refused whole (which cached nothing, in CI)."""
    cache = DiskCache(str(small_fs / "cache"), max_bytes=1 << 30, reserve="40%")
    try:
        batch = _chunks(64, size=256 << 10)
        added = cache.put_many(batch)
        assert 0 < added < len(batch), added
        assert cache.stats.not_cached == len(batch) - added
        assert added * (256 << 10) > 6 << 20, added  # ~12 MiB of room, less the LMDB file's pages
        st = os.statvfs(small_fs)
        assert st.f_bavail * st.f_frsize >= 0.4 * st.f_blocks * st.f_frsize - (1 << 20)
        assert len(cache.get_many([d for d, _c in batch])) == added  # what it says it cached, it has
    finally:
        cache.close()
