#!/usr/bin/env bash
# The main job, end to end, on the embedded default store (a local directory):
# build a Debian root filesystem into a cubefs image, mount it lazily, run
# python3 inside it, show what was fetched, unmount; then run python3 in a
# micro-VM whose root cubefs serves over virtio-fs.  Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ROOTFS=$(.venv/bin/python tools/make_rootfs.py)
MNT=$(mktemp -d /tmp/cubefs-demo.XXXXXX)
trap 'cubefs umount "$MNT" 2>/dev/null || true; rmdir "$MNT" 2>/dev/null || true' EXIT

echo "== cubefs build $ROOTFS --tag debian:bookworm"
cubefs build "$ROOTFS" --tag debian:bookworm
echo "== cubefs images"
cubefs images
echo "== cubefs mount debian:bookworm $MNT"
cubefs mount debian:bookworm "$MNT"
echo "== chroot $MNT python3 -c ..."
chroot "$MNT" python3 -c 'import json, platform; print(json.dumps({"hello": "from a lazily mounted cubefs image", "python": platform.python_version()}))'
echo "== cubefs stats $MNT"
cubefs stats "$MNT"
echo "== cubefs umount $MNT"
cubefs umount "$MNT"
echo "== python3 tools/make_vm_kernel.py   (a guest kernel + initramfs from Debian's packages, made once)"
.venv/bin/python tools/make_vm_kernel.py
echo "== cubefs vm run debian:bookworm -- python3 -c ...   (a micro-VM; its root served by cubefs over virtio-fs)"
cubefs vm run debian:bookworm -- python3 -c 'import platform; print("hello from a micro-VM, kernel", platform.release())'
