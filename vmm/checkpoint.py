"""Checkpoints of a running VM: its memory, its devices and its root's state at one instant.

A checkpoint is a directory: ``ram`` (QEMU's mapped-ram stream: device state,
the root back-end's own state, and the guest pages that differ from the VM
template it was restored from; vmm/memsnap.py) and ``checkpoint.json`` (what
it needs to be restored: machine size, kernel, the template whose RAM is the
base, and the volume snapshot taken at the same instant).

**One instant.**  QEMU writes RAM while the guest runs and pauses it only to
switch over (``pause-before-switchover``).  In that pause the guest's CPUs,
its devices and the vhost-user-fs back-end are all stopped (the back-end has
answered every request it took before ``GET_VRING_BASE`` returned), so the
volume snapshot taken then (O(1): the active layer is frozen) holds exactly
what the guest's memory believes is on disk.  Measured under TCG on this
2-core machine (256 MiB guest, 31 MiB written since the template): the guest
is paused 16-25 ms by QEMU plus the snapshot; the whole save takes ~0.8 s.

**The root stays attached.**  QEMU >= 9 saves a vhost-user-fs device by
asking the back-end for its state (vhost-user ``DEVICE_STATE``): the FUSE
session and the kernel's references to inodes, so a process that holds a
file open — even an unlinked one — keeps it across a restore.  A restore
starts a new back-end on a volume that shows the snapshot (a clone of it, or
the same volume rolled back) and a new QEMU that loads the checkpoint.

**A VM's disk** (vmm/disk.py) is a block volume, snapshotted in the same pause:
QEMU saves its vhost-user-blk device (the rings' indexes; the back-end answers
each request before taking the next, so none is in flight once QEMU stopped
the ring), and the restore serves the snapshot's volume on a new socket and
has the device on QEMU's command line, so the loaded state finds it.

**Identity.**  Every QEMU process gets a new ``vmgenid``, so a restored
kernel reseeds its RNG by itself; the caller then gives the guest its
hostname, machine-id and clock (``Agent.freshen``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cubefs.errors import CubefsError, NotFoundError
from vmm import memsnap
from vmm.agent import Agent
from vmm.machine import Machine, MachineSpec, Netdev, Ram, VmError
from vmm.vm import RESTORE_AGENT_TIMEOUT, Root, Template, Vm, VmInfo, machine_fingerprint

# QEMU's multifd threads for a checkpoint's save and load (mapped-ram: each writes or reads its
# pages at their own offsets; the file is the same).  Measured at 256 MiB / 10 MiB dirty: the
# snapshot's live phase 0.11-0.17 s -> 0.08, the guest's pause 0.13-0.17 s -> 0.054 (the
# switch-over's pages and zero-page checks in parallel, not in QEMU's one migration thread)
MULTIFD_CHANNELS = 2


def _multifd(machine: Machine, on: bool) -> None:
    machine.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": on}])
    if on:
        machine.qmp.execute("migrate-set-parameters", **{"multifd-channels": MULTIFD_CHANNELS})




def _load(machine: Machine, ram: Path, timeout: float = 120.0) -> None:
    """Load checkpoint RAM file ``ram`` into the ``incoming`` machine (it stays paused):
    ``Machine.load_ram_file``'s work in fewer monitor round trips, and waited for on QEMU's
    MIGRATION events instead of a status poll every 10 ms (up to 10 ms late, ~5 on average,
    of a rollback's ~0.14 s load; each capability call was a round trip of its own)."""
    q = machine.qmp
    q.execute("migrate-set-capabilities", capabilities=[
        {"capability": c, "state": on} for c, on in (("x-ignore-shared", False), ("mapped-ram", True),
                                                     ("multifd", True), ("events", True))])
    q.execute("migrate-set-parameters", **{"multifd-channels": MULTIFD_CHANNELS})
    q.execute("migrate-incoming", uri=f"file:{ram}")
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VmError(f"VM {machine.dir.name}: loading the VM state took over {timeout:.0f} s")
        status = q.wait_event("MIGRATION", left).get("data", {}).get("status")
        if status == "completed":
            break
        if status == "failed":
            info = q.execute("query-migrate")
            raise VmError(f"VM {machine.dir.name}: loading the VM state failed: "
                          f"{info.get('error-desc', 'no reason given')}; {machine.log_tail()}")
    machine._link()


@dataclass
class Checkpoint:
    dir: str
    memory_mb: int
    cpus: int
    accel: str
    kernel_dir: str
    machine: str  # machine_fingerprint(): QEMU, its options and the guest kernel it was saved with
    template: str | None  # the VM template whose RAM file is the base of ``ram``, if any
    volume: str | None  # the root volume and its snapshot at the checkpoint's instant
    snapshot: str | None
    created: str = ""
    paused_seconds: float = 0.0
    saved_seconds: float = 0.0  # QEMU's part of ``seconds``; the rest trims or prepares the file
    seconds: float = 0.0
    ram_pages: int = 0  # guest pages kept in ``ram`` (those that differ from the template)
    ram_offset: int = 0  # not 0: ``ram`` is mapped from here, not loaded (memsnap.self_contained)
    phases: dict[str, float] = field(default_factory=dict)  # where ``seconds`` went (take's docstring)
    trimmed: bool = True  # False: ``ram`` still holds the template's pages too (take(trim_later=True))

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def spec(self) -> MachineSpec:
        return MachineSpec(Path(self.kernel_dir), self.memory_mb, self.cpus, self.accel)

    @property
    def ram_bytes(self) -> int:
        return self.ram_pages * memsnap.PAGE

    def save(self) -> None:
        tmp = self.path / "checkpoint.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.path / "checkpoint.json")

    @classmethod
    def load(cls, directory: Path) -> Checkpoint:
        try:
            doc = json.loads((directory / "checkpoint.json").read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no checkpoint in {directory}") from None
        doc["dir"] = str(directory)
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    def ram(self) -> Ram:
        """Guest RAM of a VM restored from this checkpoint."""
        if self.ram_offset:
            return Ram(self.path / "ram", shared=False, offset=self.ram_offset)
        if self.template:
            return Ram(Template.load(self.template).dir / "ram", shared=False)
        return Ram()


class StaleCheckpointError(VmError):
    """A checkpoint saved by another QEMU, machine type or guest kernel than this host runs now."""


UNKNOWN_MACHINE = "unknown"  # the fingerprint of a VM started before VMs recorded theirs: no restore accepts it


def vm_machine(vm: Vm) -> str:
    """The machine fingerprint ``vm``'s QEMU was started (or restored) with, as its info recorded
    it: not today's ``machine_fingerprint`` of its spec.  A VM running since before an upgrade
    (QEMU, its machine options, the guest kernel) runs the old machine, and its checkpoints would
    pass the check and then fail to load (or, worse, load into different devices)."""
    return str(vm.info.get("machine") or UNKNOWN_MACHINE)


def check_machine(ck: Checkpoint) -> None:
    """StaleCheckpointError unless ``ck`` was saved by the QEMU, machine type and guest kernel this
    host runs now: cheap (QEMU's version and the kernel's digests are cached per process), so
    callers check *before* they change anything (the sandbox service: before a rollback pauses
    the sandbox)."""
    if ck.machine != machine_fingerprint(ck.spec):
        raise StaleCheckpointError(f"checkpoint {ck.path.name} was saved by another QEMU, machine type or guest "
                                   "kernel: it cannot be restored (take it again)")


def check_vm(vm: Vm) -> None:
    """StaleCheckpointError if ``vm`` runs another machine than a VM started now would (it started
    before QEMU, its machine options or the guest kernel changed, or before VMs recorded theirs):
    a checkpoint of it could be taken but never restored, so a fork of it is refused up front."""
    if vm_machine(vm) != machine_fingerprint(_spec(vm)):
        raise StaleCheckpointError(f"VM {vm.name} runs another QEMU, machine type or guest kernel than this host "
                                   "starts now (it started before they changed): its state cannot be restored")


def _spec(vm: Vm) -> MachineSpec:
    return MachineSpec(Path(vm.info["kernel_dir"]), int(vm.info["memory_mb"]), int(vm.info.get("cpus", 1)),
                       vm.info["accel"])


def take(vm: Vm, dest: Path, at_instant: Callable[[], tuple[str | None, str | None]],
         shared: bool = False, trim_later: bool = False) -> Checkpoint:
    """Checkpoint the running ``vm`` into the new directory ``dest``.  ``at_instant`` runs
    while the guest is paused and returns the (volume, snapshot) it made of the root.
    On failure ``dest`` is removed and the VM runs on as it was.

    The RAM file keeps only what differs from the VM's template (restores load those
    pages, each into a page of its own), unless ``shared`` or the VM has no template under
    its RAM (a cold boot, a fork's child): then it holds the whole RAM and restores *map*
    it, sharing every page the guests do not write: what a fork wants (its children share
    the parent's memory of that instant, not only the template's).

    With ``trim_later`` only the file's bitmap is rewritten (``memsnap.mark``: a restore
    then loads the guest's pages alone, exactly as from a trimmed file) and :func:`trim`
    frees the template's pages afterwards (``trimmed`` False until then); it replaces the
    file atomically with one of the same content, so a restore meanwhile reads either.  The
    sandbox service answers first and trims after (0.1-0.45 s under load,
    docs/benchmarks.md)."""
    vm._running()
    template = vm.info.get("template") if not vm.info.get("ram_file") else None
    base = Template.load(template, check=False).dir / "ram" if template and not shared else None
    spec = _spec(vm)
    ck = Checkpoint(str(dest), spec.memory_mb, spec.cpus, spec.accel, str(spec.kernel_dir), vm_machine(vm),
                    template if base is not None else None, None, None,
                    datetime.now(UTC).isoformat(timespec="milliseconds"))
    dest.mkdir(mode=0o700, parents=True)
    t0 = time.monotonic()
    clock = [t0]

    def phase(name: str) -> None:
        now = time.monotonic()
        ck.phases[name] = round(now - clock[0], 4)
        clock[0] = now

    written: list[bytes] = []
    try:
        m = vm.machine()

        def instant() -> None:
            phase("live")  # QEMU's pre-copy while the guest runs, until it paused it
            if base is not None:  # which pages are the guest's own, read while it cannot write
                lo, hi = memsnap.ram_mapping(m.pid, base)
                written.append(memsnap.written_pages(m.pid, lo, hi))
            phase("scan")
            ck.volume, ck.snapshot = at_instant()
            phase("at_instant")

        with vm.locked():
            try:
                _multifd(m, True)
                try:
                    ck.paused_seconds = round(m.save_live(dest / "ram", instant), 4)
                finally:
                    with contextlib.suppress(CubefsError, OSError):
                        _multifd(m, False)
            finally:
                m.close_monitor()  # QEMU's monitor serves one client at a time
        phase("switchover")  # the rest of the pause (devices, the back-end's state, cont)
        ck.saved_seconds = round(time.monotonic() - t0, 4)
        if base is not None and trim_later:  # restores from it already load only the guest's pages
            ck.ram_pages, ck.trimmed = written[0].count(1), False
            _pending[str(dest)] = (written[0], memsnap.mark(dest / "ram", written[0]))
        elif base is not None:
            ck.ram_pages = memsnap.trim(dest / "ram", written[0])
        else:
            ck.ram_offset = memsnap.self_contained(dest / "ram").pages_offset
            ck.ram_pages = (dest / "ram").stat().st_blocks * 512 // memsnap.PAGE
        os.chmod(dest / "ram", 0o600)
        phase("trim")
        ck.seconds = round(time.monotonic() - t0, 4)
        ck.save()
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return ck


def fsync_tree(top: Path) -> None:
    """fsync every file and directory under ``top`` (a checkpoint's few files), and ``top``'s
    entry in its parent: what QEMU wrote to a RAM file is in the page cache only, and a
    checkpoint whose record outlived a power cut but whose pages did not would restore a
    torn memory."""
    for dirpath, _dirs, files in os.walk(top):
        for name in [*files, "."]:
            _fsync(os.path.join(dirpath, name))
    _fsync(str(top.parent))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_pending: dict[str, tuple[bytes, bytes]] = {}  # checkpoint dir -> (written pages, QEMU's bitmap), for trim()


def trim(ck: Checkpoint) -> None:
    """Free the template's pages from the RAM file of a checkpoint taken with ``trim_later``
    (in this process; its bitmap already says which pages are the guest's); nothing if it is
    trimmed.  FileNotFoundError if the checkpoint was removed meanwhile."""
    pending = _pending.pop(ck.dir, None)
    if ck.trimmed or pending is None:
        return
    memsnap.reclaim(ck.path / "ram", *pending)
    ck.trimmed = True
    ck.save()


def forget(ck: Checkpoint) -> None:
    """Drop what :func:`trim` would have used (the checkpoint stays untrimmed)."""
    _pending.pop(ck.dir, None)


def restore(name: str, root: Root, ck: Checkpoint, hostname: str | None = None, freshen: bool = True,
            netdev: Netdev | None = None) -> Vm:
    """A new VM ``name`` that continues from checkpoint ``ck`` with ``root`` (a volume that
    shows ``ck``'s snapshot) as its root: its processes, their memory and open files as they
    were.  It gets a new RNG state (vmgenid) and, with ``freshen``, its hostname, machine-id
    and the host's clock through the agent; without, the caller must give them (the sandbox
    service does, over the channel it opens anyway: one agent connection less, ~0.12 s under
    TCG right after a restore, when every guest code path is translated anew)."""
    check_machine(ck)
    vm = Vm(name)
    if vm.dir.exists():
        if vm.alive:
            raise VmError(f"VM {name} is running")
        vm.destroy()
    vm.dir.mkdir(parents=True)
    t0 = time.monotonic()
    machine_id = uuid.uuid4().hex
    info = VmInfo(name, asdict(root), ck.memory_mb, ck.accel, ck.template,
                  datetime.now(UTC).isoformat(timespec="seconds"), hostname=hostname or name, machine_id=machine_id,
                  machine=ck.machine)
    vm.info = asdict(info) | {"kernel_dir": ck.kernel_dir, "cpus": ck.cpus, "checkpoint": ck.dir}
    phases: dict[str, float] = {}  # where a restore's time goes, for the log and the benchmarks
    clock = [t0]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - clock[0], 4)
        clock[0] = now

    try:
        root.serve(vm.fs_socket, vm.disk_socket)
        phase("backend")
        ram = ck.ram()
        if ck.ram_offset:  # mapped, not loaded: its later checkpoints cannot be trimmed against a template
            vm.info["ram_file"] = str(ram.path)
        machine = Machine(vm.dir, ck.spec, ram, fs_socket=str(vm.fs_socket), incoming=True, netdev=netdev,
                          blk_socket=str(vm.disk_socket) if root.disk else None)
        machine.start()
        vm.info["qemu_pid"] = machine.pid
        vm._save()
        phase("qemu")
        _load(machine, ck.path / "ram")
        machine.qmp.execute("cont")
        phase("load")
        _multifd(machine, False)  # a later save to a plain file: QEMU refuses multifd there
        machine.close_monitor()  # one client at a time: the caller's own sessions come next
        if freshen:
            with Agent(machine.agent_path, name) as agent:
                agent.connect(RESTORE_AGENT_TIMEOUT)
                agent.freshen(hostname or name, machine_id)
            phase("identity")
        vm.info["start_seconds"] = round(time.monotonic() - t0, 3)
        vm.info["restore_phases"] = phases
        vm._save()
    except BaseException:
        vm.destroy()
        raise
    return vm
