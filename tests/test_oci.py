"""cubefs convert: OCI layouts, docker save archives and a real registry (Debian's
docker-registry, images pushed with skopeo), checked against umoci's unpack."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports, mounted, run_cubefs
from test_volumes import tree_state

MTIME = 1_700_000_000


def _member(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
            link: str = "", xattrs: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.linkname = link
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _add_device(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.BLKTYPE
    info.devmajor, info.devminor = 8, 0
    tf.addfile(info)


def layer(build: object) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)  # type: ignore[operator]
    return gzip.compress(raw.getvalue(), mtime=0)


def write_layout(path: Path, layers: list[bytes], ref: str = "test") -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    diff_ids = [f"sha256:{hashlib.sha256(gzip.decompress(x)).hexdigest()}" for x in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/bin:/bin", "APP=cubefs"], "Cmd": ["/bin/app", "--serve"],
                         "WorkingDir": "/srv", "User": "1000:1000"},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **put(json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(x)} for x in layers]}
    mdesc = put(json.dumps(manifest).encode())
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
                       "annotations": {"org.opencontainers.image.ref.name": ref}}]}))


BASE = os.urandom(200_000)


def layer1(tf: tarfile.TarFile) -> None:
    _member(tf, "etc", tarfile.DIRTYPE, mode=0o755)
    _member(tf, "etc/keep", data=b"keep v1\n")
    _member(tf, "etc/remove-me", data=b"x")
    _member(tf, "opq", tarfile.DIRTYPE, mode=0o755)
    _member(tf, "opq/a", data=b"lower a")
    _member(tf, "opq/sub", tarfile.DIRTYPE, mode=0o700)
    _member(tf, "opq/sub/b", data=b"lower b")
    _member(tf, "replaced-dir", tarfile.DIRTYPE, mode=0o755)
    _member(tf, "replaced-dir/c", data=b"c")
    _member(tf, "replaced-file", data=b"f")
    _member(tf, "base", data=BASE, mode=0o4755)
    _member(tf, "base-link", tarfile.LNKTYPE, link="base")
    _member(tf, "abs", tarfile.SYMTYPE, link="/etc/keep")
    _member(tf, "fifo", tarfile.FIFOTYPE, mode=0o600)
    _member(tf, "attrs", data=b"with xattrs", xattrs={"user.origin": "layer1"})


def layer2(tf: tarfile.TarFile) -> None:
    _member(tf, "etc/.wh.remove-me")
    _member(tf, "etc/keep", data=b"keep v2\n")
    _member(tf, "opq", tarfile.DIRTYPE, mode=0o750)
    _member(tf, "opq/new", data=b"upper")
    _member(tf, "opq/.wh..wh..opq")  # after an entry of its own layer: that entry stays
    _member(tf, "replaced-dir", data=b"now a file")
    _member(tf, "replaced-file", tarfile.DIRTYPE, mode=0o755)
    _member(tf, "replaced-file/inner", data=b"inner")
    _member(tf, "link-to-lower", tarfile.LNKTYPE, link="base")


def layer3(tf: tarfile.TarFile) -> None:
    _member(tf, "srv", tarfile.DIRTYPE, mode=0o755)
    _member(tf, "srv/app.conf", data=b"port=80\n")
    _member(tf, "abs", tarfile.SYMTYPE, link="/srv/app.conf")  # a symlink replaced by another


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    write_layout(path, [layer(layer1), layer(layer2), layer(layer3)])
    return path


@pytest.fixture
def reference(tmp_path: Path, layout: Path) -> Path:
    """The same image as umoci unpacks it: what the mounted tree must equal."""
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:test", str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


def test_convert_an_oci_layout_equals_umoci_unpack(tmp_path: Path, local_store: str, layout: Path,
                                                   reference: Path) -> None:
    res = json.loads(run_cubefs("convert", f"oci:{layout}:test", "--tag", "conv:1", "--store", local_store,
                                "--json").stdout)
    assert res["files"] == 7  # keep, new, replaced-dir, inner, base (3 names), attrs, app.conf
    with mounted("conv:1", tmp_path / "mnt", local_store, tmp_path / "cache"):
        mnt = tmp_path / "mnt"
        assert tree_state(mnt) == tree_state(reference)
        assert sorted(os.listdir(mnt / "opq")) == ["new"]  # the opaque directory hid layer 1's entries
        assert not (mnt / "etc" / "remove-me").exists()
        assert (mnt / "replaced-dir").read_bytes() == b"now a file"
        assert os.stat(mnt / "link-to-lower").st_nlink == 3 and (mnt / "link-to-lower").read_bytes() == BASE
        assert os.readlink(mnt / "abs") == "/srv/app.conf"
    info = json.loads(run_cubefs("inspect", "conv:1", "--store", local_store, "--json").stdout)
    assert info["config"]["Cmd"] == ["/bin/app", "--serve"] and info["config"]["WorkingDir"] == "/srv"
    assert info["config"]["Env"] == ["PATH=/usr/bin:/bin", "APP=cubefs"] and info["config"]["User"] == "1000:1000"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry on a loopback port of its own."""
    port = free_ports(1)[0]
    cfg = tmp_path / "registry.yml"
    cfg.write_text(f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {tmp_path / 'registry'}}}}}\n"
                   f"http: {{addr: 127.0.0.1:{port}}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "registry.log", "wb"))
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_registry_and_docker_archive_give_the_same_image(tmp_path: Path, local_store: str, layout: Path,
                                                         registry: str) -> None:
    direct = json.loads(run_cubefs("convert", f"oci:{layout}:test", "--tag", "conv:1", "--store", local_store,
                                   "--json").stdout)
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:test",
                    f"docker://{registry}/cubefs/test:v1"], check=True, capture_output=True)
    pulled = json.loads(run_cubefs("convert", f"docker://{registry}/cubefs/test:v1", "--insecure", "--tag",
                                   "conv:2", "--store", local_store, "--json").stdout)
    assert pulled["image"] == direct["image"]  # the same tree, to the last byte and mode
    assert pulled["new_chunks"] == 0  # and nothing to upload twice
    archive = tmp_path / "saved.tar"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:test", f"docker-archive:{archive}:cubefs/test:v1"], check=True,
                   capture_output=True)
    saved = json.loads(run_cubefs("convert", f"docker-archive:{archive}", "--tag", "conv:3", "--store", local_store,
                                  "--json").stdout)
    assert saved["image"] == direct["image"]
    res = run_cubefs("convert", f"docker://{registry}/cubefs/test:nope", "--insecure", "--tag", "x:1", "--store",
                     local_store, check=False)
    assert res.returncode == 3 and "not found" in res.stderr


