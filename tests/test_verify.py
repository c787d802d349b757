"""A build never tags an image it cannot read back, and ``cubefs verify`` says
what is wrong with one that cannot be (issue 12, part 6).  Real CLI, a
``file://`` store; the damage (a pack index that lost a chunk, a flipped byte
in a pack, a pack gone) is done by hand, as a bad disk or a bad tool would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zstandard
from conftest import S3_ENV, S3Server, mounted, run_cubefs

from cubefs.format.packs import decode_index, encode_index, index_key, pack_key


def _tree(root: Path, version: int = 1) -> dict[str, bytes]:
    rnd = __import__("random").Random(7)
    files = {f"lib/m{i}.so": rnd.randbytes(200_000) for i in range(4)}
    files["etc/version"] = f"version {version}\n".encode()
    if version > 1:  # one file changed a little: its chunks become deltas of version 1's
        data = bytearray(files["lib/m1.so"])
        data[1000:1010] = b"v%09d" % version
        files["lib/m1.so"] = bytes(data)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _indexes(store_dir: Path) -> list[Path]:
    return sorted(p for p in (store_dir / "indexes").iterdir() if not p.name.startswith("."))


def _drop_from_index(store_dir: Path, digest: bytes) -> None:
    """Rewrite the pack index that lists ``digest`` without it."""
    for path in _indexes(store_dir):
        key = f"indexes/{path.name}"
        entries = decode_index(path.read_bytes(), key)
        if any(e.digest == digest for e in entries):
            size = (store_dir / pack_key(path.name)).stat().st_size
            path.write_bytes(encode_index(path.name, size, [e for e in entries if e.digest != digest]))
            return
    raise AssertionError("digest in no index")


def _digests_of(store: str, ref: str, rel: str) -> list[bytes]:
    """The chunk digests of one file of an image, in order."""
    from cubefs.image.catalog import load_image, load_manifest
    from cubefs.remote import store_session

    with store_session(store) as (loop, st):
        image, _cmap = loop.run(load_image(st, loop.run(load_manifest(st, ref))))
    ino = dict(image.walk())[b"/" + rel.encode()]
    return [image.chunk(i)[0] for i in image.extents(ino)[1]]


def _verify(store: str, *args: str) -> tuple[int, list[str], str]:
    res = run_cubefs("verify", *args, "--store", store, check=False)
    return res.returncode, res.stdout.splitlines(), res.stderr


def test_a_chunk_lost_from_its_index_is_stored_again_whole(tmp_path: Path) -> None:
    """Issue 12's finding: the previous image's pack index lost a chunk; the next
    build stored it "as a delta of itself", exited 0 and tagged an image that no
    mount could read.  Now: it is stored whole and the image reads back."""
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    files = _tree(tmp_path / "src")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store)
    assert _verify(store, "app:1")[0] == 0
    lost = _digests_of(store, "app:1", "lib/m2.so")[1]
    _drop_from_index(store_dir, lost)

    code, lines, _err = _verify(store, "app:1", "--quick")
    assert code == 4, lines
    assert any("lib/m2.so" in ln and "is not in the pack index" in ln for ln in lines), lines

    out = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:2", "--store", store,
                                "--json").stdout)
    assert out["new_chunks"] >= 1
    assert _verify(store, "app:2")[0] == 0
    with mounted("app:2", tmp_path / "mnt", store, tmp_path / "cache"):
        for rel, data in files.items():
            assert (tmp_path / "mnt" / rel).read_bytes() == data, rel
    res = run_cubefs("export", "app:2", "--oci", str(tmp_path / "oci"), "--store", store, "--cache-dir",
                     str(tmp_path / "cache2"))
    assert "exported app:2" in res.stdout


def test_a_delta_base_missing_from_the_indexes_makes_the_chunk_whole(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    _tree(tmp_path / "v1")
    run_cubefs("build", str(tmp_path / "v1"), "--tag", "app:1", "--store", store)
    # With its base indexed, version 2's changed chunk is a delta...
    files = _tree(tmp_path / "v2", version=2)
    other = f"file://{tmp_path / 'other'}"
    run_cubefs("build", str(tmp_path / "v1"), "--tag", "app:1", "--store", other)
    out = json.loads(run_cubefs("build", str(tmp_path / "v2"), "--tag", "app:2", "--store", other,
                                "--json").stdout)
    assert out["delta_chunks"] >= 1
    # ...without it, it is stored whole, and the image is whole.
    for d in _digests_of(store, "app:1", "lib/m1.so"):
        _drop_from_index(store_dir, d)
    out = json.loads(run_cubefs("build", str(tmp_path / "v2"), "--tag", "app:2", "--store", store,
                                "--json").stdout)
    assert out["delta_chunks"] == 0, out
    code, lines, err = _verify(store, "app:2")
    assert code == 0, (lines, err)
    with mounted("app:2", tmp_path / "mnt", store, tmp_path / "cache"):
        assert (tmp_path / "mnt" / "lib/m1.so").read_bytes() == files["lib/m1.so"]


def test_verify_reads_every_chunk_and_names_what_is_wrong(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    _tree(tmp_path / "src")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store)
    (tmp_path / "src" / "extra").write_bytes(os.urandom(100_000))
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:2", "--store", store)

    code, lines, _err = _verify(store, "--all")
    assert code == 0 and len(lines) == 2 and all(": ok: " in ln for ln in lines), lines

    # One flipped byte in a chunk: the records are fine, the chunk is not.
    target = _digests_of(store, "app:1", "lib/m0.so")[0]
    for path in _indexes(store_dir):
        for e in decode_index(path.read_bytes(), index_key(path.name)):
            if e.digest == target:
                pack = store_dir / pack_key(path.name)
                data = bytearray(pack.read_bytes())
                data[e.offset + e.stored_len // 2] ^= 0xFF
                pack.write_bytes(bytes(data))
    assert _verify(store, "app:1", "--quick")[0] == 0
    code, lines, _err = _verify(store, "app:1")
    assert code == 4
    bad = [ln for ln in lines if "lib/m0.so @0" in ln]
    assert len(bad) == 1 and "app:1: chunk " in bad[0], lines
    res = run_cubefs("verify", "--all", "--json", "--store", store, check=False)
    assert res.returncode == 4
    reports = {r["ref"]: r for r in json.loads(res.stdout)}
    assert not reports["app:1"]["ok"] and len(reports["app:1"]["problems"]) == 1
    assert reports["app:2"]["ok"] is (target not in _digests_of(store, "app:2", "lib/m0.so"))

    # A pack gone: the records say so, without reading a chunk.
    for p in (store_dir / "packs").rglob("*"):
        if p.is_file():
            p.unlink()
            break
    code, lines, _err = _verify(store, "app:2", "--quick")
    assert code == 4 and any("is missing from the store" in ln for ln in lines), lines

    assert _verify(store, "nope:1")[0] == 3
    res = run_cubefs("verify", "--store", store, check=False)
    assert res.returncode == 2 and "usage" in res.stderr


def test_the_records_check_refuses_a_delta_of_itself_or_of_a_delta() -> None:
    """What every build runs before it tags: the safety net under the builder's own
    care (a chunk map "delta of itself" is what issue 12's build tagged)."""
    from cubefs.format.packs import CODEC_DELTA, CODEC_ZSTD, ChunkLocation
    from cubefs.image.verify import check_locations

    whole = ChunkLocation(b"a" * 32, "p" * 64, 8, 100, 200, CODEC_ZSTD)
    selfish = ChunkLocation(b"b" * 32, "p" * 64, 108, 10, 200, CODEC_DELTA)
    selfish = ChunkLocation(b"b" * 32, "p" * 64, 108, 10, 200, CODEC_DELTA, selfish)
    of_delta = ChunkLocation(b"c" * 32, "p" * 64, 118, 10, 200, CODEC_DELTA, selfish)
    good = ChunkLocation(b"d" * 32, "p" * 64, 128, 10, 200, CODEC_DELTA, whole)
    indexes = {"p" * 64: {loc.digest: loc for loc in (whole, selfish, of_delta, good)}}
    problems = check_locations([whole, selfish, of_delta, good], indexes)  # type: ignore[arg-type]
    assert [(p.chunk, p.what.split(" is ", 1)[1]) for p in problems] == [
        (1, "a delta of itself"), (2, "a delta of 6262626262626262, itself a delta")]
    assert check_locations([whole], {})[0].what.endswith("which was not checked")


def test_the_build_refuses_to_tag_what_its_own_check_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection beside the real case above: a delta source that ignores the
    store's indexes (the old bug) makes a chunk map "delta of itself"; the check
    before the tag refuses it, exit 4, and no manifest is written."""
    from cubefs.dedup import builder
    from cubefs.dedup.delta import DeltaBases
    from cubefs.errors import CorruptDataError
    from cubefs.format.packs import delta_dictionary

    store_dir = tmp_path / "store"
    store = f"file://{store_dir}"
    _tree(tmp_path / "src")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store)
    _drop_from_index(store_dir, _digests_of(store, "app:1", "lib/m2.so")[1])
    def old_encode(self: DeltaBases, data: bytes, alone: int, path: bytes, offset: int) -> object:
        """DeltaBases.encode as it was: any base the previous chunk map names, itself too."""
        self.known = None
        base = self.base_for(path, offset)
        plain = self.plaintext(base) if base is not None else None
        if base is None or plain is None:
            return None
        delta = zstandard.ZstdCompressor(level=9, dict_data=delta_dictionary(plain)).compress(data)
        return (delta, base) if len(delta) <= alone * 0.75 else None

    monkeypatch.setattr(DeltaBases, "encode", old_encode)
    with pytest.raises(CorruptDataError) as err:
        builder.build(str(tmp_path / "src"), "app:2", store)
    assert err.value.exit_code == 4
    assert str(err.value).startswith("build of app:2 not tagged: ")
    assert not (store_dir / "manifests" / "app" / "2").exists()
    assert {p.name for p in (store_dir / "manifests").rglob("*") if p.is_file()} == {"1"}


def test_verify_against_a_real_s3_store(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cubefs.remote import store_session

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)

    _tree(tmp_path / "src")
    store = s3.store("verify")
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store, "--s3-endpoint", s3.endpoint)
    res = run_cubefs("verify", "app:1", "--store", store, "--s3-endpoint", s3.endpoint)
    assert res.stdout.startswith("app:1: ok: ")
    with store_session(store, s3.endpoint) as (loop, st):
        pack = loop.run(st.list("packs/"))[0]
        loop.run(st.delete(pack))
    res = run_cubefs("verify", "app:1", "--quick", "--store", store, "--s3-endpoint", s3.endpoint, check=False)
    assert res.returncode == 4 and "is missing from the store" in res.stdout, res.stdout
    res = run_cubefs("verify", "app:1", "--store", store, "--s3-endpoint", s3.endpoint, check=False)
    assert res.returncode == 4 and res.stdout.count("app:1: chunk ") >= 1
