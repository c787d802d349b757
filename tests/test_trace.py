"""Start-up traces: record once, push, and later mounts prefetch in that order."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import mounted, run_cubefs


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"d{i % 3}/f{i:02d}": os.urandom(150_000) for i in range(24)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _wait_prefetched(m: mounted, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = m.stats()
        if stats["tiers"]["prefetch"]["done"]:
            return stats
        time.sleep(0.1)
    raise AssertionError("the prefetch did not finish")


def test_recorded_trace_is_prefetched_by_later_mounts(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    image = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store,
                                  "--json").stdout)["image"]
    workload = ["d2/f05", "d0/f12", "d1/f01", "d2/f20"]  # scattered over the packs' order

    with mounted("app:1", tmp_path / "rec", store, tmp_path / "cache-rec", "--record-trace", "--readahead", "0"):
        for rel in workload:
            assert (tmp_path / "rec" / rel).read_bytes() == files[rel]
        pushed = json.loads(run_cubefs("trace", "push", str(tmp_path / "rec"), "--json").stdout)
    assert pushed["chunks"] >= len(workload) and pushed["stored_bytes"] >= 4 * 150_000
    assert (tmp_path / "store" / "traces" / image).is_file()

    # A fresh node: the trace's chunks arrive before anyone reads them.
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache") as m:
        stats = _wait_prefetched(m)
        assert stats["tiers"]["prefetch"]["chunks"] == pushed["chunks"]
        requests = stats["tiers"]["store"]["requests"]
        assert requests >= 1
        for rel in workload:
            assert (tmp_path / "mnt" / rel).read_bytes() == files[rel]
        after = m.stats()["tiers"]
        assert after["store"]["requests"] == requests, "the workload's reads all hit the prefetched chunks"
        assert after["memory"]["misses"] == 0
        # Anything else is still read on demand.
        assert (tmp_path / "mnt" / "d0/f00").read_bytes() == files["d0/f00"]
        assert m.stats()["tiers"]["store"]["requests"] > requests

    # --no-prefetch leaves it alone.
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache2", "--no-prefetch") as m:
        time.sleep(0.5)
        assert m.stats()["tiers"]["store"]["requests"] == 0


def test_trace_push_needs_a_recording_mount_and_a_bad_trace_is_ignored(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    image = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store,
                                  "--json").stdout)["image"]
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache", "--no-auto-trace"):
        res = run_cubefs("trace", "push", str(tmp_path / "mnt"), check=False)
        assert res.returncode == 2 and "--no-auto-trace" in res.stderr
    res = run_cubefs("trace", "push", str(tmp_path / "nowhere"), check=False)
    assert res.returncode == 3, res.stderr
    # Garbage where the trace should be: the mount works and says why it ignores it.
    (tmp_path / "store" / "traces").mkdir()
    (tmp_path / "store" / "traces" / image).write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache3") as m:
        assert (tmp_path / "mnt" / "d1/f04").read_bytes() == files["d1/f04"]
        assert m.stats()["tiers"]["prefetch"]["chunks"] == 0
    logs = "".join(p.read_text() for p in (tmp_path / "cache3" / "logs").iterdir())
    assert "ignoring its trace" in logs


def _stored_trace(store_dir: Path, image: str, nchunks: int = 1 << 20) -> list[int]:
    from cubefs.format.trace import decode_trace

    return decode_trace((store_dir / "traces" / image).read_bytes(), image, nchunks)


def _wait_for(what: str, cond: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_first_start_publishes_its_trace_and_later_starts_prefetch_it_with_no_manual_step(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    image = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store,
                                  "--json").stdout)["image"]
    trace_file = store_dir / "traces" / image
    first = ["d2/f05", "d0/f12", "d1/f01"]

    # Node 1, first start: no trace anywhere; its reads are published once they go quiet.
    with mounted("app:1", tmp_path / "n1", store, tmp_path / "cache1", "--readahead", "0") as m:
        for rel in first:
            assert (tmp_path / "n1" / rel).read_bytes() == files[rel]
        _wait_for("the quiet publish", lambda: m.stats()["trace_published"].get("publishes") == 1)
        assert trace_file.is_file()
    published = _stored_trace(store_dir, image)
    assert len(published) >= len(first)

    # Node 2 (a fresh cache), same command: everything it reads was prefetched, and it
    # writes nothing (its reads are all in the trace).
    before = trace_file.stat().st_mtime_ns
    with mounted("app:1", tmp_path / "n2", store, tmp_path / "cache2", "--readahead", "0") as m:
        stats = _wait_prefetched(m)
        assert stats["tiers"]["prefetch"]["chunks"] == len(published)
        requests = stats["tiers"]["store"]["requests"]
        for rel in first:
            assert (tmp_path / "n2" / rel).read_bytes() == files[rel]
        assert m.stats()["tiers"]["store"]["requests"] == requests
        time.sleep(1.5)
        assert m.stats()["trace_published"] == {}
    time.sleep(0.5)
    assert trace_file.stat().st_mtime_ns == before

    # Node 3, another command: its new chunks are merged after the first start's, at unmount
    # at the latest.
    with mounted("app:1", tmp_path / "n3", store, tmp_path / "cache3", "--readahead", "0"):
        assert (tmp_path / "n3" / "d0/f03").read_bytes() == files["d0/f03"]
    _wait_for("the merged trace", lambda: len(_stored_trace(store_dir, image)) > len(published))
    merged = _stored_trace(store_dir, image)
    assert merged[: len(published)] == published

    # --no-auto-trace: nothing recorded, nothing published.
    trace_file.unlink()
    with mounted("app:1", tmp_path / "n4", store, tmp_path / "cache4", "--no-auto-trace") as m:
        assert (tmp_path / "n4" / "d1/f07").read_bytes() == files["d1/f07"]
        assert m.stats()["trace_recorded"] is None
    time.sleep(1.5)
    assert not trace_file.exists()


def test_concurrent_publishers_lose_no_chunks(tmp_path: Path) -> None:
    """Two nodes merging into the same trace at once: the store keeps the last PUT, and
    the read-back after writing puts the loser's chunks back."""
    import asyncio

    from cubefs.format.trace import decode_trace
    from cubefs.image.autotrace import publish_trace
    from cubefs.remote.local import LocalStore

    store = LocalStore(str(tmp_path / "store"))
    digest = "ab" * 32

    async def race() -> None:
        await store.open()
        await asyncio.gather(*(publish_trace(store, digest, 100, chunks, lambda _i: 1000, settle=(0.0, 0.1))
                               for chunks in ([1, 2, 3], [7, 8], [3, 9])))

    for _ in range(5):
        asyncio.run(race())
        final = decode_trace(asyncio.run(store.get(f"traces/{digest}")), digest, 100)
        assert {1, 2, 3, 7, 8, 9} <= set(final) and len(final) == len(set(final))
        (tmp_path / "store" / "traces" / digest).unlink()


