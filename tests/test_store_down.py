"""A node whose store is down: mounts what its caches hold, and a read's bound is its timeout, once."""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from pathlib import Path

from conftest import mounted, run_cubefs, start_s3_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "bench"))
from delayproxy import DelayProxy

READ_TIMEOUT = 4.0


def _read_errno(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as err:
        return err.errno or 0
    return 0


def _timed_errno(path: Path) -> tuple[int, float]:
    t0 = time.monotonic()
    code = _read_errno(path)
    return code, time.monotonic() - t0


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "cached").write_bytes(os.urandom(300_000))
    (src / "uncached").write_bytes(os.urandom(300_000))
    (src / "small").write_bytes(b"small file\n")
    return src


def test_a_node_mounts_from_its_cache_while_the_store_is_down(tmp_path: Path) -> None:
    server = start_s3_server(tmp_path / "weed")
    try:
        src = _tree(tmp_path)
        store = server.store("sdown", "img")
        run_cubefs("build", str(src), "--tag", "sd:1", "--store", store, "--s3-endpoint", server.endpoint)
        cache = tmp_path / "cache"
        opts = ("--read-timeout", str(READ_TIMEOUT), "--store-attempts", "2", "--store-timeout", "1",
                "--memory-cache", "1M")
        with mounted("sd:1", tmp_path / "mnt1", store, cache, *opts, s3_endpoint=server.endpoint):
            assert (tmp_path / "mnt1" / "etc" / "cached").read_bytes() == (src / "etc" / "cached").read_bytes()
            assert (tmp_path / "mnt1" / "small").read_bytes() == b"small file\n"
        # What it kept of the metadata is private, as the chunks are.
        meta = cache / "metadata"
        assert stat.S_IMODE(meta.stat().st_mode) == 0o700
        kept = list(meta.iterdir())
        assert len(kept) >= 3  # manifest, image, chunk map
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in kept)

        server.stop()
        # A fresh mount, the store down: it starts from the cache and says so.
        with mounted("sd:1", tmp_path / "mnt2", store, cache, *opts, s3_endpoint=server.endpoint) as m:
            mnt = tmp_path / "mnt2"
            assert sorted(os.listdir(mnt)) == ["etc", "small", "uncached"]
            assert (mnt / "etc" / "cached").read_bytes() == (src / "etc" / "cached").read_bytes()
            assert (mnt / "small").read_bytes() == b"small file\n"
            code, took = _timed_errno(mnt / "uncached")
            assert code == errno.EIO
            assert took < 1.5 * READ_TIMEOUT, f"an uncached read took {took:.1f} s with --read-timeout {READ_TIMEOUT}"
            assert os.path.ismount(mnt)
            logs = "".join(p.read_text() for p in (cache / "logs").iterdir())
            assert "is unreachable: image sd:1 mounted from the metadata kept in" in logs
            assert m.stats()["read_errors"] >= 1
            # The store comes back: the same mount serves what it could not.
            server = start_s3_server(tmp_path / "weed", ports=server.ports)
            deadline = time.monotonic() + 120
            while _read_errno(mnt / "uncached"):
                assert time.monotonic() < deadline, "the mount did not recover when the store came back"
                time.sleep(1)
            assert (mnt / "uncached").read_bytes() == (src / "uncached").read_bytes()
    finally:
        server.stop()


def test_damaged_metadata_copy_is_not_used(tmp_path: Path) -> None:
    """A damaged kept copy is dropped, never decoded: with the store down the mount
    fails with a clear error instead of serving a wrong tree."""
    server = start_s3_server(tmp_path / "weed")
    try:
        src = _tree(tmp_path)
        store = server.store("sdamaged", "img")
        run_cubefs("build", str(src), "--tag", "sd:1", "--store", store, "--s3-endpoint", server.endpoint)
        cache = tmp_path / "cache"
        with mounted("sd:1", tmp_path / "mnt1", store, cache, s3_endpoint=server.endpoint):
            pass
        before = len(list((cache / "metadata").iterdir()))
        for f in (cache / "metadata").iterdir():
            raw = bytearray(f.read_bytes())
            raw[-1] ^= 0xFF
            f.write_bytes(bytes(raw))
        server.stop()
        (tmp_path / "mnt2").mkdir()
        res = run_cubefs("mount", "sd:1", str(tmp_path / "mnt2"), "--store", store, "--cache-dir", str(cache),
                         "--s3-endpoint", server.endpoint, "--store-attempts", "1", "--store-timeout", "1",
                         check=False, timeout=120)
        assert res.returncode != 0 and not os.path.ismount(tmp_path / "mnt2")
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert len(list((cache / "metadata").iterdir())) < before  # dropped when read, never used
    finally:
        server.stop()


def test_a_read_against_a_hung_store_waits_its_timeout_once(tmp_path: Path) -> None:
    """The kernel retries a failed readahead with a 4 KiB read of the same chunk; that
    retry must fail at once, not wait a second --read-timeout."""
    server = start_s3_server(tmp_path / "weed")
    try:
        src = _tree(tmp_path)
        store = server.store("shung", "img")
        run_cubefs("build", str(src), "--tag", "sh:1", "--store", store, "--s3-endpoint", server.endpoint)
        host, port = server.hostport
        with DelayProxy(host, port, delay_ms=0) as proxy, mounted(
                "sh:1", tmp_path / "mnt", store, tmp_path / "cache", "--read-timeout", str(READ_TIMEOUT),
                "--store-timeout", "30", "--cache-size", "0", "--memory-cache", "1M",
                s3_endpoint=proxy.endpoint):
            proxy.delay = 3600.0  # a blackhole: requests go in, nothing comes back
            code, took = _timed_errno(tmp_path / "mnt" / "uncached")
            assert code == errno.EIO
            assert READ_TIMEOUT * 0.9 < took < 1.5 * READ_TIMEOUT, f"took {took:.1f} s"
            print(f"hung store: EIO after {took:.2f} s with --read-timeout {READ_TIMEOUT}")
    finally:
        server.stop()
