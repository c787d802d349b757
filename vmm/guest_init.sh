#!/bin/busybox sh
# /init of the cubefs guest initramfs (tools/make_vm_kernel.py builds it): the guest agent.
#
# Loads the virtio modules, then serves the host on the virtio-serial port named
# "cubefs.agent", one request per line, one reply line per request
# (docs/vm-agent.md is the protocol; vmm/agent.py the host side):
#   ID PING                      -> ID OK
#   ID MOUNT ro|rw               -> mounts the virtio-fs tag "rootfs" at /newroot
#   ID UMOUNT                    -> sync, unmount it (ERR busy if a process uses it)
#   ID RUN B64(script) B64(stdin) [SECONDS] -> ID OK CODE B64(stdout) B64(stderr),
#                                   run by /bin/sh of the root, chrooted; killed after SECONDS
#   ID PUT B64(path) B64(data) MODE / ID GET B64(path)  -> files in the root
#   ID FRESH B64(seed) HOSTNAME MACHINE-ID -> after a restore: new randomness, names
#   ID POWEROFF
# The agent lives in the initramfs, not in the root filesystem, so the root can
# be unmounted, swapped and mounted again under it (templates, rollback) and the
# image needs nothing of ours. Until the root is mounted, nothing runs but this.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /tmp /run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs \
         virtio_console; do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "CUBEFS-ERROR cannot load module $m"
done

port=""
for i in $(seq 1 200); do
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] && [ "$(cat "$p/name")" = cubefs.agent ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  sleep 0.05
done
if [ -z "$port" ]; then
  echo "CUBEFS-ERROR no virtio-serial port named cubefs.agent"
  poweroff -f
fi

b64() { base64 -w0 "$@"; }
unb64() { [ "$1" = - ] || echo "$1" | base64 -d; }  # "-": empty (read drops empty fields)

do_mount() {
  opts=$1
  for i in $(seq 1 100); do  # a hot-added device takes a moment to probe
    mount -t virtiofs -o "$opts" rootfs /newroot 2>/tmp/merr && break
    sleep 0.1
  done
  grep -q ' /newroot virtiofs ' /proc/mounts || return 1
  mount_extras
  return 0
}

mount_extras() {  # what the root gets on top: proc, sys, dev, its machine-id
  grep -q ' /newroot/proc ' /proc/mounts || mount -t proc proc /newroot/proc 2>/dev/null
  grep -q ' /newroot/sys ' /proc/mounts || mount -t sysfs sys /newroot/sys 2>/dev/null
  grep -q ' /newroot/dev ' /proc/mounts || mount -t devtmpfs dev /newroot/dev 2>/dev/null
  mkdir -p /run/cubefs
  [ -f /run/cubefs/machine-id ] && [ -f /newroot/etc/machine-id ] && \
    ! grep -q ' /newroot/etc/machine-id ' /proc/mounts && \
    mount --bind /run/cubefs/machine-id /newroot/etc/machine-id 2>/dev/null
  return 0
}

do_umount() {  # all or nothing: a root still in use keeps everything it had
  sync
  for m in /newroot/etc/machine-id /newroot/dev /newroot/sys /newroot/proc; do
    grep -q " $m " /proc/mounts && umount "$m" 2>/dev/null
  done
  umount /newroot 2>/tmp/uerr && return 0
  mount_extras
  return 1
}

exec 3<>"$port"
echo "CUBEFS-READY"
# A read returns end-of-file while no host is connected to the port: wait and read again.
while true; do
while read -r id op a b c <&3; do
  case "$op" in
    PING) echo "$id OK" >&3 ;;
    MOUNT)
      if grep -q ' /newroot virtiofs ' /proc/mounts; then echo "$id OK" >&3
      elif do_mount "${a:-ro}"; then echo "$id OK" >&3
      else echo "$id ERR $(b64 /tmp/merr)" >&3; fi ;;
    UMOUNT)
      if ! grep -q ' /newroot virtiofs ' /proc/mounts || do_umount; then echo "$id OK" >&3
      else echo "$id ERR $(b64 /tmp/uerr)" >&3; fi ;;
    RUN)
      unb64 "$a" >/tmp/script
      unb64 "$b" >/tmp/stdin
      if [ -n "$c" ]; then
        timeout -s KILL "$c" chroot /newroot /bin/sh -c "$(cat /tmp/script)" </tmp/stdin >/tmp/out 2>/tmp/err
      else
        chroot /newroot /bin/sh -c "$(cat /tmp/script)" </tmp/stdin >/tmp/out 2>/tmp/err
      fi
      code=$?
      echo "$id OK $code $(b64 /tmp/out) $(b64 /tmp/err)" >&3
      rm -f /tmp/out /tmp/err /tmp/stdin /tmp/script ;;
    PUT)
      path=$(unb64 "$a")
      if unb64 "$b" >"/newroot$path" 2>/tmp/perr && chmod "${c:-644}" "/newroot$path"; then echo "$id OK" >&3
      else echo "$id ERR $(b64 /tmp/perr)" >&3; fi ;;
    GET)
      path=$(unb64 "$a")
      if [ -f "/newroot$path" ]; then echo "$id OK $(b64 "/newroot$path")" >&3
      else echo "$id ERR $(echo "no such file: $path" | b64)" >&3; fi ;;
    FRESH)
      unb64 "$a" >/dev/urandom
      hostname "$b"
      mkdir -p /run/cubefs
      echo "$c" >/run/cubefs/machine-id
      grep -q ' /newroot virtiofs ' /proc/mounts && mount_extras
      echo "$id OK" >&3 ;;
    POWEROFF)
      echo "$id OK" >&3
      grep -q ' /newroot virtiofs ' /proc/mounts && do_umount
      poweroff -f ;;
    *) echo "$id ERR $(echo "unknown request $op" | b64)" >&3 ;;
  esac
done
sleep 0.2
done
