#!/bin/busybox sh
# /init of the cubefs guest initramfs (tools/make_vm_kernel.py builds it).
#
# Loads the virtio modules (and virtio_blk, ext4, overlay: a VM's disk), brings up lo (open_tcp
# reaches guest-local ports over it), mounts devpts (PTYs), and execs the guest agent: Debian's python3.11 from the
# initramfs running vmm/guest/agent.py, which serves the host on the virtio-serial
# port named "cubefs.agent" (docs/vm-agent.md is the protocol; vmm/channel.py and
# vmm/agent.py the host side).  The agent lives in the initramfs, not in the root
# filesystem, so the root can be unmounted, swapped and mounted again under it
# (templates, rollback) and the image needs nothing of ours.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /tmp /run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
for m in virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs \
         virtio_console failover net_failover virtio_net \
         crc16 mbcache jbd2 crc32c_generic ext4 virtio_blk overlay; do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "CUBEFS-ERROR cannot load module $m"
done
ip link set lo up
# The NIC (every VM has one: vmm/machine.py): every guest has the same address, MAC and
# gateway, saved into its template, so a clone or a restored snapshot needs no fix-up; the
# sandbox network (sandbox/network/) gives each guest a namespace of its own behind it
# A VM without a network has its NIC's link down (vmm/machine.py): with this, its routes are
# ignored and a connect fails at once (ENETUNREACH), not after ~3 s of unanswered ARP
echo 1 > /proc/sys/net/ipv4/conf/all/ignore_routes_with_linkdown
if ip link set eth0 up 2>/dev/null; then
  ip addr add 169.254.0.21/30 dev eth0
  ip route add default via 169.254.0.22 dev eth0
fi
export PYTHONHOME=/usr PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
exec /usr/bin/python3.11 -S -c 'from vmm.guest.agent import main; main()'
