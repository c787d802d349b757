"""``cubefs export NAME:TAG --oci DIR``: an image back to an OCI image layout.

So no one is locked in: the layout holds one gzip layer with the whole tree
(every mode, owner, nanosecond time, xattr, hard link, device node and
symlink, as the image metadata has them) and a config carrying the runtime
settings ``cubefs convert`` kept. Metadata comes from the image itself; file
bytes are read through a private read-only mount, so they are fetched,
cached and verified like any read. ``cubefs convert oci:DIR`` of the result
gives back the same image digest.

A layout that already exists gets the new image added to its index (the
ref name replaced if it was there); blobs are written under a temporary
name and renamed when their digest is known, so a crash leaves no blob under
a wrong name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from typing import IO, Any

from cubefs.format.image import F_ATIME, F_CTIME, F_GID, F_MODE, F_MTIME, F_PAYLOAD, F_RDEV, F_SIZE, F_UID, F_XATTRS
from cubefs.image.catalog import load_image, load_manifest
from cubefs.node.private_mount import private_mount
from cubefs.remote import store_session

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class _Hashing:
    """Writes through to ``f``, hashing (and counting) what passes."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def export_oci(ref: str, layout: str, store_url: str | None, s3_endpoint: str | None, cache_dir: str,
               tag: str | None = None) -> dict[str, Any]:
    with store_session(store_url, s3_endpoint) as (loop, store):
        manifest = loop.run(load_manifest(store, ref))
        image, _chunkmap = loop.run(load_image(store, manifest))
        url = store.url
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    with private_mount(f"export of {ref}", ref, "--store", url, *(["--s3-endpoint", s3_endpoint] if s3_endpoint
                       else []), "--cache-dir", cache_dir) as mnt:
        layer, diff_id = _write_layer(image, mnt, blobs)
    cfg = dict(manifest.config)
    config = {"architecture": cfg.pop("architecture", "amd64"), "os": cfg.pop("os", "linux"),
              "config": {k: v for k, v in cfg.items() if k != "variant"},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created_by": f"cubefs export {manifest.ref} (sha256:{image.digest})"}]}
    config_desc = _put_blob(blobs, json.dumps(config, sort_keys=True).encode(),
                            "application/vnd.oci.image.config.v1+json")
    oci_manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": [layer]}
    mdesc = _put_blob(blobs, json.dumps(oci_manifest, sort_keys=True).encode(),
                      "application/vnd.oci.image.manifest.v1+json")
    name = tag or manifest.tag
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": name}
    _add_to_index(layout, mdesc, name)
    return {"ref": manifest.ref, "layout": layout, "name": name, "manifest": mdesc["digest"],
            "layer": layer["digest"], "layer_bytes": layer["size"]}


def _write_layer(image: Any, mnt: str, blobs: str) -> tuple[dict[str, Any], str]:
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    with os.fdopen(fd, "wb") as out:
        packed = _Hashing(out)
        with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=6, mtime=0) as gz:  # type: ignore[arg-type]
            plain = _Hashing(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[arg-type]
                seen: dict[int, str] = {}
                for path, ino in image.walk():
                    name = os.fsdecode(path.lstrip(b"/")) or "."  # the root too: its mode and times
                    rec = image.record(ino)
                    mode = rec[F_MODE]
                    if not stat.S_ISDIR(mode) and ino in seen:
                        info = tarfile.TarInfo(name)
                        info.type = tarfile.LNKTYPE
                        info.linkname = seen[ino]
                        _meta(info, rec)
                        tf.addfile(info)
                        continue
                    seen[ino] = name
                    info = tarfile.TarInfo(name)
                    _meta(info, rec)
                    if stat.S_ISREG(mode):
                        info.size = rec[F_SIZE]
                        with open(os.path.join(mnt, name), "rb") as f:
                            tf.addfile(info, f)
                        continue
                    if stat.S_ISDIR(mode):
                        info.type = tarfile.DIRTYPE
                    elif stat.S_ISLNK(mode):
                        info.type = tarfile.SYMTYPE
                        info.linkname = os.fsdecode(rec[F_PAYLOAD])
                    elif stat.S_ISFIFO(mode):
                        info.type = tarfile.FIFOTYPE
                    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                        info.devmajor, info.devminor = os.major(rec[F_RDEV]), os.minor(rec[F_RDEV])
                    else:
                        continue  # sockets have no tar form
                    tf.addfile(info)
    digest = packed.sha.hexdigest()
    os.replace(tmp, os.path.join(blobs, digest))
    return ({"mediaType": LAYER_TYPE, "digest": f"sha256:{digest}", "size": packed.size},
            f"sha256:{plain.sha.hexdigest()}")


def _meta(info: tarfile.TarInfo, rec: list[Any]) -> None:
    info.mode = stat.S_IMODE(rec[F_MODE])
    info.uid, info.gid = rec[F_UID], rec[F_GID]
    info.uname = info.gname = ""
    info.mtime = rec[F_MTIME] // 10**9
    pax = {"mtime": _ns(rec[F_MTIME]), "atime": _ns(rec[F_ATIME]), "ctime": _ns(rec[F_CTIME])}
    for k, v in rec[F_XATTRS]:
        pax["SCHILY.xattr." + k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
    info.pax_headers = pax


def _ns(ns: int) -> str:
    sec, frac = divmod(ns, 10**9)
    return f"{sec}.{frac:09d}"


def _put_blob(blobs: str, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(blobs, digest)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _add_to_index(layout: str, desc: dict[str, Any], name: str) -> None:
    index_path = os.path.join(layout, "index.json")
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                             "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            index = json.load(f)
    index["manifests"] = [m for m in index.get("manifests") or []
                          if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != name]
    index["manifests"].append(desc)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    tmp = index_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, index_path)