def _hostile(tmp_path: Path, local_store: str, build: object, name: str) -> str:
    path = tmp_path / name
    write_layout(path, [layer(layer1), layer(build)])
    res = run_cubefs("convert", f"oci:{path}", "--tag", f"{name}:1", "--store", local_store, check=False)
    assert res.returncode == 4, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    return res.stderr


def test_hostile_layers_are_refused_with_one_line(tmp_path: Path, local_store: str) -> None:
    err = _hostile(tmp_path, local_store, lambda tf: _member(tf, "../escape", data=b"x"), "dotdot")
    assert "layer 2" in err and "escapes the tree" in err
    err = _hostile(tmp_path, local_store, lambda tf: _member(tf, "pw", tarfile.LNKTYPE, link="../../etc/passwd"),
                   "hardlink")
    assert "escapes the tree" in err
    err = _hostile(tmp_path, local_store, lambda tf: (_member(tf, "up", tarfile.SYMTYPE, link="/etc"),
                                                     _member(tf, "up/passwd", data=b"owned")), "through")
    assert "written through 'up'" in err
    # A device node: left out, with one line that says so; kept on request.
    path = tmp_path / "device"
    write_layout(path, [layer(layer1), layer(lambda tf: _add_device(tf, "sda"))])
    res = run_cubefs("convert", f"oci:{path}", "--tag", "dev:1", "--store", local_store)
    assert "left out 1 device nodes (sda (8:0))" in res.stderr and "--allow-devices" in res.stderr
    with mounted("dev:1", tmp_path / "dev-mnt", local_store, tmp_path / "dev-cache"):
        assert not (tmp_path / "dev-mnt" / "sda").exists() and (tmp_path / "dev-mnt" / "base").exists()
    run_cubefs("convert", f"oci:{path}", "--tag", "dev:2", "--store", local_store, "--allow-devices")
    with mounted("dev:2", tmp_path / "dev-mnt", local_store, tmp_path / "dev-cache"):
        assert os.stat(tmp_path / "dev-mnt" / "sda", follow_symlinks=False).st_rdev == os.makedev(8, 0)
    # A blob whose bytes are not what its digest says.
    path = tmp_path / "tampered"
    write_layout(path, [layer(layer1), layer(layer2)])
    mdigest = json.loads((path / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((path / "blobs" / "sha256" / mdigest[7:]).read_bytes())
    blob = path / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    blob.write_bytes(layer(layer3))
    res = run_cubefs("convert", f"oci:{path}", "--tag", "tampered:1", "--store", local_store, check=False)
    assert res.returncode == 4 and "layer 2" in res.stderr and "does not match its digest" in res.stderr
    images = run_cubefs("images", "--store", local_store).stdout
    assert "tampered" not in images and "dotdot" not in images  # nothing was tagged


def test_a_zero_bomb_is_stored_as_what_it_is(tmp_path: Path, local_store: str) -> None:
    """512 MiB of zeros compress to half a megabyte in a layer; stored, they take one chunk."""
    raw = tmp_path / "bomb.tar"
    with tarfile.open(raw, "w") as tf:
        info = tarfile.TarInfo("zeros")
        info.size = 512 << 20

        class Zeros(io.RawIOBase):
            left = info.size

            def readinto(self, b: bytearray) -> int:  # type: ignore[override]
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, Zeros())
    path = tmp_path / "bomb"
    write_layout(path, [gzip.compress(raw.read_bytes(), compresslevel=1, mtime=0)])
    raw.unlink()
    res = json.loads(run_cubefs("convert", f"oci:{path}", "--tag", "bomb:1", "--store", local_store,
                                "--json").stdout)
    assert res["logical_bytes"] == 512 << 20 and res["stored_bytes"] < 1 << 20


def test_export_round_trips_through_oci_tools(tmp_path: Path, local_store: str, layout: Path,
                                              reference: Path) -> None:
    """An image exported to an OCI layout unpacks (umoci) to the same tree, and converting
    the export gives back the same image digest."""
    first = json.loads(run_cubefs("convert", f"oci:{layout}:test", "--tag", "conv:1", "--store", local_store,
                                  "--json").stdout)
    out = tmp_path / "exported"
    run_cubefs("export", "conv:1", "--oci", str(out), "--store", local_store, "--cache-dir", str(tmp_path / "c"))
    bundle = tmp_path / "unpacked"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:1", str(bundle)], check=True, capture_output=True)
    assert tree_state(bundle / "rootfs") == tree_state(reference)
    again = json.loads(run_cubefs("convert", f"oci:{out}:1", "--tag", "conv:2", "--store", local_store,
                                  "--json").stdout)
    assert again["image"] == first["image"] and again["new_chunks"] == 0
    info = json.loads(run_cubefs("inspect", "conv:2", "--store", local_store, "--json").stdout)
    assert info["config"]["Cmd"] == ["/bin/app", "--serve"]


def test_du_counts_shared_chunks_once_and_compares_with_layer_dedup(tmp_path: Path, local_store: str) -> None:
    l1, l2, l3 = layer(layer1), layer(layer2), layer(layer3)
    write_layout(tmp_path / "one", [l1, l2])
    write_layout(tmp_path / "two", [l1, l3])
    for name, tag in (("one", "fam:1"), ("two", "fam:2")):
        run_cubefs("convert", f"oci:{tmp_path / name}", "--tag", tag, "--store", local_store)
    du = json.loads(run_cubefs("du", "--store", local_store, "--json").stdout)
    assert du["layer_dedup_bytes"] == len(l1) + len(l2) + len(l3)  # the shared layer once, as a registry would
    one, two = du["images"]
    assert one["ref"] == "fam:1" and two["ref"] == "fam:2"
    # BASE (200 kB, in both through layer 1) is stored once: the total is less than the sum.
    assert du["stored_bytes"] <= one["stored_bytes"] + two["stored_bytes"] - len(BASE)
    assert 0 < one["unique_bytes"] < one["stored_bytes"] and 0 < two["unique_bytes"] < two["stored_bytes"]
    run_cubefs("rm", "fam:1", "--store", local_store)
    du = json.loads(run_cubefs("du", "--store", local_store, "--json").stdout)
    assert [i["ref"] for i in du["images"]] == ["fam:2"] and du["images"][0]["unique_bytes"] == du["stored_bytes"]


def test_multi_platform_index_picks_the_host_or_platform(tmp_path: Path, local_store: str) -> None:
    """An image index with an amd64 and an arm64 image: the host's is taken unless
    --platform says otherwise; a platform the index lacks is a clear error."""
    path = tmp_path / "multi"
    write_layout(path, [layer(lambda tf: _member(tf, "arch", data=b"amd64"))])
    index = json.loads((path / "index.json").read_text())
    amd = dict(index["manifests"][0], platform={"os": "linux", "architecture": "amd64"})
    other = tmp_path / "other"
    write_layout(other, [layer(lambda tf: _member(tf, "arch", data=b"arm64"))])
    for blob in (other / "blobs" / "sha256").iterdir():
        (path / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
    arm = dict(json.loads((other / "index.json").read_text())["manifests"][0],
               platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
    for desc in (amd, arm):
        desc.pop("annotations", None)
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [arm, amd]}).encode()
    digest = hashlib.sha256(nested).hexdigest()
    (path / "blobs" / "sha256" / digest).write_bytes(nested)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}", "size": len(nested),
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    from cubefs.dedup.oci import host_platform

    host = b"arm64" if host_platform() == "linux/arm64" else b"amd64"  # the machines this runs on are amd64
    for tag, extra, want in (("m:host", (), host), ("m:arm", ("--platform", "linux/arm64"), b"arm64"),
                             ("m:amd", ("--platform", "linux/amd64"), b"amd64")):
        run_cubefs("convert", f"oci:{path}:multi", "--tag", tag, "--store", local_store, *extra)
        with mounted(tag, tmp_path / "mnt", local_store, tmp_path / "cache"):
            assert (tmp_path / "mnt" / "arch").read_bytes() == want
    res = run_cubefs("convert", f"oci:{path}:multi", "--tag", "m:s390", "--store", local_store, "--platform",
                     "linux/s390x", check=False)
    assert res.returncode == 3 and "no image for platform linux/s390x" in res.stderr and "linux/arm64" in res.stderr


def test_layers_read_like_tar_reads_them(tmp_path: Path, local_store: str, rootfs: Path) -> None:
    """A Debian root filesystem as GNU tar writes it (long names, hard links, devices,
    xattrs), built as a tarball (Python's tarfile) and converted as a layer (our
    stream reader): the same image, digest for digest."""
    tarball = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "--xattrs", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
                   check=True)
    built = json.loads(run_cubefs("build", str(tarball), "--tag", "viatar:1", "--store", local_store,
                                  "--json").stdout)
    write_layout(tmp_path / "lay", [gzip.compress(tarball.read_bytes(), compresslevel=1, mtime=0)])
    tarball.unlink()
    converted = json.loads(run_cubefs("convert", f"oci:{tmp_path / 'lay'}", "--tag", "viaoci:1", "--allow-devices",
                                      "--store", local_store, "--json").stdout)
    assert converted["image"] == built["image"] and converted["files"] == built["files"] > 6000
