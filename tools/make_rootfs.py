#!/usr/bin/env python3
"""Make the Debian root filesystem the tests and benchmarks use (once per machine).

``debootstrap --variant=minbase --include=python3 bookworm`` into a
temporary directory, renamed into place when complete, with a ``.done`` stamp
beside it, so an interrupted run never leaves a half tree that looks whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT = "/var/tmp/cubefs-test/rootfs"
MIRROR = os.environ.get("CUBEFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def make_rootfs(path: Path, include: str = "python3") -> None:
    stamp = path.parent / (path.name + ".done")
    if stamp.exists() and path.is_dir():
        return
    tmp = path.parent / (path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(tmp), MIRROR]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.rename(tmp, path)
    stamp.touch()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=os.environ.get("CUBEFS_TEST_ROOTFS", DEFAULT))
    ap.add_argument("--include", default="python3", help="extra packages (comma-separated)")
    args = ap.parse_args()
    make_rootfs(Path(args.path), args.include)
    print(args.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
