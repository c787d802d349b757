#!/usr/bin/env python3
"""Make the guest kernel and initramfs the micro-VMs boot (once per machine).

From Debian's own packages, fetched with ``apt-get download`` (nothing is
installed on the host): the kernel of ``linux-image-amd64`` and
``busybox-static``.  The initramfs holds busybox, the modules a virtio-fs
root needs (loaded in order: virtio_ring, virtio, virtio_mmio, the virtio-pci
pieces, fuse, virtiofs, virtio_console) and ``/init``, which mounts the
virtio-fs tag ``rootfs`` as the root and runs the guest side of
:mod:`vmm.guest`.  The archive is reproducible: entries sorted, times and
owners zeroed, gzip without a timestamp, so the same packages give the same
bytes.

Output, in ``PATH`` (default /var/tmp/cubefs-vm/kernel): ``vmlinuz``,
``initrd.gz``, ``version`` and a ``.done`` stamp beside the directory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = os.environ.get("CUBEFS_VM_KERNEL") or "/var/tmp/cubefs-vm/kernel"
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "fuse", "virtiofs", "virtio_console")


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(": ", 1)[1]
    raise SystemExit("cannot tell which kernel package linux-image-amd64 stands for")


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (name, mode, content) entries, in the given order."""
    out = bytearray()
    for ino, (name, mode, content) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(content), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + "".join(f"{x:08X}" for x in fields).encode() + raw
        out += bytes(-len(out) % 4) + content
        out += bytes(-len(out) % 4)
    return bytes(out)


def make_kernel(path: Path) -> Path:
    """Build (or keep, if made from the same inputs) the guest kernel and initramfs."""
    stamp = path.parent / (path.name + ".done")
    guest = Path(__file__).resolve().parents[1] / "vmm" / "guest_init.sh"
    inputs = hashlib.sha256(guest.read_bytes() + " ".join(MODULES).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == inputs and (path / "initrd.gz").exists():
        return path
    with tempfile.TemporaryDirectory(prefix="cubefs-vm-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt-get download fetches as the _apt user where it can
        package = _kernel_package()
        print(f"+ apt-get download {package} busybox-static", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "download", package, "busybox-static"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        x = work / "x"
        vmlinuz = next((x / "boot").glob("vmlinuz-*"))
        modules = next((x / "lib" / "modules").iterdir())
        entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in
                                                 ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")]
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, (x / "bin" / "busybox").read_bytes()))
        for name in MODULES:
            found = sorted(modules.rglob(f"{name}.ko"))
            if not found:
                raise SystemExit(f"module {name}.ko is not in {package}")
            entries.append((f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, found[0].read_bytes()))
        entries.append(("init", stat.S_IFREG | 0o755, guest.read_bytes()))
        tmp_out = path.parent / (path.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        shutil.copy(vmlinuz, tmp_out / "vmlinuz")
        (tmp_out / "initrd.gz").write_bytes(gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0))
        (tmp_out / "version").write_text(modules.name + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp_out, path)
    stamp.write_text(inputs + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=DEFAULT)
    args = ap.parse_args()
    print(make_kernel(Path(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
