"""A real Debian root filesystem, built into a real S3 server, mounted and run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import S3Server, mounted, run_cubefs


def test_debian_rootfs_from_s3_runs_python_lazily(rootfs: Path, s3: S3Server, tmp_path: Path) -> None:
    store = s3.store("rootfs", "images")
    ep = ("--s3-endpoint", s3.endpoint)
    built = json.loads(run_cubefs("build", str(rootfs), "--tag", "debian:bookworm", "--store", store, *ep,
                                  "--json").stdout)
    assert built["files"] > 3000
    listed = json.loads(run_cubefs("images", "--store", store, *ep, "--json").stdout)
    assert [i["ref"] for i in listed] == ["debian:bookworm"]
    info = json.loads(run_cubefs("inspect", "debian:bookworm", "--store", store, *ep, "--json").stdout)
    assert info["image"] == f"sha256:{built['image']}"

    mnt = tmp_path / "mnt"
    with mounted("debian:bookworm", mnt, store, tmp_path / "cache", s3_endpoint=s3.endpoint) as m:
        before = m.stats()
        assert before["tiers"]["store"]["bytes"] == 0, "mounting must fetch metadata only"
        res = subprocess.run(["chroot", str(mnt), "python3", "-c", "import json; print(json.dumps([42]))"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "[42]"
        after = m.stats()
        fetched = after["tiers"]["store"]["bytes"]
        assert 0 < fetched < 0.25 * info["stored_bytes"], (fetched, info["stored_bytes"])
        assert after["read_errors"] == 0

        # The same counters for Prometheus, and for people.
        metrics = run_cubefs("stats", str(mnt), "--prometheus").stdout
        store_bytes = [ln for ln in metrics.splitlines()
                       if ln.startswith("cubefs_cache_bytes{") and 'tier="store"' in ln]
        assert store_bytes and float(store_bytes[0].rsplit(" ", 1)[1]) == fetched
        assert 'op="read"' in metrics and 'image="debian:bookworm"' in metrics
        human = run_cubefs("stats", str(mnt)).stdout
        assert "debian:bookworm" in human and "store" in human and "memory" in human

        # Byte-exact: a binary read through the mount equals the source.
        for rel in ("usr/bin/python3.11", "etc/os-release", "usr/lib/x86_64-linux-gnu/libc.so.6"):
            assert (mnt / rel).read_bytes() == (rootfs / rel).read_bytes(), rel

    # A remount reads from the warm disk cache, not the store.  (Without the trace the first
    # mount published: its prefetch would move the chunks to memory before python3 asks, and
    # this checks the reader's own path; tests/test_trace.py checks the prefetch's.)
    with mounted("debian:bookworm", mnt, store, tmp_path / "cache", "--no-prefetch", s3_endpoint=s3.endpoint) as m:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        res = subprocess.run(["chroot", str(mnt), "python3", "-c", "import json"], capture_output=True, timeout=120)
        assert res.returncode == 0
        stats = m.stats()
        assert stats["tiers"]["disk"]["hits"] > 0
        assert stats["tiers"]["store"]["bytes"] < fetched * 0.1, stats["tiers"]


def test_s3_store_round_trip_and_prefix_isolation(s3: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    ep = ("--s3-endpoint", s3.endpoint)
    for prefix in ("one", "two"):
        run_cubefs("build", str(src), "--tag", f"p-{prefix}:1", "--store", s3.store("iso", prefix), *ep)
    one = json.loads(run_cubefs("images", "--store", s3.store("iso", "one"), *ep, "--json").stdout)
    assert [i["ref"] for i in one] == ["p-one:1"]
    with mounted("p-two:1", tmp_path / "m", s3.store("iso", "two"), tmp_path / "c", s3_endpoint=s3.endpoint):
        assert (tmp_path / "m" / "f").read_bytes() == (src / "f").read_bytes()


def test_s3_wrong_credentials_are_refused(s3: S3Server) -> None:
    """The test server checks signatures, so a wrong secret must fail clearly (and fast)."""
    res = run_cubefs("images", "--store", s3.store("creds"), "--s3-endpoint", s3.endpoint, check=False,
                     env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    assert res.returncode == 5, res.stderr
    assert "access denied" in res.stderr and len(res.stderr.strip().splitlines()) == 1
