"""Commit time of a VM's disk holding N new files vs a volume commit of the same files.

    .venv/bin/python tools/bench/disk_commit.py [N]

Both over the same small base image in a local store: (a) an ext4 made with
``mkfs.ext4 -d`` whose ``upper/`` holds N files of 4 KiB in 100 directories,
put into a block volume with the image recorded under it (what a VM's disk is
after the guest wrote them), then ``cubefs commit DISK@s1``; (b) a volume over
the image, the same files copied in through a FUSE mount, ``cubefs commit``.
Prints the wall time of each commit command (median of 3).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def cubefs(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "cubefs", *args], check=True, capture_output=True, env={**os.environ, **env})


def files(top: Path, n: int) -> None:
    for i in range(n):
        d = top / f"d{i % 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(4096))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    from cubefs.cow.index import VolumeIndex
    from cubefs.volume.blk import import_disk, resolve_image, set_lower

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        env = {"CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
               "CUBEFS_CACHE_DIR": str(tmp / "cache")}
        (tmp / "base/etc").mkdir(parents=True)
        (tmp / "base/etc/hostname").write_text("base\n")
        cubefs(env, "build", str(tmp / "base"), "--tag", "base:1")
        files(tmp / "disk/upper/new", n)
        (tmp / "disk/work").mkdir()
        img = tmp / "disk.img"
        with open(img, "wb") as f:
            f.truncate(512 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tmp / "disk"), str(img)], check=True)
        index = VolumeIndex(env["CUBEFS_VOLUME_DIR"])
        try:
            import_disk(index, "disk", str(img))
            set_lower(index, "disk", resolve_image("base:1", env["CUBEFS_STORE"], None))
            index.snapshot("disk", "s1")
            index.sync()
        finally:
            index.close()
        cubefs(env, "volume", "create", "vol", "--from", "base:1")
        mnt = tmp / "mnt"
        mnt.mkdir()
        cubefs(env, "mount", "--volume", "vol", str(mnt))
        try:
            subprocess.run(["cp", "-a", str(tmp / "disk/upper/new"), str(mnt / "new")], check=True)
        finally:
            cubefs(env, "umount", str(mnt))
        cubefs(env, "snapshot", "vol", "--name", "s1")
        for label, src in (("disk", "disk@s1"), ("volume", "vol@s1")):
            times = []
            for i in range(3):
                t0 = time.monotonic()
                cubefs(env, "commit", src, "--tag", f"{label}:{i}")
                times.append(time.monotonic() - t0)
            print(f"{label:6} commit of {n} new files: median {statistics.median(times):.2f} s "
                  f"({', '.join(f'{x:.2f}' for x in times)})")


if __name__ == "__main__":
    main()
