#!/bin/busybox sh
# /init of the cubefs guest initramfs (tools/make_vm_kernel.py builds it).
# Mounts the virtio-fs tag "rootfs" as the root, runs the command given on the
# kernel command line (cubefs.run=BASE64) inside it, reports on the console
# (vmm/qemu.py parses the CUBEFS-* lines), powers off.
/bin/busybox --install -s /bin
mkdir -p /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs \
         virtio_console; do
  insmod /lib/modules/$m.ko || echo "CUBEFS-ERROR cannot load module $m"
done
opts=rw
grep -q 'cubefs.ro=1' /proc/cmdline && opts=ro
if ! mount -t virtiofs -o $opts rootfs /newroot; then
  echo "CUBEFS-ERROR cannot mount the virtio-fs root (tag rootfs)"
  poweroff -f
fi
mount -t proc proc /newroot/proc 2>/dev/null
mount -t sysfs sys /newroot/sys 2>/dev/null
mount -t devtmpfs dev /newroot/dev 2>/dev/null
cmd=$(sed -n 's/.*cubefs\.run=\([^ ]*\).*/\1/p' /proc/cmdline | base64 -d)
echo "CUBEFS-READY"
chroot /newroot /bin/sh -c "$cmd" </dev/null >/tmp/out 2>/tmp/err
code=$?
echo "CUBEFS-STDOUT $(base64 -w0 /tmp/out)"
echo "CUBEFS-STDERR $(base64 -w0 /tmp/err)"
echo "CUBEFS-EXIT $code"
poweroff -f
