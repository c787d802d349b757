#!/usr/bin/env bash
# Install everything cubefs and its tests need on a fresh Debian 12 machine (as root):
# Debian packages, then the project with its test extras in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for cmd in fusermount3 pkg-config debootstrap zstd tar chroot git dpkg-deb docker-registry skopeo umoci \
           qemu-system-x86_64 etcd etcdctl fuse2fs; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt=1
# Snapshots of a running VM (memory and a virtio-fs root) need QEMU >= 9.0, which
# saves a vhost-user-fs device by asking the back-end for its state; bookworm has
# 7.2, bookworm-backports 10.0.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
[ "$(qemu_major)" -ge 10 ] 2>/dev/null || need_apt=1
if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
      "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
      > /etc/apt/sources.list.d/cubefs-backports.sources
  fi
  apt-get update -qq
  apt-get install -y -qq fuse3 libfuse3-dev pkg-config debootstrap zstd tar attr gcc git \
    docker-registry skopeo umoci etcd-server etcd-client fuse2fs >/dev/null
  apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  # The cluster scheduler's store (issue 15); tests start their own etcd on free
  # loopback ports, so the packaged service (no auth, port 2379) must not run.
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/etcd ]; then
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
    update-rc.d etcd disable >/dev/null 2>&1 || true
  fi
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
