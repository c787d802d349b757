"""Delta chunks: version N+1 of an image stored against version N (codec 2), read
back exactly from a real S3 server and the disk cache, kept alive by gc while
N+1 needs them, and refused clearly when a base is damaged."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import S3Server, mounted, run_cubefs
from test_volumes import tree_state

from cubefs.format.image import Image
from cubefs.format.packs import CODEC_DELTA, ChunkLocation, ChunkMap, chunkmap_key, image_key, pack_key

STDLIB = ("email", "json", "asyncio", "logging", "http")


def _version_1(rootfs: Path, root: Path) -> Path:
    for name in STDLIB:
        shutil.copytree(rootfs / "usr/lib/python3.11" / name, root / "lib" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    info = root / "lib" / "mypkg-1.2.3.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("".join(f"mypkg/{i}.py,sha256={i:064x},{i * 7}\n" for i in range(400)))
    blob = bytearray(os.urandom(3_000_000))
    (root / "data.bin").write_bytes(blob)
    return root


def _version_2(v1: Path, root: Path) -> Path:
    """What an update does: a line added to every module, a dist-info renamed with its
    version, a few bytes of a big file changed, a file added, one removed."""
    shutil.copytree(v1, root, symlinks=True)
    for path in sorted((root / "lib").rglob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        mid = len(lines) // 2
        path.write_text("".join([*lines[:mid], "# patched in 1.2.4\n", *lines[mid:]]))
    old = root / "lib" / "mypkg-1.2.3.dist-info"
    new = root / "lib" / "mypkg-1.2.4.dist-info"
    old.rename(new)
    record = (new / "RECORD").read_text().replace("sha256=0000", "sha256=1111")
    (new / "RECORD").write_text(record + "mypkg/new.py,sha256=00,1\n")
    blob = bytearray((root / "data.bin").read_bytes())
    blob[1_500_000:1_500_100] = os.urandom(100)
    (root / "data.bin").write_bytes(blob)
    (root / "lib" / "json" / "added.py").write_text("ADDED = True\n" * 50)
    (root / "lib" / "http" / "cookies.py").unlink()
    return root


def _small_modules(v1: Path, root: Path) -> Path:
    """The modules of version 1 small enough to be one chunk each: all of them change
    in version 2, so a pack of only these holds nothing version 2 uses but bases."""
    for path in (v1 / "lib").rglob("*.py"):
        if 0 < path.stat().st_size < 16 * 1024:
            dest = root / path.relative_to(v1)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    return root


def _build(src: Path, ref: str, store: str, *extra: str) -> dict[str, object]:
    return json.loads(run_cubefs("build", str(src), "--tag", ref, "--store", store, "--json", *extra).stdout)


def test_an_update_is_stored_as_deltas_and_reads_back_exactly(rootfs: Path, s3: S3Server, tmp_path: Path) -> None:
    v1 = _version_1(rootfs, tmp_path / "v1")
    v2 = _version_2(v1, tmp_path / "v2")
    ep = ("--s3-endpoint", s3.endpoint)
    store = s3.store("delta", "family")
    # Built first, the small modules land in a pack of their own, which version 1 reuses.
    _build(_small_modules(v1, tmp_path / "seed"), "seed:1", store, *ep)
    _build(v1, "lib:1", store, *ep)
    two = _build(v2, "lib:2", store, *ep)
    assert two["delta_chunks"] >= 40 and two["delta_base"] == "lib:1"

    # The same update without deltas, into a store that has version 1 too.
    plain_store = f"file://{tmp_path / 'plain'}"
    _build(v1, "lib:1", plain_store)
    plain = _build(v2, "lib:2", plain_store, "--delta-from", "none")
    assert plain["delta_chunks"] == 0 and plain["image"] == two["image"]  # deltas do not change the image
    assert two["new_stored_bytes"] <= 0.25 * plain["new_stored_bytes"], (two, plain)

    # Every byte reads back, from the store and then from the disk cache alone.
    for i in range(2):
        with mounted("lib:2", tmp_path / f"mnt{i}", store, tmp_path / "cache", s3_endpoint=s3.endpoint) as m:
            assert tree_state(m.mountpoint) == tree_state(v2)
            tiers = m.stats()["tiers"]
            assert (tiers["store"]["bytes"] > 0) == (i == 0), tiers
            assert m.stats()["read_errors"] == 0

    # Version 1 goes; the pack of small modules, which version 2 uses only as bases
    # of its deltas, stays.
    for ref in ("seed:1", "lib:1"):
        run_cubefs("rm", ref, "--store", store, *ep)
    first = json.loads(run_cubefs("gc", "--store", store, *ep, "--json").stdout)
    second = json.loads(run_cubefs("gc", "--store", store, *ep, "--json").stdout)
    assert first["packs_marked"] == 0 and second["packs_deleted"] == 0, (first, second)
    assert first["images_marked"] == 2 and second["images_deleted"] == 2
    with mounted("lib:2", tmp_path / "mnt-after-gc", store, tmp_path / "cache-after-gc",
                 s3_endpoint=s3.endpoint) as m:
        assert tree_state(m.mountpoint) == tree_state(v2)

    # The next version is stored against lib:2 (the newest lib:*), whose own
    # deltas are never bases: a base is always stored whole.
    v3 = tmp_path / "v3"
    shutil.copytree(v2, v3)
    (v3 / "lib" / "json" / "decoder.py").write_text((v2 / "lib/json/decoder.py").read_text() + "# 1.2.5\n")
    three = _build(v3, "lib:3", store, *ep)
    assert three["delta_base"] == "lib:2" and three["delta_chunks"] >= 1
    with mounted("lib:3", tmp_path / "mnt3", store, tmp_path / "cache3", s3_endpoint=s3.endpoint) as m:
        assert tree_state(m.mountpoint) == tree_state(v3)


def test_a_damaged_base_fails_only_the_reads_that_need_it(rootfs: Path, tmp_path: Path) -> None:
    v1 = _version_1(rootfs, tmp_path / "v1")
    v2 = _version_2(v1, tmp_path / "v2")
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    _build(v1, "lib:1", store)
    two = _build(v2, "lib:2", store)
    image = str(two["image"])
    cmap = ChunkMap((store_dir / chunkmap_key(image)).read_bytes(), image, None)
    meta = Image.from_blob((store_dir / image_key(image)).read_bytes(), image)
    # The base of the delta for json/decoder.py's chunk: damage it in its pack.
    ino = dict(meta.walk())[b"/lib/json/decoder.py"]
    idx = meta.extents(ino)[1][0]
    assert cmap.get(idx)[3] == CODEC_DELTA
    base = cmap.base_of(idx)
    assert isinstance(base, ChunkLocation)  # version 1's chunk, which version 2 does not use itself
    path = store_dir / pack_key(base.pack)
    data = bytearray(path.read_bytes())
    data[base.offset + 4] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))

    with mounted("lib:2", tmp_path / "mnt", store, tmp_path / "cache") as m:
        with pytest.raises(OSError) as err:
            (m.mountpoint / "lib/json/decoder.py").read_bytes()
        assert err.value.errno == errno.EIO
        # Files whose chunks do not need that base read as they should.
        assert (m.mountpoint / "data.bin").read_bytes() == (v2 / "data.bin").read_bytes()
        assert (m.mountpoint / "lib/email/utils.py").read_bytes() == (v2 / "lib/email/utils.py").read_bytes()
        assert m.stats()["read_errors"] >= 1
