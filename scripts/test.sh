#!/usr/bin/env bash
# Set up from nothing and run the whole test suite (as root: FUSE, chroot, mknod).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# One Debian root filesystem per machine, shared by every test that needs one,
# and one guest kernel + initramfs for the VM tests.
.venv/bin/python tools/make_rootfs.py >/dev/null
.venv/bin/python tools/make_vm_kernel.py >/dev/null
.venv/bin/ruff check .
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
