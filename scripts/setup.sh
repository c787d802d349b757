#!/usr/bin/env bash
# Install everything cubefs and its tests need on a fresh Debian 12 machine (as root):
# Debian packages, then the project with its test extras in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for cmd in fusermount3 pkg-config debootstrap zstd tar chroot git dpkg-deb docker-registry skopeo umoci \
           qemu-system-x86_64; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq fuse3 libfuse3-dev pkg-config debootstrap zstd tar attr gcc git \
    docker-registry skopeo umoci qemu-system-x86 >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
# Byte-compile now: the environment may forbid writing .pyc at run time
# (PYTHONDONTWRITEBYTECODE), and recompiling on every start slows mounts.
.venv/bin/python -m compileall -q cubefs >/dev/null
echo "setup: ok ($(.venv/bin/cubefs --version))"
