"""One QEMU process: the machine a cubefs VM runs in, and the choices behind it.

* **q35** with one empty PCIe root port (``fsport``) that the root filesystem's
  vhost-user-fs device is plugged into: at start for a cold boot, or hot-plugged
  (ACPI PCI hotplug, no 5 s PCIe button delay) after a restore, since QEMU 7.2
  refuses to migrate a VM with a vhost-user-fs device.
* **Guest RAM is a file or a memfd the vhost-user backend can reach.**  A cold
  VM has a shared memfd.  A template writes its RAM into a file
  (``share=on``) and saves only device state (``x-ignore-shared``); a clone maps
  that file *privately* (``share=off``): pages stay shared in the page cache
  until the clone writes them.  The backend then reaches the clone's RAM
  through QEMU's address space (vmm/guest_memory.py), not through the file.
* **A VM's disk** (``blk_socket``): vhost-user-blk on a second empty root port
  (``blkport``), at start for a cold boot, hot-plugged after a template's restore
  as the root's device is; a checkpoint saves it (QEMU migrates vhost-user-blk;
  our back-end answers every request before it takes the next, so a stopped
  ring holds nothing in flight) and its restore has it on the command line.
* **The agent channel** is a virtio-serial port named ``cubefs.agent`` on a unix
  socket QEMU serves; QMP on another.  Both sockets are in the VM's directory.
* ``vmgenid`` gets a new generation ID in every QEMU process, which tells a
  restored guest kernel (6.1) to reseed its RNG by itself.
* **Memory per VM** (an idle sandbox's QEMU, by mapping: docs/benchmarks.md, "Density"): a
  restore does not load the kernel image (``_boot_argv``), q35 goes without the devices a sandbox
  never uses (``MACHINE``), QEMU runs without transparent huge pages (``no_huge_pages``) and with
  one malloc arena (``QEMU_MALLOC_ENV``).  What is left is TCG's translated code, the heap
  (QOM, devices, TCG's TLBs), TCG's 2 MiB TB hash table, and the pages relocation dirties in the
  binary and its libraries.
* **Acceleration.** ``auto`` picks KVM only where it is hardware-backed
  (``kvm_intel`` or ``kvm_amd`` loaded and /dev/kvm usable): KVM on nested PVM
  (``kvm_pvm``) runs guest kernel code ~3000x slower than TCG here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cubefs.errors import CubefsError, UsageError
from vmm.qmp import Qmp

FS_PORT = "fsport"
FS_DEVICE = "rootfs-dev"
FS_CHARDEV = "rootfs"
# A VM's disk (vmm/disk.py): a vhost-user-blk device on a root port of its own, present in every
# machine (empty until a disk is attached) so templates fit VMs with and without a disk
BLK_PORT = "blkport"
BLK_DEVICE = "disk-dev"
BLK_CHARDEV = "disk"
# Every VM has one virtio-net NIC with this MAC, with or without a back-end: a template's and
# its clones' devices must match, and a guest restored anywhere keeps the address it was
# given (a sandbox network gives each guest the same MAC and IP inside a namespace of its own)
NIC_MAC = "02:cf:00:00:00:01"


class VmError(CubefsError):
    pass


def pick_accel(requested: str) -> str:
    """``kvm``, ``tcg``, or ``auto``: KVM where hardware virtualization backs it."""
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise UsageError(f"--accel must be auto, kvm or tcg, not {requested!r}")
    hardware = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


TB_SIZE_ENV = "CUBEFS_TCG_TB_SIZE"  # MiB of TCG translation cache per VM (default 64)
TB_SIZE_DEFAULT = 64


def tcg_tb_size() -> int:
    """TCG's translation-cache size in MiB, from ``$CUBEFS_TCG_TB_SIZE`` (KVM has none).

    64, not QEMU's 1 GiB: the cache is most of QEMU's own memory per VM.  Not smaller, by
    measurement (tools/bench/tcg_tb_size.py, docs/benchmarks.md "Density"): a full cache is
    flushed whole and everything translated again, and a busy guest's code (ten ``python3 -c
    'import json, email, http.client, asyncio, ...'``) runs 1.58x as long at 32 MiB, 1.97x at
    24, 3.6x at 16 (medians of 3 alternated rounds against 64; a ``compileall`` 1.29x / 1.57x /
    3.35x; only a hot ``sha256sum`` loop is within noise), ~20x at 8 (one first run, 235 s).  A smaller cache
    saves memory only on idle sandboxes (an idle guest fills ~25 MiB of it: at 100 idle, 52.7 MiB
    a sandbox in all, 41.5 of it QEMU's own, since the cuts the module's docstring lists; 65.6 and
    54 before them), so it is left to nodes that hold many idle ones and accept that cost."""
    text = os.environ.get(TB_SIZE_ENV, str(TB_SIZE_DEFAULT))
    try:
        mib = int(text)
    except ValueError:
        mib = 0
    if not 1 <= mib <= 1024:
        raise UsageError(f"{TB_SIZE_ENV}={text!r}: give the translation cache's size in MiB, 1 to 1024")
    return mib


# The accel option as machine fingerprints spell it, whatever tb-size a VM runs with
FINGERPRINT_ACCEL = f"tcg,tb-size={TB_SIZE_DEFAULT}"


def state_argv(argv: list[str]) -> list[str]:
    """``argv`` as a saved VM state depends on it (vmm/vm.py ``machine_fingerprint``): the
    translation cache's size is QEMU's own memory, not guest or device state, so a template or
    checkpoint saved at one tb-size restores at another (tested).  It is spelled as the 64 every
    VM had before the size could change, so states saved then keep their fingerprints and load."""
    return [FINGERPRINT_ACCEL if a.startswith("tcg,tb-size=") else a for a in argv]


# q35 without what a sandbox never uses (each a device a template is saved with, so these are
# in the machine fingerprint: templates made before are remade).  sata: the AHCI controller's six
# ports each keep IDE buffers (with smbus, vmport and i8042, -1.5 MiB of QEMU's own per VM);
# smm: System Management Mode, its SMRAM address space and the firmware's SMM set-up (-0.2 MiB).
# The guest powers off through ACPI, and its reboot (which ends QEMU: -no-reboot) goes through
# ACPI's reset register without the i8042.
MACHINE = "q35,sata=off,smbus=off,vmport=off,i8042=off,smm=off"

# glibc malloc in QEMU: one arena for all its threads (the vCPU thread's own arena held 3.4 MiB
# of which ~0.3 was slack; MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ saved nothing measurable:
# what the heap holds is in use, not freed-and-kept).  QEMU's environment, not its command line:
# no part of a saved state, so not of the fingerprint.
QEMU_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1"}


def qemu_env() -> dict[str, str]:
    return {**os.environ, **QEMU_MALLOC_ENV}


PR_SET_THP_DISABLE = 41


@functools.cache
def no_huge_pages() -> None:
    """No transparent huge pages for the QEMUs this process starts: QEMU asks for them
    (``MADV_HUGEPAGE``) on TCG's translation cache and on every RAM block, so an idle guest's
    26 MiB of translated code sat in 13 whole 2 MiB pages (24.1 MiB in 4 KiB pages) and the
    2 MiB ACPI-tables block, 128 KiB of it used, took a whole huge page: -3.8 MiB a VM.  A busy
    guest's Python imports ran as fast without (medians of alternated rounds within noise,
    docs/benchmarks.md "Density").  The only switch is per process and inherited across fork
    and exec (``prctl(PR_SET_THP_DISABLE)``), so it is set on this process, once: its own
    memory is unaffected under the usual ``madvise`` policy (Python never asks for huge pages).
    Best effort: a kernel without it only costs memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


