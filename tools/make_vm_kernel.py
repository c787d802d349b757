#!/usr/bin/env python3
"""Make the guest kernel and initramfs the micro-VMs boot (once per machine).

From Debian's own packages, fetched with ``apt-get download`` (nothing is
installed on the host): the kernel of ``linux-image-amd64``, ``busybox-static``
and Debian's python3.11 (``python3.11-minimal``, ``libpython3.11-minimal``,
``libpython3.11-stdlib`` for ``_ctypes``, and the shared libraries they link).
The initramfs holds busybox, the modules a virtio-fs root needs (loaded in
order: virtio_ring, virtio, virtio_mmio, the virtio-pci pieces, fuse, virtiofs,
virtio_console, virtio_net with failover and net_failover for the NIC, and for a VM's
disk virtio_blk, ext4 with crc16, mbcache, jbd2 and crc32c_generic, and overlay),
``/init`` (vmm/guest_init.sh: loads them, brings ``lo`` up, configures the NIC,
execs the agent), python3.11 with only the standard library modules the agent
imports (found by importing the agent with that very interpreter at build time),
and the agent (vmm/guest/), all byte-compiled (sourceless ``.pyc``, hash-based,
unchecked).  The archive is reproducible: entries sorted, times and owners
zeroed, gzip without a timestamp, so the same inputs give the same bytes; the
``.done`` stamp hashes the inputs (init, the agent's sources, the packages).

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
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g",
                   "libexpat1", "libffi8")
GUEST = Path(__file__).resolve().parents[1] / "vmm"
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "fuse", "virtiofs", "virtio_console", "failover", "net_failover", "virtio_net",
           # a VM's disk (vmm/disk.py): the guest's root an overlay whose upper is an ext4 on /dev/vda;
           # crc32c_generic before ext4 mounts (ext4 and jbd2 ask the crypto API for it; no modprobe)
           "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4", "virtio_blk", "overlay")


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


PROBE = """
import sys, vmm.guest.agent, vmm.guest.fsops as f
f._inotify()
import encodings.ascii, encodings.latin_1, encodings.utf_8
for m in list(sys.modules.values()):
    print(getattr(m, "__file__", None) or "")
"""


def _lib(x: Path, soname: str) -> bytes:
    for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"):
        if (x / d / soname).exists():
            return (x / d / soname).resolve().read_bytes()
    raise SystemExit(f"{soname} is in none of {PYTHON_PACKAGES}")


def _pyc(src: Path, name: str) -> bytes:
    """Sourceless, hash-based, unchecked bytecode: the same source gives the same bytes."""
    import importlib.util
    import marshal
    data = src.read_bytes()
    code = compile(data, name, "exec", dont_inherit=True, optimize=0)
    flags = 0b01  # hash-based, unchecked
    return (importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + importlib.util.source_hash(data)
            + marshal.dumps(code))


def python_entries(x: Path, work: Path) -> list[tuple[str, int, bytes]]:
    """python3.11, the libraries it links, the stdlib modules the agent imports and the
    agent itself: found by importing the agent with the extracted interpreter."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("byte-compiling for the guest's python3.11 needs python3.11 here")
    stage = work / "agent"
    (stage / "vmm" / "guest").mkdir(parents=True)
    (stage / "vmm" / "__init__.py").write_text("")
    for src in sorted((GUEST / "guest").glob("*.py")):
        shutil.copy(src, stage / "vmm" / "guest" / src.name)
    lib = x / "usr/lib/python3.11"
    env = {"PYTHONHOME": str(x / "usr"), "PYTHONPATH": str(stage), "LD_LIBRARY_PATH":
           f"{x}/lib/x86_64-linux-gnu:{x}/usr/lib/x86_64-linux-gnu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(x / "usr/bin/python3.11"), "-S", "-B", "-c", PROBE], env=env, cwd=stage,
                         capture_output=True, text=True)  # cwd: -c puts it first on sys.path
    if out.returncode != 0:
        raise SystemExit(f"the agent does not import under Debian's python3.11: {out.stderr.strip()}")
    files = {Path(f) for f in out.stdout.split()}
    entries: list[tuple[str, int, bytes]] = []
    dirs = {"usr", "usr/bin", "usr/lib", "usr/lib/python3.11", "usr/lib/python3.11/lib-dynload", "lib64",
            "lib/x86_64-linux-gnu"}
    for f in sorted(files):
        if f.is_relative_to(stage):
            rel, src = f.relative_to(stage), f
        elif f.is_relative_to(lib):
            rel, src = f.relative_to(lib), f
        else:
            continue
        for parent in rel.parents:
            if str(parent) != ".":
                dirs.add(f"usr/lib/python3.11/{parent}")
        if f.suffix == ".py":
            entries.append((f"usr/lib/python3.11/{rel.with_suffix('.pyc')}", stat.S_IFREG | 0o644,
                            _pyc(src, f"/usr/lib/python3.11/{rel}")))
        else:
            entries.append((f"usr/lib/python3.11/{rel}", stat.S_IFREG | 0o755, src.read_bytes()))
    entries.append(("usr/bin/python3.11", stat.S_IFREG | 0o755, (x / "usr/bin/python3.11").read_bytes()))
    entries.append(("lib64/ld-linux-x86-64.so.2", stat.S_IFREG | 0o755, _lib(x, "ld-linux-x86-64.so.2")))
    for soname in ("libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1", "libffi.so.8"):
        entries.append((f"lib/x86_64-linux-gnu/{soname}", stat.S_IFREG | 0o755, _lib(x, soname)))
    return [(d, stat.S_IFDIR | 0o755, b"") for d in sorted(dirs)] + entries


def make_kernel(path: Path) -> Path:
    """Build (or keep, if made from the same inputs) the guest kernel and initramfs."""
    stamp = path.parent / (path.name + ".done")
    guest = GUEST / "guest_init.sh"
    sources = sorted((GUEST / "guest").glob("*.py"))
    h = hashlib.sha256(guest.read_bytes() + " ".join(MODULES + PYTHON_PACKAGES).encode() + Path(__file__).read_bytes())
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    inputs = h.hexdigest()
    if stamp.exists() and stamp.read_text().strip() == inputs and (path / "initrd.gz").exists():
        return path
    with tempfile.TemporaryDirectory(prefix="cubefs-vm-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt-get download fetches as the _apt user where it can
        package = _kernel_package()
        print(f"+ apt-get download {package} busybox-static {' '.join(PYTHON_PACKAGES)}", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "download", package, "busybox-static", *PYTHON_PACKAGES], cwd=work, check=True,
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
        entries += python_entries(x, work)
        tmp_out = path.parent / (path.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        shutil.copy(vmlinuz, tmp_out / "vmlinuz")
        entries = sorted({e[0]: e for e in entries}.values())  # parents sort before their children
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
