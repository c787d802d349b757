"""An image already on the node: a remount takes the image's metadata from the node's copies,
asks the store only for the manifest, and says where its start-up time went (issue 18)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mounted, run_cubefs

from cubefs.format.packs import chunkmap_key, image_key
from cubefs.format.trace import trace_key
from cubefs.image.catalog import MetadataCache


def _tree(root: Path, seed: int) -> dict[str, bytes]:
    files = {f"d{i % 3}/f{i}": os.urandom(1000 + seed * 7 + i * 3000) for i in range(12)}
    files["big"] = os.urandom(3_000_000)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _digest(store_dir: Path) -> str:
    (name,) = os.listdir(store_dir / "images")
    return name


def _read_all(mnt: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (mnt / rel).read_bytes() == data, rel


def test_a_remount_asks_the_store_only_for_the_manifest(tmp_path: Path, local_store: str) -> None:
    src = tmp_path / "src"
    files = _tree(src, 1)
    run_cubefs("build", str(src), "--tag", "rm:1", "--store", local_store)
    store_dir = Path(local_store.removeprefix("file://"))
    cache = tmp_path / "cache"
    with mounted("rm:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        first = m.stats()
    assert first["store_requests"]["gets"] >= 4  # manifest, image, chunk map, trace, then chunks
    phases = first["mount_phases"]
    assert {"daemon", "metadata", "disk_cache", "mount", "ready", "init"} <= set(phases)
    assert phases["total"] > 0

    # The image's metadata and chunk map leave the store: a remount that still serves every byte
    # took them from the node, and asked the store nothing but the manifest.
    digest = _digest(store_dir)
    for key in (image_key(digest), chunkmap_key(digest)):
        (store_dir / key).unlink()
    with mounted("rm:1", tmp_path / "mnt", local_store, cache) as m:
        assert m.stats()["store_requests"]["gets"] == 1
        _read_all(m.mountpoint, files)
        after = m.stats()
    assert after["tiers"]["store"]["requests"] == 0  # every chunk from the disk cache
    assert after["store_requests"]["gets"] <= 2  # + the trace, refreshed in the background


def test_a_moved_tag_is_seen_at_the_next_mount(tmp_path: Path, local_store: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _tree(tmp_path / "a", 1), _tree(tmp_path / "b", 2)
    cache = tmp_path / "cache"
    run_cubefs("build", str(tmp_path / "a"), "--tag", "mv:1", "--store", local_store)
    with mounted("mv:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, first)
    run_cubefs("build", str(tmp_path / "b"), "--tag", "mv:1", "--store", local_store)
    with mounted("mv:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, second)


def test_a_bad_kept_copy_is_dropped_and_the_store_asked(tmp_path: Path, local_store: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept image copy whose own checksum holds but whose content is not the image (another
    image's metadata, written over it): the mount drops it and fetches the real one.  (No
    daemon kept ready: one would hold the image decoded from before the copy was damaged.)"""
    monkeypatch.setenv("CUBEFS_KEEP_READY", "0")
    src = tmp_path / "src"
    files = _tree(src, 3)
    run_cubefs("build", str(src), "--tag", "bad:1", "--store", local_store)
    cache = tmp_path / "cache"
    with mounted("bad:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
    digest = _digest(Path(local_store.removeprefix("file://")))
    kept = MetadataCache(str(cache))
    wrong = kept.get(local_store, chunkmap_key(digest))
    assert wrong is not None and kept.get(local_store, image_key(digest)) is not None
    path = Path(kept._path(local_store, image_key(digest)))
    path.write_bytes(hashlib.sha256(wrong).digest() + wrong)  # checksum right, content wrong
    with mounted("bad:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        assert m.stats()["store_requests"]["gets"] >= 3  # manifest, then image and chunk map again
    assert kept.get(local_store, image_key(digest)) is not None  # the good copy kept again
    log = "".join(p.read_text() for p in (cache / "logs").iterdir())
    assert "the kept metadata is unusable" in log


def test_the_kept_trace_follows_the_store(tmp_path: Path, local_store: str) -> None:
    """The trace is taken from the node's copy and refreshed once the mount is live: a trace
    the store no longer has is dropped from the node too."""
    src = tmp_path / "src"
    files = _tree(src, 4)
    run_cubefs("build", str(src), "--tag", "tr:1", "--store", local_store)
    store_dir = Path(local_store.removeprefix("file://"))
    cache = tmp_path / "cache"
    with mounted("tr:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
    digest = _digest(store_dir)
    with mounted("tr:1", tmp_path / "mnt", local_store, cache):  # this one keeps the published trace
        pass
    kept = MetadataCache(str(cache))
    assert kept.get(local_store, trace_key(digest)) is not None
    (store_dir / trace_key(digest)).unlink()
    with mounted("tr:1", tmp_path / "mnt", local_store, cache, "--no-auto-trace"):
        deadline = time.monotonic() + 10
        while kept.get(local_store, trace_key(digest)) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    assert kept.get(local_store, trace_key(digest)) is None


def test_damaged_chunks_read_in_the_background_are_refetched(tmp_path: Path, local_store: str) -> None:
    """The disk cache's reads nobody waits for (the trace's prefetch at a remount) go a few
    chunks at a time: a damaged entry among them fails alone, is dropped, and the reader that
    needs it gets the right bytes from the store; the rest come from the disk."""
    from cubefs.cache.disk import DiskCache, StoredChunk
    from cubefs.format.packs import CODEC_ZSTD

    src = tmp_path / "src"
    files = _tree(src, 5)
    run_cubefs("build", str(src), "--tag", "dmg:1", "--store", local_store)
    cache = tmp_path / "cache"
    with mounted("dmg:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
    disk = DiskCache(str(cache), 1 << 30)
    try:
        held = disk.digests()
        assert len(held) > 20
        bad = held[5:8]
        assert disk.present([*bad, b"\0" * 32]) == bad  # present: in order, the absent left out
        lengths = {d: c.plain_len for d, c in disk.get_many(bad).items()}
        disk.delete(bad)
        disk.put_many([(d, StoredChunk(CODEC_ZSTD, lengths[d], os.urandom(200))) for d in bad])
    finally:
        disk.close()
    shutil.rmtree(cache / "hot")  # the start-up's own file (tests/test_hotfile.py) would serve them first
    with mounted("dmg:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        tiers = m.stats()["tiers"]
    assert tiers["disk"]["errors"] >= 1  # found damaged, dropped
    assert 1 <= tiers["store"]["hits"] <= len(bad)  # only those came from the store


def _nice(pid: int, tid: str) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _server_log() -> Path:
    return Path(os.environ["CUBEFS_SERVER"] + ".log")


def _wait_for(what: str, log: Path, after: int = 0, timeout: float = 60) -> str:
    """The server's log from byte ``after`` on, once it holds ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")[after:] if log.exists() else ""
        if what in text:
            return text
        assert time.monotonic() < deadline, f"{what!r} not in the log:\n{text[-3000:]}"
        time.sleep(0.05)


def test_a_remount_is_served_by_a_daemon_kept_ready(tmp_path: Path, local_store: str) -> None:
    """After a mount, the mount server keeps a daemon ready for the next mount of the image
    (store session, disk cache and the image's metadata opened ahead): the remount's daemon
    reaches ready in a few ms and asks the store only for the manifest; the bytes are right."""
    src = tmp_path / "src"
    files = _tree(src, 6)
    run_cubefs("build", str(src), "--tag", "kr:1", "--store", local_store)
    cache, log = tmp_path / "cache", _server_log()
    start = _size(log)  # before the mount: its spare may be ready before the mount command returns
    with mounted("kr:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        _wait_for("for kr:1 ready (", log, start)  # the spare is prepared
    with mounted("kr:1", tmp_path / "mnt2", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        st = m.stats()
        if os.geteuid() == 0:  # it prepared at nice 19; every thread serves at the usual priority
            assert {_nice(st["pid"], t) for t in os.listdir(f"/proc/{st['pid']}/task")} == {os.nice(0)}
        assert f"forked mount daemon {st['pid']} for kr:1 at {tmp_path / 'mnt2'} (a daemon kept ready)" \
            in log.read_text()
    assert st["store_requests"]["gets"] <= 2  # the manifest (+ the trace, refreshed after)
    assert st["tiers"]["store"]["requests"] == 0
    assert st["mount_phases"]["metadata"] < 1000  # taken from memory, not loaded (ms; loose: a loaded node)


def test_a_kept_daemon_whose_tag_moved_serves_the_new_image(tmp_path: Path, local_store: str) -> None:
    """The kept daemon holds the image the tag named when it was made; the tag then moves: the
    next mount through it shows the new image, never the kept one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _tree(tmp_path / "a", 7), _tree(tmp_path / "b", 8)
    cache, log = tmp_path / "cache", _server_log()
    run_cubefs("build", str(tmp_path / "a"), "--tag", "kmv:1", "--store", local_store)
    start = _size(log)
    with mounted("kmv:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, first)
        _wait_for("for kmv:1 ready (", log, start)
    run_cubefs("build", str(tmp_path / "b"), "--tag", "kmv:1", "--store", local_store)
    with mounted("kmv:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, second)
        assert "(a daemon kept ready)" in log.read_text()[start:]
        daemon_log = "".join(p.read_text() for p in (cache / "logs").iterdir())
        assert "not the kept sha256:" in daemon_log


def _own_server(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    sock = tmp_path / "own.sock"
    with open(tmp_path / "own.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--socket", str(sock)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc, {"CUBEFS_SERVER": str(sock)}


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out}


def test_the_daemons_kept_ready_are_bounded(tmp_path: Path, local_store: str) -> None:
    """At most CUBEFS_KEEP_READY of them (the least recently wanted goes), and none whose memory
    exceeds CUBEFS_KEEP_READY_BYTES; those the server drops exit, and all exit with the server."""
    refs = ["b1:1", "b2:1"]
    for i, ref in enumerate(refs):
        (tmp_path / ref).mkdir()
        _tree(tmp_path / ref, 10 + i)
        run_cubefs("build", str(tmp_path / ref), "--tag", ref, "--store", local_store)
    log = tmp_path / "own.log"
    proc, env = _own_server(tmp_path, CUBEFS_KEEP_READY="1")
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for ref in refs:
            start = _size(log)
            run_cubefs("mount", ref, str(mnt), "--store", local_store, "--cache-dir", str(tmp_path / "c"), env=env)
            _wait_for(f"for {ref} ready (", log, start)
            run_cubefs("umount", str(mnt), env=env)
        text = log.read_text()
        first, second = (int(text.split("forked spare ")[i + 1].split()[0]) for i in range(2))
        assert f"forked spare {second} for b2:1" in text
        deadline = time.monotonic() + 10
        while first in _children(proc.pid):  # the oldest was dropped for the second
            assert time.monotonic() < deadline, "the dropped spare did not exit"
            time.sleep(0.05)
        assert _children(proc.pid) == {second}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{second}"):
        assert time.monotonic() < deadline, "a spare outlived its server"
        time.sleep(0.05)

    proc, env = _own_server(tmp_path, CUBEFS_KEEP_READY_BYTES="1M")  # less than any spare's own memory
    try:
        start = _size(log)
        run_cubefs("mount", refs[0], str(mnt), "--store", local_store, "--cache-dir", str(tmp_path / "c"), env=env)
        run_cubefs("umount", str(mnt), env=env)
        text = _wait_for("the spares hold more than 1048576 bytes", log, start)
        dropped = int(text.split("dropping spare ")[1].split()[0])
        deadline = time.monotonic() + 10
        while dropped in _children(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _children(proc.pid) == set()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_kept_daemon_serves_only_the_same_options(tmp_path: Path, local_store: str) -> None:
    """A daemon kept ready was made for one request's options and environment: a mount that
    asks for other ones (here another read-ahead) gets a daemon of its own, with them."""
    src = tmp_path / "src"
    files = _tree(src, 9)
    run_cubefs("build", str(src), "--tag", "ko:1", "--store", local_store)
    cache, log = tmp_path / "cache", _server_log()
    start = _size(log)
    with mounted("ko:1", tmp_path / "mnt", local_store, cache) as m:
        _read_all(m.mountpoint, files)
        _wait_for("for ko:1 ready (", log, start)
    with mounted("ko:1", tmp_path / "mnt", local_store, cache, "--readahead", "1M") as m:
        _read_all(m.mountpoint, files)
        pid = m.stats()["pid"]
    text = log.read_text()[start:]
    assert f"forked mount daemon {pid} for ko:1" in text
    assert f"forked mount daemon {pid} for ko:1 at {tmp_path / 'mnt'} (a daemon kept ready)" not in text



def test_a_failed_mount_leaves_no_daemon_kept_ready(tmp_path: Path, local_store: str) -> None:
    """A mount of a tag that does not exist fails; no spare is made for it (one would ask the
    store again and wait ten minutes for a mount that cannot succeed)."""
    (tmp_path / "src").mkdir()
    _tree(tmp_path / "src", 3)
    run_cubefs("build", str(tmp_path / "src"), "--tag", "real:1", "--store", local_store)
    log = tmp_path / "own.log"
    proc, env = _own_server(tmp_path)
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        start = _size(log)
        res = run_cubefs("mount", "nosuch:1", str(mnt), "--store", local_store, "--cache-dir", str(tmp_path / "c"),
                         env=env, check=False)
        assert res.returncode != 0 and not os.path.ismount(mnt)
        _wait_for("no spare for nosuch:1", log, start, timeout=40)
        assert "forked spare" not in log.read_text()[start:]
        assert _children(proc.pid) == set()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
