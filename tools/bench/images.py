#!/usr/bin/env python3
"""The four root filesystems of issue 18's cold-start table, made once per machine.

Why these four: they span what a sandbox starts (a bare interpreter, a C
extension from Debian, a venv of wheels, another runtime), and their start-up
reads differ in the way that matters to a lazy mount: ``import json`` reads a
few hundred small files, ``import numpy`` adds a few large shared objects,
``import pandas`` reads ~1,000 modules one after another, ``node -e`` reads one
big binary.

=========  ==========================================  ===========================================
name       tree                                        command
=========  ==========================================  ===========================================
deb-python debootstrap minbase + python3               ``python3 -c 'import json'``
deb-numpy  + python3-numpy                             ``python3 -c 'import numpy'``
py-pandas  + python3-venv; /opt/venv with pandas       ``/opt/venv/bin/python -c 'import pandas'``
           (wheels from PyPI)
deb-node   + nodejs                                    ``node -e 'require("fs")...'``
=========  ==========================================  ===========================================

Each tree is made in ``DIR.tmp`` and renamed into place, with a ``DIR.done``
stamp beside it (tools/make_rootfs.py), so an interrupted run never leaves a
half tree that looks whole.  The pandas wheels are installed by the host's pip
into the venv's site-packages (the host is the same Debian and Python 3.11 as
the tree), so the chroot needs no network.  Usage::

    .venv/bin/python tools/bench/images.py            # all four, into /var/tmp/cubefs-bench/
    .venv/bin/python tools/bench/images.py --list     # name, path, command (one a line)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from make_rootfs import make_rootfs

BASE = Path(os.environ.get("CUBEFS_BENCH_IMAGES", "/var/tmp/cubefs-bench"))
VENV = "/opt/venv"


@dataclass(frozen=True)
class BenchImage:
    name: str
    include: str
    cmd: str
    pip: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return BASE / self.name


IMAGES = [
    BenchImage("deb-python", "python3", "python3 -c 'import json'"),
    BenchImage("deb-numpy", "python3,python3-numpy", "python3 -c 'import numpy'"),
    BenchImage("py-pandas", "python3,python3-venv", f"{VENV}/bin/python -c 'import pandas'", ("pandas",)),
    BenchImage("deb-node", "nodejs", "node -e 'require(\"fs\").readdirSync(\"/\"); console.log(1 + 1)'"),
]


def by_name(name: str) -> BenchImage:
    for image in IMAGES:
        if image.name == name:
            return image
    raise SystemExit(f"images: no image {name!r} (have {', '.join(i.name for i in IMAGES)})")


def make(image: BenchImage) -> Path:
    """The image's tree, made if missing; its path."""
    stamp = image.path.parent / (image.path.name + ".done")
    if stamp.exists() and image.path.is_dir():
        return image.path
    if not image.pip:
        make_rootfs(image.path, image.include)
        return image.path
    stage = image.path.parent / (image.path.name + ".base")
    make_rootfs(stage, image.include)
    (image.path.parent / (stage.name + ".done")).unlink(missing_ok=True)
    subprocess.run(["chroot", str(stage), "python3", "-m", "venv", "--without-pip", VENV], check=True)
    site = stage / VENV.lstrip("/") / "lib" / f"python3.{sys.version_info.minor}" / "site-packages"
    if not site.is_dir():
        raise SystemExit(f"images: {site} missing: the host's Python must match the tree's (3.11)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:",
                    "--target", str(site), *image.pip], check=True)
    # Byte-compile inside the tree, as a venv's pip would: a start reads .pyc files, not .py.
    subprocess.run(["chroot", str(stage), f"{VENV}/bin/python", "-m", "compileall", "-q", str(site)[len(str(stage)):]],
                   check=False, stdout=subprocess.DEVNULL)
    shutil.rmtree(image.path, ignore_errors=True)
    os.rename(stage, image.path)
    stamp.touch()
    return image.path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="images to make (default: all)")
    ap.add_argument("--list", action="store_true", help="print name, path and command of each, tab-separated")
    args = ap.parse_args()
    chosen = [by_name(n) for n in args.names] or IMAGES
    if args.list:
        for image in chosen:
            print(f"{image.name}\t{image.path}\t{image.cmd}")
        return 0
    for image in chosen:
        print(f"{image.name}: {make(image)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