@dataclass
class MachineSpec:
    kernel_dir: Path
    memory_mb: int = 512
    cpus: int = 1
    accel: str = "auto"


@dataclass
class Ram:
    """Where guest RAM lives: a shared memfd (None), or a file shared or private, from
    ``offset`` (a checkpoint's RAM file holds the guest's pages from an offset on: memsnap)."""

    path: Path | None = None
    shared: bool = True
    offset: int = 0


@dataclass
class Netdev:
    """The NIC's back-end: QEMU ``-netdev`` options without the id (``tap,fd=7``), and the file
    descriptors they name, which QEMU inherits.  Without one the NIC has no peer (a cable
    unplugged): what a template is booted with, so that any clone may get any back-end."""

    options: str
    fds: tuple[int, ...] = ()


class Machine:
    """A QEMU process with its sockets in ``vm_dir``."""

    def __init__(self, vm_dir: Path, spec: MachineSpec, ram: Ram, *, fs_socket: str | None = None,
                 incoming: bool = False, cmdline: str = "", netdev: Netdev | None = None,
                 blk_socket: str | None = None) -> None:
        self.dir = vm_dir
        self.blk_socket = blk_socket
        self.spec = spec
        self.ram = ram
        self.fs_socket = fs_socket
        self.incoming = incoming
        self.cmdline = cmdline
        self.netdev = netdev
        self.accel = pick_accel(spec.accel)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._qmp: Qmp | None = None

    @property
    def qmp_path(self) -> str:
        return str(self.dir / "qmp.sock")

    @property
    def agent_path(self) -> str:
        return str(self.dir / "agent.sock")

    @property
    def console_path(self) -> Path:
        return self.dir / "console.log"

    def argv(self) -> list[str]:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise VmError("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
        kernel = self.spec.kernel_dir
        if not (kernel / "vmlinuz").exists() or not (kernel / "initrd.gz").exists():
            raise VmError(f"no guest kernel in {kernel}: make one with 'python3 tools/make_vm_kernel.py {kernel}'")
        mb = self.spec.memory_mb
        if self.ram.path is None:
            mem = f"memory-backend-memfd,id=mem,size={mb}M,share=on"
        else:
            mem = (f"memory-backend-file,id=mem,size={mb}M,mem-path={self.ram.path},"
                   f"share={'on' if self.ram.shared else 'off'}" + (f",offset={self.ram.offset}" if self.ram.offset
                                                                   else ""))
        argv = [
            qemu, "-name", self.dir.name, "-machine", MACHINE,
            # TCG's translation cache: 64 MiB, not QEMU's 1 GiB, per VM (tcg_tb_size: why not less)
            "-accel", f"tcg,tb-size={tcg_tb_size()}" if self.accel == "tcg" else "kvm",
            # TCG: no ERMS/FSRM, so the guest kernel and glibc copy with rep movsq/SSE, not
            # rep movsb, which TCG runs a byte at a time: the guest's own dd 95 -> 355 MB/s, agent
            # streams ~2x (docs/benchmarks.md, "Sandbox streams")
            "-cpu", "host" if self.accel == "kvm" else "max,-erms,-fsrm", "-smp", str(self.spec.cpus), "-m", f"{mb}M",
            "-object", mem, "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-net", "none",
            "-serial", f"file:{self.console_path}",
            *self._boot_argv(),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-device", "vmgenid,guid=auto",
            "-device", f"pcie-root-port,id={FS_PORT},chassis=1",
            # two ports (0 is the console's, reserved), not 31: 6 virtqueues, not 64, behind the
            # one MSI-X vector every queue shares, which the guest walks on every 4 KiB the
            # host sends (agent file writes under TCG 81 -> 122 MB/s, stdout 65 -> 94)
            "-device", "virtio-serial-pci,id=serial0,max_ports=2",
            "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=cubefs.agent",
            # romfile=: no option ROM (a direct kernel boot never runs it)
            "-device", f"virtio-net-pci,id=nic0,mac={NIC_MAC},romfile="
            + (",netdev=net0" if self.netdev is not None else ""),
        ]
        if self.netdev is not None:
            argv += ["-netdev", f"{self.netdev.options},id=net0"]
        # one queue: the back-end answers one request at a time (docs/design.md, block volumes)
        argv += ["-device", f"pcie-root-port,id={BLK_PORT},chassis=2"]
        if self.blk_socket is not None:
            argv += ["-chardev", f"socket,id={BLK_CHARDEV},path={self.blk_socket}",
                     "-device", f"vhost-user-blk-pci,num-queues=1,romfile=,chardev={BLK_CHARDEV},id={BLK_DEVICE},"
                     f"bus={BLK_PORT}"]
        if self.fs_socket is not None:
            argv += ["-chardev", f"socket,id={FS_CHARDEV},path={self.fs_socket}",
                     "-device", f"vhost-user-fs-pci,chardev={FS_CHARDEV},tag=rootfs,id={FS_DEVICE},bus={FS_PORT}"]
        if self.incoming:  # -S: a loaded guest waits for "cont" (its identity is set first)
            argv += ["-S", "-incoming", "defer"]
        return argv

    def _boot_argv(self) -> list[str]:
        """How the guest kernel gets in: ``-kernel``/``-initrd`` for a boot; for a machine that
        loads a saved state, the running kernel is in the state, and QEMU would otherwise read
        the whole bzImage into a buffer of its own (8 MiB, private, never freed, never read
        again: -8.0 MiB a restored sandbox, docs/benchmarks.md "Density").  The option ROM that
        ``-kernel`` adds (``linuxboot_dma.bin``, bootindex 0) is added by hand instead: it is a
        RAM block of the saved machine, and a load needs the same blocks.  (The initrd QEMU
        maps from its file: page cache, not its own memory.)"""
        kernel = self.spec.kernel_dir
        if self.incoming:
            return ["-option-rom", "linuxboot_dma.bin,bootindex=0"]
        return ["-kernel", str(kernel / "vmlinuz"), "-initrd", str(kernel / "initrd.gz"),
                "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {self.cmdline}".strip()]

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "qemu.log", "ab")
        if self.accel == "tcg":  # under KVM huge pages back the guest's RAM and speed it up: kept
            no_huge_pages()
        self.proc = subprocess.Popen(self.argv(), env=qemu_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, pass_fds=self.netdev.fds if self.netdev else ())
        log.close()
        self.pid = self.proc.pid
        (self.dir / "qemu.pid").write_text(f"{self.pid}\n")
        if not self.incoming and self.netdev is None:
            self._link()  # a loaded machine's is set once its state is in

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            try:
                self._qmp = Qmp(self.qmp_path, self.dir.name)
            except CubefsError:
                raise VmError(f"VM {self.dir.name}: QEMU did not start: {self.log_tail()}") from None
        return self._qmp

    def close_monitor(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def log_tail(self) -> str:
        try:
            text = (self.dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            text = ""
        return " | ".join(text.splitlines()[-3:]) or "no output"

    # -- the root filesystem device -------------------------------------------
    def attach_fs(self, socket_path: str) -> None:
        """Hot-plug the vhost-user-fs device (after a restore)."""
        self.qmp.execute("chardev-add", id=FS_CHARDEV,
                         backend={"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": socket_path}},
                                                             "server": False}})
        self.qmp.execute("device_add", driver="vhost-user-fs-pci", chardev=FS_CHARDEV, tag="rootfs", id=FS_DEVICE,
                         bus=FS_PORT)
        self.fs_socket = socket_path

    def attach_blk(self, socket_path: str) -> None:
        """Hot-plug the disk's vhost-user-blk device (after a template's restore)."""
        self.qmp.execute("chardev-add", id=BLK_CHARDEV,
                         backend={"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": socket_path}},
                                                             "server": False}})
        self.qmp.execute("device_add", driver="vhost-user-blk-pci", chardev=BLK_CHARDEV, id=BLK_DEVICE, bus=BLK_PORT,
                         romfile="", **{"num-queues": 1})
        self.blk_socket = socket_path

    def detach_fs(self, timeout: float = 30.0) -> None:
        """Unplug it (the guest must have unmounted it); QEMU cannot migrate it."""
        self.qmp.execute("device_del", id=FS_DEVICE)
        self.qmp.wait_event("DEVICE_DELETED", timeout, device=FS_DEVICE)
        self.qmp.execute("chardev-remove", id=FS_CHARDEV)
        self.fs_socket = None

    # -- state ----------------------------------------------------------------
    def save(self, state: Path, with_ram: bool = False, timeout: float = 120.0) -> None:
        """Stop the guest and write its state to ``state``: devices only (RAM that is
        in a shared file stays there: x-ignore-shared), or ``with_ram``."""
        q = self.qmp
        q.execute("stop")
        self._ignore_shared(not with_ram)
        q.execute("migrate", uri=f"exec:cat > {_quote(state)}")
        self._wait_migration(timeout, "saving")

    def load(self, state: Path, with_ram: bool = False, timeout: float = 120.0) -> None:
        """Load a saved state (made with the same ``with_ram``) into this ``incoming``
        machine; the guest stays paused."""
        self._ignore_shared(not with_ram)
        self._load(f"exec:cat {_quote(state)}", timeout)

    def _load(self, uri: str, timeout: float) -> None:
        q = self.qmp
        q.execute("migrate-incoming", uri=uri)
        deadline = time.monotonic() + timeout
        while q.execute("query-status").get("status") == "inmigrate":
            if time.monotonic() > deadline:
                raise VmError(f"VM {self.dir.name}: loading the VM state took over {timeout:.0f} s")
            time.sleep(0.01)
        info = q.execute("query-migrate")
        if info.get("status") == "failed":
            raise VmError(f"VM {self.dir.name}: loading the VM state failed: "
                          f"{info.get('error-desc', 'no reason given')}; {self.log_tail()}")
        self._link()

    def _link(self) -> None:
        """The NIC's link is up with a back-end and down without one (a loaded state carries the
        link of the VM it was saved from): a guest with no network then fails a connect at once
        instead of after ~3.4 s of unanswered ARP (its routes over a down link are ignored)."""
        self.qmp.execute("set_link", name="nic0", up=self.netdev is not None)

    def restore(self, state: Path, timeout: float = 120.0) -> None:
        """Load a saved state and let the guest run."""
        self.load(state, timeout=timeout)
        self.qmp.execute("cont")

    # -- checkpoints (vmm/checkpoint.py) --------------------------------------
    def save_live(self, ram: Path, at_instant: Callable[[], None], timeout: float = 300.0) -> float:
        """Write the running guest's state to ``ram`` (QEMU's mapped-ram format: each page at
        its own offset) while it runs, pause it only for the switch-over, call ``at_instant``
        while it is paused (RAM, devices and the back-end all stopped), then let it run again.
        Returns how long the guest was paused.  On any failure the migration is cancelled and
        the guest runs on as it was."""
        q = self.qmp
        # mapped-ram cannot go with x-ignore-shared in QEMU 10 (the loader does not expect the
        # region address the saver writes); private RAM is never "shared" anyway.
        self._capabilities({"x-ignore-shared": False, "mapped-ram": True, "pause-before-switchover": True})
        # QEMU rate-limits every migration to 128 MiB/s by default, to a local file too: it was
        # most of a big snapshot (500 MiB dirty: 5.5 -> 2.6 s; docs/benchmarks.md)
        q.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        paused = 0.0
        try:
            q.execute("migrate", uri=f"file:{ram}")
            deadline = time.monotonic() + timeout
            while (status := q.execute("query-migrate").get("status")) != "pre-switchover":
                if status in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
                    raise VmError(f"VM {self.dir.name}: saving the VM state failed ({status}): "
                                  f"{q.execute('query-migrate').get('error-desc', 'took too long')}; {self.log_tail()}")
                time.sleep(0.002)
            t0 = time.monotonic()
            try:
                at_instant()
            except BaseException:
                q.execute("migrate_cancel")
                raise
            q.execute("migrate-continue", state="pre-switchover")
            self._wait_migration(timeout, "saving")
            q.execute("cont")
            paused = time.monotonic() - t0
        except BaseException:
            with contextlib.suppress(CubefsError, OSError):
                for _ in range(500):  # a cancelled migration ends in a moment; then the guest runs again
                    if q.execute("query-migrate").get("status") not in ("active", "pre-switchover", "cancelling",
                                                                        "device"):
                        break
                    time.sleep(0.01)
                if q.execute("query-status").get("status") != "running":
                    q.execute("cont")
            raise
        finally:
            with contextlib.suppress(CubefsError, OSError):
                self._capabilities({"mapped-ram": False, "pause-before-switchover": False})
        return paused

    def load_ram_file(self, ram: Path, timeout: float = 120.0) -> None:
        """Load what :meth:`save_live` wrote into this ``incoming`` machine; it stays paused."""
        self._capabilities({"x-ignore-shared": False, "mapped-ram": True})
        self._load(f"file:{ram}", timeout)

    def _capabilities(self, caps: dict[str, bool]) -> None:
        self.qmp.execute("migrate-set-capabilities",
                         capabilities=[{"capability": k, "state": v} for k, v in caps.items()])

    def _ignore_shared(self, on: bool) -> None:
        """x-ignore-shared: RAM in a shared file is not put in (or expected from) the stream.
        Both ends of a save and its load must agree."""
        self.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": on}])

    def _wait_migration(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.qmp.execute("query-migrate")
            if info.get("status") == "completed":
                return
            if info.get("status") == "failed":
                raise VmError(f"VM {self.dir.name}: {what} the VM state failed: "
                              f"{info.get('error-desc', 'no reason given')}")
            time.sleep(0.01)
        raise VmError(f"VM {self.dir.name}: {what} the VM state took over {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU through its monitor, SIGKILL if it is not gone in ``timeout``
        seconds; also for a QEMU another process started (``pid`` alone)."""
        if self.pid and alive(self.pid):
            try:
                self.qmp.execute("quit", timeout=5)
            except (CubefsError, OSError, TimeoutError):
                pass
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.pid and not wait_gone(self.pid, timeout):
            kill_pid(self.pid)
            wait_gone(self.pid, 5)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a child of ours that exited is reaped here (a zombie is not alive:
    the sandbox service starts QEMU itself and must see it die)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (reaping it if it is our child); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def kill_pid(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"
