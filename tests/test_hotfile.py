"""An image's start-up chunks kept in one file on the node (cubefs.cache.hot, issue 18 "on the
node"): a mount after a start serves the trace's prefetch from it, every byte right; a damaged
one costs speed, never a wrong byte; it is private, bounded, and trimmed and cleared with the
disk cache."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from conftest import mounted, run_cubefs, write_pack

from cubefs.cache.hot import HotFile, hot_dir, hot_path, keep_hot, trim_hot, write_hot
from cubefs.format.packs import CODEC_RAW


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"pkg{i % 3}/m{i}.py": os.urandom(2000 + i * 1500) for i in range(20)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_all(mnt: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (mnt / rel).read_bytes() == data, rel


def _hot_files(cache: Path) -> list[str]:
    d = Path(hot_dir(str(cache)))
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.is_dir() else []


def _wait_for_hot(cache: Path, timeout: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = _hot_files(cache)
        if names:
            return Path(hot_dir(str(cache))) / names[0]
        time.sleep(0.2)
    raise AssertionError("no hot file was kept")


def test_a_remount_takes_its_start_up_chunks_from_the_hot_file(tmp_path: Path, local_store: str) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    run_cubefs("build", str(src), "--tag", "hot:1", "--store", local_store)
    cache = tmp_path / "cache"
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:  # a first start: it records and publishes
        _read_all(m.mountpoint, files)
        path = _wait_for_hot(cache)  # and keeps its chunks, once it has read nothing new for 2 s
    mode = os.stat(path).st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    inode = os.stat(path).st_ino
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        st = m.stats()
    hot = st["tiers"]["hot"]
    n = hot["chunks"]
    # Read from the file as asked (the kernel's pages of it), none fetched into memory ahead;
    # a hit is a chunk read from it (one that two READs share, twice).
    assert n > 0 and st["tiers"]["prefetch"]["chunks"] == 0
    assert hot["hits"] >= hot["chunks"] and hot["errors"] == 0
    assert st["tiers"]["store"]["requests"] == 0
    assert os.stat(path).st_ino == inode  # a remount whose file holds its start-up writes nothing
    # Nor does one that never reads the file (it was written at every such mount).
    with mounted("hot:1", tmp_path / "mnt", local_store, cache, "--no-prefetch") as m:
        _read_all(m.mountpoint, files)
        time.sleep(2.5)  # past the keeper's settling time
    assert os.stat(path).st_ino == inode

    # A flipped byte in the file: that chunk comes from the disk cache instead, every byte right.
    with open(path, "r+b") as f:  # in the first chunk's bytes (the index is at the end)
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        hot = m.stats()["tiers"]["hot"]
    assert hot["errors"] == 1 and hot["hits"] >= n - 1

    # A torn file (cut short): not used, removed, kept again by that mount; bytes right.
    os.truncate(path, os.path.getsize(path) // 2)
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        assert "hot" not in m.stats()["tiers"]
        _wait_for_hot(cache)
    assert HotFile.open(str(cache), path.name) is not None

    stats = json.loads(run_cubefs("cache", "stats", "--cache-dir", str(cache), "--json").stdout)
    assert stats["hot_bytes"] >= os.path.getsize(path)
    run_cubefs("cache", "clear", "--cache-dir", str(cache))
    assert _hot_files(cache) == []
    assert json.loads(run_cubefs("cache", "stats", "--cache-dir", str(cache), "--json").stdout)["hot_bytes"] == 0


def _chunks(n: int, size: int = 10_000) -> dict[bytes, bytes]:
    return {bytes([i]) * 32: os.urandom(size) for i in range(n)}


def _plain_of(have: dict[bytes, bytes]):  # type: ignore[no-untyped-def]
    return lambda wanted: {d: have[d] for d in wanted if d in have}


def test_kept_in_order_written_again_only_when_the_start_up_changed(tmp_path: Path) -> None:
    have = _chunks(10)
    digests = list(have)
    cache = str(tmp_path)
    assert keep_hot(cache, "img", digests[::-1], _plain_of(have), None, 1 << 30) > 10 * 10_000
    hot = HotFile.open(cache, "img")
    assert hot is not None and hot.order == digests[::-1]
    assert keep_hot(cache, "img", digests[::-1], _plain_of(have), hot, 1 << 30) == 0  # unchanged
    got = hot.get_many(digests)
    assert {d: v[2] for d, v in got.items()} == have and {v[0] for v in got.values()} == {CODEC_RAW}
    # Another order, and a chunk the node does not have: written again, the first two from
    # the old file (the node no longer has them elsewhere), the missing one left out.
    del have[digests[0]], have[digests[1]]
    assert keep_hot(cache, "img", [*digests, b"\xee" * 32], _plain_of(have), hot, 1 << 30) > 0
    hot.close()
    hot = HotFile.open(cache, "img")
    assert hot is not None and hot.order == digests
    hot.close()
    # Cut at the bound, the start-up's first chunks kept.
    assert keep_hot(cache, "cut", digests, _plain_of(_chunks(10)), None, 35_000) > 0
    cut = HotFile.open(cache, "cut")
    assert cut is not None and cut.order == digests[:3]
    cut.close()


def test_bounded_least_recently_used_out_first(tmp_path: Path) -> None:
    have = _chunks(10)
    cache = str(tmp_path)
    for name, when in (("a", 100), ("b", 300), ("c", 200)):
        keep_hot(cache, name, list(have), _plain_of(have), None, 1 << 30)
        os.utime(hot_path(cache, name), (when, when))
    one = os.stat(hot_path(cache, "a")).st_blocks * 512
    trim_hot(cache, 2 * one)
    assert _hot_files(tmp_path) == ["b", "c"]
    # A temporary left by a writer that died is removed by the next trim.
    tmp = Path(hot_dir(cache)) / ".tmp-e.999999999"
    tmp.write_bytes(b"x")
    trim_hot(cache, 1 << 30)
    assert not tmp.exists()
    # So is a damaged file, at its next open.
    with open(hot_path(cache, "b"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"zzz")
    assert HotFile.open(cache, "b") is None and _hot_files(tmp_path) == ["c"]


def test_a_hot_file_that_cannot_be_opened_or_removed_never_ends_the_mount(tmp_path: Path, local_store: str) -> None:
    """Fault: a directory where the image's hot file belongs (it opens, reads fail, it cannot be
    unlinked; nor can a new file be renamed over it).  The mount serves every byte from the
    disk cache and stays up (it died in its trace's prefetch)."""
    src = tmp_path / "src"
    files = _tree(src)
    run_cubefs("build", str(src), "--tag", "hot:1", "--store", local_store)
    cache = tmp_path / "cache"
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        path = _wait_for_hot(cache)
    path.unlink()
    path.mkdir()
    (path / "x").write_bytes(b"x")
    with mounted("hot:1", tmp_path / "mnt", local_store, cache) as m:
        time.sleep(1.0)  # the trace's prefetch has run into it
        _read_all(m.mountpoint, files)
        st = m.stats()  # the daemon answers
        assert "hot" not in st["tiers"] and st["tiers"]["store"]["requests"] == 0
        _read_all(m.mountpoint, files)
    assert path.is_dir()


def test_opening_fails_soft_when_the_plain_open_fails_too(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Fault: O_NOATIME refused (not the file's owner) and the plain open then failing (EIO):
    no hot file, no exception."""
    have = _chunks(3)
    keep_hot(str(tmp_path), "img", list(have), _plain_of(have), None, 1 << 30)
    real_open = os.open

    def failing_open(path, flags, *a):  # type: ignore[no-untyped-def]
        if str(path) == hot_path(str(tmp_path), "img"):
            raise PermissionError(1, "not the owner") if flags & os.O_NOATIME else OSError(5, "I/O error")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", failing_open)
    assert HotFile.open(str(tmp_path), "img") is None


def _keeper(tmp_path: Path, get_many):  # type: ignore[no-untyped-def]
    """A HotKeeper over stand-ins: fault injection needs a disk cache that raises."""
    from types import SimpleNamespace

    from cubefs.node.hotkeep import HotKeeper

    image = SimpleNamespace(digest="img", chunk=lambda i: (bytes([i]) * 32, None))
    fs = SimpleNamespace(trace=[0, 1, 2], trace_last=0.0, image=image, label="img:1")
    source = SimpleNamespace(prefetch_stats={"done": 1}, memory=SimpleNamespace(get=lambda d: None), hot=None,
                             flush=lambda: None)
    disk = SimpleNamespace(get_many=get_many)
    return HotKeeper(str(tmp_path), fs, source, disk, [0, 1, 2], 1 << 30)  # type: ignore[arg-type]


def test_the_keeper_fails_soft_on_any_error(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Fault: the disk cache's LMDB failing, and a KeyError: the keeper's serve task ends with a
    warning naming the image (it cancelled the mount's serve), and its exit step returns (the
    mount's own cleanup runs after it)."""
    import lmdb
    import trio

    def lmdb_fails(digests):  # type: ignore[no-untyped-def]
        raise lmdb.Error("MDB_PANIC")

    def key_error(digests):  # type: ignore[no-untyped-def]
        raise KeyError(digests[0])

    trio.run(_keeper(tmp_path, lmdb_fails).run)
    assert "image img:1: keeping its start-up chunks in a hot file failed" in caplog.text
    _keeper(tmp_path, key_error).at_exit()
    assert "KeyError" in caplog.text
    assert _hot_files(tmp_path) == []


def test_the_index_read_once_per_chunk_a_concurrent_drop_is_no_error(tmp_path: Path) -> None:
    """Fault: another thread drops a bad chunk between get_many's test of the index and its
    lookup (a KeyError into the read path)."""
    have = _chunks(4)
    keep_hot(str(tmp_path), "img", list(have), _plain_of(have), None, 1 << 30)
    hot = HotFile.open(str(tmp_path), "img")
    assert hot is not None

    class DroppedOnTest(dict):  # type: ignore[type-arg]
        def __contains__(self, d: object) -> bool:
            present = dict.__contains__(self, d)
            self.pop(d, None)  # the other thread's drop, right after the test
            return present

    hot._index = DroppedOnTest(hot._index)
    got = hot.get_many(list(have))
    assert {d: v[2] for d, v in got.items()} == have
    hot.close()


def test_not_written_again_for_what_it_could_not_hold(tmp_path: Path) -> None:
    """A file cut at its bound, a start-up with chunks the node cannot give (deltas, evicted):
    a remount writes nothing; once the missing chunks can be had, it is written again."""
    cache = str(tmp_path)
    have = _chunks(10)
    digests = list(have)
    assert keep_hot(cache, "cut", digests, _plain_of(have), None, 35_000) > 0
    cut = HotFile.open(cache, "cut")
    assert cut is not None and cut.order == digests[:3]
    assert keep_hot(cache, "cut", digests, _plain_of(have), cut, 35_000) == 0
    assert cut.cut  # the footer says so
    assert keep_hot(cache, "cut", [*digests, b"\xee" * 32], _plain_of(have), cut, 35_000) == 0  # a longer start-up
    assert keep_hot(cache, "cut", digests[1:], _plain_of(have), cut, 35_000) > 0  # another one
    cut.close()

    some = {d: have[d] for d in digests[::2]}  # half of them deltas or evicted
    assert keep_hot(cache, "img", digests, _plain_of(some), None, 1 << 30) > 0
    hot = HotFile.open(cache, "img")
    assert hot is not None and not hot.cut and hot.order == digests[::2]
    assert keep_hot(cache, "img", digests, _plain_of(some), hot, 1 << 30) == 0
    assert keep_hot(cache, "img", digests, _plain_of(have), hot, 1 << 30) > 0  # now the node has them
    hot.close()


def test_a_bad_hot_chunk_is_dropped_from_the_hot_file_not_the_disk_cache(tmp_path: Path) -> None:
    """A chunk from the hot file whose plaintext is not its length (its xxh64 right: written
    wrong) is dropped from the hot file and served from the disk cache, whose good copy stays
    (it was deleted, and the chunk fetched from the store); each hit is counted once, in the
    tier that served it."""
    import trio

    from cubefs.cache.disk import DiskCache, StoredChunk
    from cubefs.cache.source import ChunkSource
    from cubefs.cache.tiers import MemoryTier
    from cubefs.remote import make_store
    from cubefs.remote.loop import LoopThread

    chunks = [os.urandom(20_000) for _ in range(4)]
    locs = write_pack(tmp_path / "store", chunks)
    disk = DiskCache(str(tmp_path / "cache"), 64 << 20)
    disk.put_many([(r.digest, StoredChunk(CODEC_RAW, len(c), c)) for r, c in zip(locs, chunks)])
    wrong = [chunks[0] + b"!", *chunks[1:]]
    write_hot(str(tmp_path / "cache"), "img", [[(r.digest, c) for r, c in zip(locs, wrong)]], 1 << 30)
    loop = LoopThread()
    source = ChunkSource(make_store(f"file://{tmp_path / 'store'}"), loop, MemoryTier(64 << 20), disk)
    source.hot = HotFile.open(str(tmp_path / "cache"), "img")
    assert source.hot is not None and len(source.hot) == 4
    try:
        got = trio.run(source.get_many, locs)
    finally:
        loop.close()
    assert got == chunks
    assert source.store_stats.requests == 0
    assert disk.present([locs[0].digest]) == [locs[0].digest]
    hot = source.hot.stats
    assert (hot.hits, hot.errors) == (3, 1) and locs[0].digest not in source.hot
    assert disk.stats.hits == 1 and disk.stats.bytes == len(chunks[0])
    source.hot.close()
    disk.close()


def test_neighbouring_chunks_read_in_one_system_call_each_checked(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A run of chunks that lie one after another is one preadv (the reading thread takes the
    GIL back once a run, not once a chunk: with the event loop busy, each take could wait out
    the interpreter's switch interval); a chunk whose bytes do not check out is still dropped
    alone, the others of its run served."""
    from cubefs.cache import hot as hotmod

    have = {i.to_bytes(32, "big"): os.urandom(1000) for i in range(300)}
    digests = list(have)
    keep_hot(str(tmp_path), "img", digests, _plain_of(have), None, 1 << 30)
    hot = HotFile.open(str(tmp_path), "img")
    assert hot is not None
    calls: list[int] = []
    preadv = os.preadv
    monkeypatch.setattr(hotmod.os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or preadv(fd, bufs, off))
    got = hot.get_many(digests[::-1])  # asked in any order: read in the file's
    assert {d: v[2] for d, v in got.items()} == have
    assert calls == [hotmod.RUN_CHUNKS, 300 - hotmod.RUN_CHUNKS]
    calls.clear()
    wanted = digests[10:20] + digests[50:55]  # two runs
    assert {d: v[2] for d, v in hot.get_many(wanted).items()} == {d: have[d] for d in wanted}
    assert calls == [10, 5]
    # One chunk's bytes damaged on disk: dropped, its run's others served.
    off = hot._index[digests[12]][0]
    with open(hot.path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * 8)
    got = hot.get_many(digests[10:20])
    assert set(got) == set(digests[10:20]) - {digests[12]} and digests[12] not in hot
    hot.close()


def test_read_now_only_from_the_kernels_pages(tmp_path: Path) -> None:
    """get_now (the event loop's path) never waits on the disk: with the file's pages dropped it
    answers None (the caller's thread reads it), once they are in, every byte, checked; a chunk
    that does not check out is None too, left for get_many to drop."""
    have = {i.to_bytes(32, "big"): os.urandom(5000) for i in range(20)}
    digests = list(have)
    keep_hot(str(tmp_path), "img", digests, _plain_of(have), None, 1 << 30)
    hot = HotFile.open(str(tmp_path), "img")
    assert hot is not None
    fd = os.open(hot.path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert hot.get_now(digests[3:6]) is None
        assert hot.stats.hits == 0
        os.pread(fd, os.path.getsize(hot.path), 0)  # in the page cache now
    finally:
        os.close(fd)
    wanted = [digests[7], digests[2], digests[3]]
    assert hot.get_now(wanted) == [have[d] for d in wanted]
    assert hot.stats.hits == 3 and hot.stats.bytes == 15000
    assert hot.get_now([digests[0], b"\x01" * 32]) is None  # one it does not hold: all or nothing
    with open(hot.path, "r+b") as f:
        f.seek(hot._index[digests[5]][0])
        f.write(b"\xff" * 8)
    assert hot.get_now([digests[5]]) is None and digests[5] in hot
    assert digests[5] not in hot.get_many([digests[5]]) and digests[5] not in hot
    hot.close()


def test_a_kernel_that_refuses_nowait_reads_leaves_the_file_to_the_prefetch(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Fault: RWF_NOWAIT refused on the file (an older kernel, another filesystem): known at open,
    get_now never serves (the mount then prefetches the file's chunks as before), get_many does."""
    import errno

    from cubefs.cache import hot as hotmod

    have = {i.to_bytes(32, "big"): os.urandom(3000) for i in range(5)}
    keep_hot(str(tmp_path), "img", list(have), _plain_of(have), None, 1 << 30)
    preadv = os.preadv

    def refusing(fd: int, bufs: list[bytearray], off: int, *flags: int) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return preadv(fd, bufs, off)

    monkeypatch.setattr(hotmod.os, "preadv", refusing)
    hot = HotFile.open(str(tmp_path), "img")
    assert hot is not None and not hot.nowait
    assert hot.get_now(list(have)) is None
    assert {d: v[2] for d, v in hot.get_many(list(have)).items()} == have
    hot.close()
    monkeypatch.undo()
    hot = HotFile.open(str(tmp_path), "img")
    assert hot is not None and hot.nowait
    hot.close()