def test_bad_or_huge_traces_are_refused_and_merges_are_bounded() -> None:
    import struct

    import pytest

    from cubefs.errors import CorruptDataError
    from cubefs.format.image import compress_blob
    from cubefs.format.trace import MAX_CHUNKS, decode_trace, encode_trace, merge_traces

    digest = "cd" * 32
    assert decode_trace(encode_trace(digest, [5, 1, 3]), digest, 10) == [5, 1, 3]
    with pytest.raises(CorruptDataError, match="twice"):
        decode_trace(encode_trace(digest, [5, 1, 5]), digest, 10)
    with pytest.raises(CorruptDataError, match="does not have"):
        decode_trace(encode_trace(digest, [10]), digest, 10)
    with pytest.raises(CorruptDataError, match="malformed"):
        decode_trace(encode_trace("ef" * 32, [1]), digest, 10)
    huge = list(range(MAX_CHUNKS + 1))
    with pytest.raises(CorruptDataError, match="more than"):
        decode_trace(encode_trace(digest, huge), digest, MAX_CHUNKS + 2)
    import msgpack

    bomb = compress_blob(msgpack.packb({"magic": "cubefs-trace", "version": 1, "image": digest,
                                        "chunks": struct.pack("<I", 0) * (1 << 20)}))
    with pytest.raises(CorruptDataError):
        decode_trace(bomb, digest, 10)
    # Merging: old order first, no repeats, cut at the byte and chunk bounds.
    assert merge_traces([4, 2], [2, 9, 4, 1], lambda _i: 10) == [4, 2, 9, 1]
    assert merge_traces([4, 2], [9, 1], lambda _i: 10, max_bytes=30) == [4, 2, 9]
    assert merge_traces([], range(10), lambda _i: 1, max_chunks=3) == [0, 1, 2]


def test_build_trace_cmd_publishes_a_trace_before_any_start(tmp_path: Path) -> None:
    """``cubefs build --trace-cmd``: the command runs once in the freshly built image, and the
    image's first start on a node already has a trace to prefetch."""
    import shutil

    src = tmp_path / "src"
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        (src / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), src / lib.lstrip("/"))
    (src / "bin").mkdir()
    shutil.copy2("/bin/dash", src / "bin/sh")
    (src / "data").mkdir()
    lines = b"".join(os.urandom(30).hex().encode() + b"\n" for _ in range(4000))
    (src / "data/read-me").write_bytes(lines)
    (src / "data/not-me").write_bytes(os.urandom(200_000))
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    res = run_cubefs("build", str(src), "--tag", "sh:1", "--store", store, "--json",
                     "--trace-cmd", "while read l; do :; done < /data/read-me")
    image = json.loads(res.stdout)["image"]
    assert "published a start-up trace" in res.stderr
    traced = _stored_trace(store_dir, image)
    assert traced
    with mounted("sh:1", tmp_path / "mnt", store, tmp_path / "cache") as m:
        stats = _wait_prefetched(m)
        assert stats["tiers"]["prefetch"]["chunks"] == len(traced)
        requests = stats["tiers"]["store"]["requests"]
        assert (tmp_path / "mnt" / "data/read-me").read_bytes() == lines
        assert m.stats()["tiers"]["store"]["requests"] == requests, "read-me came with the trace"
    # A failing command is a clear error, and the image stays built.
    bad = run_cubefs("build", str(src), "--tag", "sh:2", "--store", store, "--trace-cmd", "exit 3", check=False)
    assert bad.returncode != 0 and "exited 3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    run_cubefs("inspect", "sh:2", "--store", store)


def test_a_store_that_refuses_the_trace_costs_a_log_line_not_reads(tmp_path: Path) -> None:
    """A store the mount cannot write (here ``traces`` is a file, so every trace key
    fails): reads go on, the failure is logged, the unmount is not held up."""
    files = _tree(tmp_path / "src")
    store_dir = tmp_path / "store"
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", f"file://{store_dir}")
    (store_dir / "traces").write_bytes(b"not a directory")
    with mounted("app:1", tmp_path / "mnt", f"file://{store_dir}", tmp_path / "cache", "--readahead", "0") as m:
        for rel in ("d0/f00", "d1/f01"):
            assert (tmp_path / "mnt" / rel).read_bytes() == files[rel]
        time.sleep(2)
        assert m.stats()["read_errors"] == 0
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 10
    logs = "".join(p.read_text() for p in (tmp_path / "cache" / "logs").iterdir())
    assert "publishing its trace failed" in logs
