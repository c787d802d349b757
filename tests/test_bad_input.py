"""Bad input gets a clear one-line error (build) or EIO for that read (mount),
never a hang, a dead mount, a wrong byte, or damage to what was stored."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import msgpack
import pytest
import zstandard
from conftest import free_ports, mounted, run_cubefs, start_s3_server

from cubefs.cache.disk import DiskCache
from cubefs.format.packs import chunkmap_key


def _store_path(store: str) -> Path:
    return Path(store.removeprefix("file://"))


def _small_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim.bin").write_bytes(os.urandom(600_000))  # incompressible: stored raw
    (src / "bystander.txt").write_bytes(b"still fine\n" * 1000)
    return src


def _packs(store: str) -> list[Path]:
    return sorted((_store_path(store) / "packs").rglob("*"))


def _only_pack(store: str) -> Path:
    packs = [p for p in _packs(store) if p.is_file()]
    assert len(packs) == 1, packs
    return packs[0]


def _read_errno(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as err:
        return err.errno
    return None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_pack_gives_eio_and_mount_survives(tmp_path: Path, local_store: str, damage: str) -> None:
    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "victim:1", "--store", local_store)
    pack = _only_pack(local_store)
    data = bytearray(pack.read_bytes())
    victim = (src / "victim.bin").read_bytes()
    at = data.find(victim[300_000:300_032])
    assert at > 0, "the raw chunk must be findable in the pack"
    if damage == "flip":
        data[at] ^= 0x01
        pack.write_bytes(bytes(data))
    elif damage == "truncate":
        pack.write_bytes(bytes(data[:at]))
    else:
        pack.unlink()
    with mounted("victim:1", tmp_path / "mnt", local_store, tmp_path / "cache", "--read-timeout", "20") as m:
        t0 = time.monotonic()
        assert _read_errno(tmp_path / "mnt" / "victim.bin") == errno.EIO
        assert time.monotonic() - t0 < 20
        # The mount is alive and serves what is intact.
        if damage == "flip":
            assert (tmp_path / "mnt" / "bystander.txt").read_bytes() == b"still fine\n" * 1000
        assert os.listdir(tmp_path / "mnt") == ["bystander.txt", "victim.bin"]
        stats = m.stats()
        assert stats["read_errors"] >= 1
    # Nothing corrupt was cached: the disk cache holds only verified chunks.
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30)
    for digest, chunk in cache.get_many(cache.digests()).items():
        assert hashlib.sha256(zstandard.decompress(chunk.data) if chunk.codec else chunk.data).digest() == digest
    cache.close()


def test_corrupt_disk_cache_entry_is_refetched(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "c:1", "--store", local_store)
    with mounted("c:1", tmp_path / "mnt", local_store, tmp_path / "cache"):
        assert (tmp_path / "mnt" / "victim.bin").read_bytes() == (src / "victim.bin").read_bytes()
    # Flip one byte of every cached chunk where it lies in the cache file: bit rot.
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30)
    stored = [c.data for c in cache.get_many(cache.digests()).values()]
    cache.close()
    assert stored
    data_file = tmp_path / "cache" / "chunks.lmdb" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    for data in stored:
        at = raw.find(data[len(data) // 2 : len(data) // 2 + 16])
        assert at > 0
        raw[at] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    shutil.rmtree(tmp_path / "cache" / "hot", ignore_errors=True)  # the start-up's own file would serve them first
    with mounted("c:1", tmp_path / "mnt", local_store, tmp_path / "cache") as m:
        assert (tmp_path / "mnt" / "victim.bin").read_bytes() == (src / "victim.bin").read_bytes()
        stats = m.stats()
        assert stats["tiers"]["disk"]["errors"] >= 1
        assert stats["tiers"]["store"]["hits"] >= 1


def test_unknown_manifest_version_is_refused(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "v:1", "--store", local_store)
    manifest = _store_path(local_store) / "manifests" / "v" / "1"
    doc = json.loads(manifest.read_text())
    doc["version"] = 99
    manifest.write_text(json.dumps(doc))
    res = run_cubefs("inspect", "v:1", "--store", local_store, check=False)
    assert res.returncode == 6
    assert "version 99" in res.stderr and "v:1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "mnt").mkdir()
    res = run_cubefs("mount", "v:1", str(tmp_path / "mnt"), "--store", local_store, "--cache-dir",
                     str(tmp_path / "cache"), check=False)
    assert res.returncode == 6, res.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_unknown_image_version_is_refused(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    built = json.loads(run_cubefs("build", str(src), "--tag", "iv:1", "--store", local_store, "--json").stdout)
    root = _store_path(local_store)
    raw = zstandard.ZstdDecompressor().decompress((root / "images" / built["image"]).read_bytes())
    doc = msgpack.unpackb(raw, raw=False)
    doc["version"] = 2
    raw2 = msgpack.packb(doc, use_bin_type=True)
    digest2 = hashlib.sha256(raw2).hexdigest()
    (root / "images" / digest2).write_bytes(zstandard.ZstdCompressor().compress(raw2))
    (root / chunkmap_key(digest2)).write_bytes((root / chunkmap_key(built["image"])).read_bytes())
    manifest = root / "manifests" / "iv" / "1"
    manifest.write_text(manifest.read_text().replace(built["image"], digest2))
    res = run_cubefs("inspect", "iv:1", "--store", local_store, check=False)
    assert res.returncode == 6
    assert "format version 2 is not supported" in res.stderr


def test_missing_image_metadata(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    built = json.loads(run_cubefs("build", str(src), "--tag", "m:1", "--store", local_store, "--json").stdout)
    (_store_path(local_store) / "images" / built["image"]).unlink()
    res = run_cubefs("inspect", "m:1", "--store", local_store, check=False)
    assert res.returncode == 3
    assert built["image"] in res.stderr
    res = run_cubefs("inspect", "nope:1", "--store", local_store, check=False)
    assert res.returncode == 3 and "nope:1 not found" in res.stderr


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


HOSTILE = {
    "dotdot": ([(_member("ok.txt"), b"fine"), (_member("../../etc/evil"), b"pwned")], "escapes the tree"),
    "dotdot-inner": ([(_member("a/../../evil"), b"pwned")], "escapes the tree"),
    "hardlink-out": ([(_member("link", tarfile.LNKTYPE, "../../etc/passwd"), None)], "escapes the tree"),
    "hardlink-missing": ([(_member("link", tarfile.LNKTYPE, "etc/passwd"), None)], "not an earlier file"),
    "long-name": ([(_member("d/" + "n" * 300), b"x")], "over 255 bytes"),
    "through-symlink": (
        [(_member("etc", tarfile.SYMTYPE, "/etc"), None), (_member("etc/passwd"), b"root::0:0::/:/bin/sh\n")],
        "which is a symlink",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball_is_refused_and_store_untouched(tmp_path: Path, local_store: str, case: str) -> None:
    members, message = HOSTILE[case]
    tarball = _tar(tmp_path / f"{case}.tar", members)
    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "good:1", "--store", local_store)
    before = sorted(p.relative_to(_store_path(local_store)) for p in _store_path(local_store).rglob("*"))
    res = run_cubefs("build", str(tarball), "--tag", "evil:1", "--store", local_store, check=False)
    assert res.returncode == 4, res.stderr
    assert message in res.stderr and str(tarball) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    after = sorted(p.relative_to(_store_path(local_store)) for p in _store_path(local_store).rglob("*"))
    assert not [p for p in after if "evil" in str(p)]
    assert set(before) <= set(after)  # nothing stored before was removed or replaced
    listed = json.loads(run_cubefs("images", "--store", local_store, "--json").stdout)
    assert [i["ref"] for i in listed] == ["good:1"]
    assert not os.path.exists("/etc/evil")


def test_truncated_and_garbage_tarballs(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    tarball = tmp_path / "t.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(src, arcname=".")
    data = tarball.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    res = run_cubefs("build", str(cut), "--tag", "cut:1", "--store", local_store, check=False)
    assert res.returncode == 4, res.stderr
    assert "cut.tar.gz" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tarball at all\n" * 100)
    res = run_cubefs("build", str(garbage), "--tag", "g:1", "--store", local_store, check=False)
    assert res.returncode == 4 and "garbage.tar" in res.stderr
    res = run_cubefs("build", str(tmp_path / "missing"), "--tag", "g:1", "--store", local_store, check=False)
    assert res.returncode == 3
    listed = json.loads(run_cubefs("images", "--store", local_store, "--json").stdout)
    assert listed == []


def test_symlink_out_of_tree_does_not_pull_outside_content(tmp_path: Path, local_store: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc", src / "etc-escape")
    os.symlink("../../../../../../etc/passwd", src / "passwd-escape")
    built = json.loads(run_cubefs("build", str(src), "--tag", "esc:1", "--store", local_store, "--json").stdout)
    assert built["files"] == 0 and built["logical_bytes"] == 0
    with mounted("esc:1", tmp_path / "mnt", local_store, tmp_path / "cache"):
        assert os.readlink(tmp_path / "mnt" / "etc-escape") == "/etc"
        assert os.readlink(tmp_path / "mnt" / "passwd-escape") == "../../../../../../etc/passwd"


def test_bad_names_and_urls(tmp_path: Path, local_store: str) -> None:
    src = _small_tree(tmp_path)
    for bad in ("UPPER:1", "a//b:1", "../x:1", "x:bad/tag"):
        res = run_cubefs("build", str(src), "--tag", bad, "--store", local_store, check=False)
        assert res.returncode == 2, (bad, res.stderr)
    res = run_cubefs("images", "--store", "ftp://nowhere", check=False)
    assert res.returncode == 2 and "unknown store URL" in res.stderr


def test_store_down_build_fails_fast(tmp_path: Path) -> None:
    src = _small_tree(tmp_path)
    port = free_ports(1)[0]  # nothing listens there
    t0 = time.monotonic()
    res = run_cubefs("build", str(src), "--tag", "down:1", "--store", "s3://bucket/x",
                     "--s3-endpoint", f"http://127.0.0.1:{port}", check=False, timeout=120)
    assert res.returncode == 5, res.stderr
    assert "s3://bucket/x" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 60


def test_store_down_during_mount_gives_eio_then_recovers(tmp_path: Path) -> None:
    """A store that goes away: reads fail with EIO within the bound, the mount stays,
    and once the store is back (same address) the same mount serves again."""
    server = start_s3_server(tmp_path / "weed")
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "read-before").write_bytes(os.urandom(200_000))
        (src / "read-after").write_bytes(os.urandom(200_000))
        store = server.store("down", "img")
        run_cubefs("build", str(src), "--tag", "d:1", "--store", store, "--s3-endpoint", server.endpoint)
        # Each file is its own read request; with no disk cache and 1M of memory cache,
        # read-after can only come from the store, which is down by then.
        with mounted("d:1", tmp_path / "mnt", store, tmp_path / "cache", "--read-timeout", "15",
                     "--store-attempts", "2", "--store-timeout", "3", "--cache-size", "0",
                     "--memory-cache", "1M", s3_endpoint=server.endpoint) as m:
            assert (tmp_path / "mnt" / "read-before").read_bytes() == (src / "read-before").read_bytes()
            server.stop()
            t0 = time.monotonic()
            assert _read_errno(tmp_path / "mnt" / "read-after") == errno.EIO
            assert time.monotonic() - t0 < 16
            assert os.path.ismount(tmp_path / "mnt")
            assert sorted(os.listdir(tmp_path / "mnt")) == ["read-after", "read-before"]
            assert m.stats()["read_errors"] >= 1
            server = start_s3_server(tmp_path / "weed", ports=server.ports)  # same data, same address
            deadline = time.monotonic() + 120  # its volume server needs a moment to rejoin
            while True:
                try:
                    data = (tmp_path / "mnt" / "read-after").read_bytes()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the mount did not serve again after the store came back"
                    time.sleep(1)
            assert data == (src / "read-after").read_bytes()
    finally:
        server.stop()


def test_control_clients_that_hang_up_do_not_kill_the_mount(tmp_path: Path, local_store: str) -> None:
    import socket

    from cubefs.node.control import socket_path

    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "ctl:1", "--store", local_store)
    mnt = tmp_path / "mnt"
    with mounted("ctl:1", mnt, local_store, tmp_path / "cache") as m:
        for payload in (b"", b"GET /sta", b"GET /stats HTTP/1.0\r\n\r\n", b"\xff" * 10000):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(socket_path(str(mnt)))
                if payload:
                    s.sendall(payload)
            time.sleep(0.2)
            assert os.path.ismount(mnt)
        assert (mnt / "bystander.txt").read_bytes() == b"still fine\n" * 1000
        assert m.stats()["read_errors"] == 0


def test_unusable_disk_cache_is_not_a_dead_mount(tmp_path: Path, local_store: str) -> None:
    """A file where the cache environment should be: the mount serves from the
    store without a disk tier, and says so in its log."""
    src = _small_tree(tmp_path)
    run_cubefs("build", str(src), "--tag", "dc:1", "--store", local_store)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "chunks.lmdb").write_bytes(b"in the way")
    with mounted("dc:1", tmp_path / "mnt", local_store, tmp_path / "cache") as m:
        assert (tmp_path / "mnt" / "victim.bin").read_bytes() == (src / "victim.bin").read_bytes()
        stats = m.stats()
        assert "disk" not in stats["tiers"] and stats["read_errors"] == 0
    logs = "".join(p.read_text() for p in (tmp_path / "cache" / "logs").iterdir())
    assert "disk cache in" in logs and "serving without it" in logs


def test_unreadable_source_file_fails_the_build_in_one_line(tmp_path: Path, local_store: str) -> None:
    """A source whose file read fails (here: EIO from a cubefs mount over a damaged
    pack) stops the build with the path and the reason, and no manifest."""
    src = _small_tree(tmp_path)
    inner = f"file://{tmp_path / 'inner'}"
    run_cubefs("build", str(src), "--tag", "inner:1", "--store", inner)
    pack = _only_pack(inner)
    pack.write_bytes(pack.read_bytes()[:100])  # truncate: victim.bin can no longer be read
    with mounted("inner:1", tmp_path / "mnt", inner, tmp_path / "cache"):
        res = run_cubefs("build", str(tmp_path / "mnt"), "--tag", "outer:1", "--store", local_store, check=False)
    assert res.returncode == 4, res.stderr
    assert "cannot read" in res.stderr and "victim.bin" in res.stderr and "Input/output error" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert json.loads(run_cubefs("images", "--store", local_store, "--json").stdout) == []
