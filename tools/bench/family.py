#!/usr/bin/env python3
"""A family of related OCI images: what cubefs stores and what a node fetches to
update, against layer-level dedup, measured on the same images (issue 5).

The family, built as OCI layouts the way Dockerfiles build images (gzip
layers, one per step):

  py:1        [B]                   B: Debian bookworm minbase + python3 (the test rootfs)
  pandas:1    [B, P]                P: what apt-get install python3-pandas adds (the bench rootfs, diffed)
  np:1.26.3   [B, N3]               N3: pip install numpy==1.26.3
  np:1.26.4   [B, N4]
  app:1       [B, N4, R31]          R31: pip install requests==2.31.0
  app:2       [B, N4, R32]
  py:2        [B']                  a rebuild of py:1: one config file changed, every mtime moved
  pandas:2    [B', P']              rebuilt on py:2 (same files, new mtimes: new layer digests)
  app:3       [B', N4', R32']       app:2 rebuilt on py:2

Each is converted (``cubefs convert oci:...``) into one local store. Figures:

* **stored**: the store's bytes (``cubefs du``: each chunk once) vs the distinct
  gzip layers a registry keeps: floor <= 0.8;
* **update N -> N+1** (np:1.26.3->np:1.26.4, app:1->app:2, app:2->app:3,
  py:1->py:2, pandas:1->pandas:2): stored bytes of the chunks N+1 has and N
  lacks (new chunks are stored as deltas against N where that is much smaller;
  a delta's base counts as a chunk N+1 has), vs the gzip layers N+1 has and N
  lacks: floor <= 0.25;
* **conversion throughput**: uncompressed layer bytes / seconds, per image.

    sudo .venv/bin/python tools/bench/family.py [--json-out family.json]

Needs the two root filesystems (tools/make_rootfs.py; the second with
``--include python3,python3-pandas``) and PyPI for the pip layers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

SITE = "usr/local/lib/python3.11/dist-packages"


def log(msg: str) -> None:
    print(f"[family] {msg}", file=sys.stderr, flush=True)


def cubefs(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def scan(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, size, mtime, content or link hash), for diffing two trees."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h = ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha1(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                h = os.readlink(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, int(st.st_mtime), h)
    return out


def layer_tar(root: Path, paths: list[str] | None, whiteouts: list[str] = (), prefix: str = "",  # type: ignore[assignment]
              shift: int = 0, patch: dict[str, bytes] | None = None) -> bytes:
    """A gzip layer of ``paths`` under ``root`` (all of it if None), placed under ``prefix``,
    with mtimes moved by ``shift`` and files replaced per ``patch``; deterministic."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        names = paths if paths is not None else sorted(
            os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)
        for rel in names:
            full = root / rel
            info = tf.gettarinfo(str(full), arcname=os.path.join(prefix, rel))
            info.mtime += shift
            info.uname = info.gname = ""
            if patch and rel in patch:
                data = patch[rel]
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            elif info.isreg():
                with open(full, "rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)
        for rel in whiteouts:
            d, n = os.path.split(rel)
            info = tarfile.TarInfo(os.path.join(prefix, d, ".wh." + n))
            tf.addfile(info, io.BytesIO(b""))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def diff_paths(lower: dict[str, Any], upper: dict[str, Any]) -> tuple[list[str], list[str]]:
    changed = sorted(p for p, v in upper.items() if lower.get(p) != v)
    removed = sorted(p for p in lower if p not in upper and os.path.dirname(p) not in lower.keys() - upper.keys())
    return changed, removed


def write_layout(path: Path, layers: list[bytes]) -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["python3"]},
              "rootfs": {"type": "layers", "diff_ids": [
                  f"sha256:{hashlib.sha256(gzip.decompress(x)).hexdigest()}" for x in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(x)} for x in layers]}
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(json.dumps(manifest).encode())}]}))


def pip_tree(work: Path, spec: str) -> Path:
    out = work / "pip" / spec.replace("==", "-")
    if not out.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(out), spec], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path("/var/tmp/cubefs-test/rootfs"))
    ap.add_argument("--pandas", type=Path, default=Path("/var/tmp/cubefs-bench/rootfs-pandas"))
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/cubefs-bench"))
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="family-", dir=args.workdir))
    cache = args.workdir / "family-pip"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, cache: Path) -> int:
    log("scanning the root filesystems")
    base_scan, pandas_scan = scan(args.base), scan(args.pandas)
    p_changed, p_removed = diff_paths(base_scan, pandas_scan)
    os_release = (args.base / "usr/lib/os-release").read_bytes() + b"BUILD_ID=2\n"
    log("making the layers")
    layers: dict[str, bytes] = {
        "B": layer_tar(args.base, None),
        "B'": layer_tar(args.base, None, shift=3600, patch={"usr/lib/os-release": os_release}),
        "P": layer_tar(args.pandas, p_changed, p_removed),
        "P'": layer_tar(args.pandas, p_changed, p_removed, shift=3600),
    }
    for key, spec in (("N3", "numpy==1.26.3"), ("N4", "numpy==1.26.4"), ("R31", "requests==2.31.0"),
                      ("R32", "requests==2.32.3")):
        layers[key] = layer_tar(pip_tree(cache, spec), None, prefix=SITE)
    layers["N4'"] = layer_tar(pip_tree(cache, "numpy==1.26.4"), None, prefix=SITE, shift=3600)
    layers["R32'"] = layer_tar(pip_tree(cache, "requests==2.32.3"), None, prefix=SITE, shift=3600)
    family = {
        "py:1": ["B"], "pandas:1": ["B", "P"], "np:1.26.3": ["B", "N3"], "np:1.26.4": ["B", "N4"],
        "app:1": ["B", "N4", "R31"], "app:2": ["B", "N4", "R32"], "py:2": ["B'"], "pandas:2": ["B'", "P'"],
        "app:3": ["B'", "N4'", "R32'"],
    }
    store = f"file://{work / 'store'}"
    conv = []
    for ref, keys in family.items():
        layout = work / "oci" / ref.replace(":", "-")
        write_layout(layout, [layers[k] for k in keys])
        plain = sum(len(gzip.decompress(layers[k])) for k in keys)
        t0 = time.perf_counter()
        cubefs("convert", f"oci:{layout}", "--tag", ref, "--store", store, "--no-progress")
        dt = time.perf_counter() - t0
        conv.append({"ref": ref, "layer_bytes": plain, "seconds": dt, "mb_per_s": plain / dt / 1e6})
        log(f"converted {ref}: {plain / 1e6:.0f} MB of layers in {dt:.1f} s ({plain / dt / 1e6:.0f} MB/s)")
    du = json.loads(cubefs("du", "--store", store, "--json"))
    registry = sum(len(layers[k]) for k in {k for keys in family.values() for k in keys})
    chunks = image_chunks(work / "store", [m["ref"] for m in du["images"]], store)
    updates = []
    for old, new in (("np:1.26.3", "np:1.26.4"), ("app:1", "app:2"), ("app:2", "app:3"), ("py:1", "py:2"),
                     ("pandas:1", "pandas:2")):
        cub = sum(s for c, s in chunks[new].items() if c not in chunks[old])
        lay = sum(len(layers[k]) for k in set(family[new]) - set(family[old]))
        updates.append({"from": old, "to": new, "cubefs_bytes": cub, "layer_bytes": lay, "ratio": cub / lay})
    result = {"images": len(family), "logical_bytes": du["logical_bytes"], "stored_bytes": du["stored_bytes"],
              "registry_layer_bytes": registry, "stored_over_layers": du["stored_bytes"] / registry,
              "updates": updates, "conversions": conv,
              "convert_mb_per_s_median": statistics.median(c["mb_per_s"] for c in conv),
              "convert_mb_per_s_first": conv[0]["mb_per_s"]}
    print(f"cubefs image family: {len(family)} images, {du['logical_bytes'] / 1e6:.0f} MB of files")
    print(f"  stored by cubefs {du['stored_bytes'] / 1e6:8.1f} MB   distinct gzip layers {registry / 1e6:8.1f} MB   "
          f"ratio {result['stored_over_layers']:.3f} (floor <= 0.8)")
    print("  update                     cubefs fetch   layer fetch   ratio (floor <= 0.25)")
    for u in updates:
        print(f"  {u['from']:>10} -> {u['to']:10} {u['cubefs_bytes'] / 1e6:10.2f} MB {u['layer_bytes'] / 1e6:10.2f} MB"
              f"   {u['ratio']:.3f}")
    print(f"  conversion: median {result['convert_mb_per_s_median']:.0f} MB/s of layer data; the first image "
          f"(all new) {result['convert_mb_per_s_first']:.0f} MB/s (floor >= 100)")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


def image_chunks(store_dir: Path, refs: list[str], store: str) -> dict[str, dict[str, int]]:
    """Per image: the chunks a reader may fetch (by digest: its own, and the bases of
    its deltas) and their stored sizes, from its chunk map."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cubefs.image.catalog import load_image, load_manifest
    from cubefs.remote import store_session

    out: dict[str, dict[str, int]] = {}
    with store_session(store) as (loop, st):
        for ref in refs:
            image, cmap = loop.run(load_image(st, loop.run(load_manifest(st, ref))))
            out[ref] = {image.chunk(i)[0].hex(): cmap.get(i)[2] for i in range(image.nchunks)}
            out[ref].update((b.digest.hex(), b.stored_len) for b in cmap.bases)
    return out


if __name__ == "__main__":
    sys.exit(main())
