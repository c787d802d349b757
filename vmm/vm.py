"""VMs and VM templates: boot or restore, serve the root from cubefs, run through the agent.

A VM is a directory under ``vm_root()`` (``$CUBEFS_VM_DIR``, default
``/run/cubefs/vm``) holding QEMU's sockets, its console log and ``vm.json``;
its root filesystem is a cubefs daemon serving an image (read-only) or a
volume (read-write) on ``fs.sock`` over vhost-user-fs.  The daemon ends when
QEMU disconnects, so a VM is stopped by stopping QEMU.

A template (``template_root()``, ``$CUBEFS_TEMPLATE_DIR``, default
``/var/lib/cubefs/templates``) is a VM saved at "agent ready" *with no root
attached*: ``ram`` (guest memory, written by QEMU through a shared file
mapping) and ``state`` (device state only).  It fits every root: a clone maps
``ram`` privately, loads ``state``, gets fresh randomness, hostname and
machine-id, and only then has its root hot-plugged and mounted.  QEMU 7.2
cannot migrate a vhost-user-fs device, and attaching after restore also means
the backend's session starts with the guest's (a fresh FUSE INIT), so no
backend state has to travel.

Snapshots, rollbacks and forks of a running VM keep its processes: they are
checkpoints (memory and disk at one instant, the root left mounted) made and
restored by vmm/vmsnap.py through vmm/checkpoint.py.  What stays here is the
disk-only kind (``snapshot_disk``, ``rollback_disk``: the root is unmounted
around a rollback) and what both need (``halt``, ``volume_index``).

Concurrency: one process drives a VM at a time (``vm.lock``, flock): the agent
channel carries one request at a time and QEMU's monitor one client.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cubefs.errors import CubefsError, NotFoundError, UsageError
from cubefs.node import control
from vmm.agent import Agent, AgentError, CommandResult
from vmm.machine import Machine, MachineSpec, Netdev, Ram, VmError, alive, kill_pid, state_argv, wait_gone

if TYPE_CHECKING:
    from cubefs.cow.index import VolumeIndex

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 120.0  # TCG boots Debian's kernel in ~5-10 s; a loaded CI machine may take far longer
# A restored guest's agent answers in ~0.1-0.3 s under TCG; 50 restores at once on 2 cores took
# one past 30 s in a full test run (a create failed with 500): a slow create beats a failed one.
RESTORE_AGENT_TIMEOUT = 60.0
NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def vm_root() -> Path:
    return Path(os.environ.get("CUBEFS_VM_DIR") or "/run/cubefs/vm")


def template_root() -> Path:
    return Path(os.environ.get("CUBEFS_TEMPLATE_DIR") or "/var/lib/cubefs/templates")


def default_kernel() -> Path:
    return Path(os.environ.get("CUBEFS_VM_KERNEL") or "/var/tmp/cubefs-vm/kernel")


def check_name(name: str, what: str) -> str:
    if not name or not set(name) <= NAME_OK or name[0] in ".-" or len(name) > 64:
        raise UsageError(f"{what} name {name!r}: use 1-64 of a-z 0-9 - _ . (not starting with . or -)")
    return name


@dataclass
class Root:
    """What a VM's root filesystem is: an image (read-only) or a volume (read-write)."""

    image: str | None = None
    volume: str | None = None
    store: str | None = None
    s3_endpoint: str | None = None
    cache_dir: str | None = None
    volume_dir: str | None = None
    # A volume root served by the node's root host for its image (cubefs.node.roots), with every
    # other shared root over that image: ~22 MB less host memory per VM than a daemon of its own.
    shared: bool = False
    # In a cluster: the node's list of peer chunk servers, followed as it changes (cubefs mount --peers-file).
    peers_file: str | None = None
    # A block volume (vmm/disk.py) served over vhost-user-blk: the guest's root is then an overlay of
    # the image (read-only, virtio-fs) under an ext4 on this disk, which takes every write.
    disk: str | None = None

    @property
    def read_only(self) -> bool:
        return self.volume is None and self.disk is None

    @property
    def writable_volume(self) -> str | None:
        """The volume that takes the VM's writes (snapshots, rollbacks and forks are of it)."""
        return self.volume or self.disk

    @property
    def label(self) -> str:
        if self.volume:
            return f"volume {self.volume}"
        return f"image {self.image}" + (f" on disk {self.disk}" if self.disk else "")

    def args(self, *flags: str) -> list[str]:
        """The cubefs options for this root among ``flags``."""
        values = {"--store": self.store, "--s3-endpoint": self.s3_endpoint, "--cache-dir": self.cache_dir,
                  "--volume-dir": self.volume_dir, "--peers-file": self.peers_file}
        return [a for f in flags if values[f] for a in (f, str(values[f]))]

    def serve(self, socket_path: Path, disk_socket: Path | None = None) -> None:
        """Start the cubefs daemon that serves this root on ``socket_path`` (and its disk's on
        ``disk_socket``): asked of the node's mount server from this process when one runs
        (0.2 s -> ~0.05 s per VM start or restore), else by a ``cubefs mount`` process, which
        starts that server."""
        target = ["--volume", self.volume] if self.volume else [str(self.image)]
        _mount([*target, str(socket_path), "--transport", "virtiofs",
                *self.args("--store", "--s3-endpoint", "--cache-dir", "--peers-file",
                           *(["--volume-dir"] if self.volume else [])),
                *(["--shared"] if self.shared and self.volume else [])])
        if self.disk:
            if disk_socket is None:
                raise VmError(f"root {self.label}: no socket for its disk")
            _mount(["--volume", self.disk, str(disk_socket), "--transport", "vhost-user-blk",
                    *self.args("--volume-dir", "--cache-dir")])

    def cubefs_volume(self, *args: str) -> str:
        return cubefs(*args, *self.args("--volume-dir"))

    def own_volume(self, name: str) -> Root:
        """A new volume over this image (a copy-on-write clone of it, O(1)) as the root."""
        self.cubefs_volume("volume", "create", name, "--from", str(self.image), *self.args("--store", "--s3-endpoint"))
        return replace(self, image=None, volume=name)

    def own_disk(self, name: str, size: int) -> Root:
        """A new block volume ``name`` of ``size`` bytes holding an empty ext4 (an O(1) clone of
        the node's formatted one for that size: vmm/disk.py) as the disk under this image."""
        from cubefs.cow.index import VolumeIndex
        from cubefs.volume.blk import resolve_image
        from cubefs.volume.cli import default_volume_dir
        from vmm.disk import clone_formatted

        lower = resolve_image(self.image, self.store, self.s3_endpoint) if self.image else None
        index = VolumeIndex(os.path.abspath(self.volume_dir or default_volume_dir()))
        try:
            clone_formatted(index, name, size, lower)  # the image recorded: 'cubefs commit' of the disk
            index.sync()
        finally:
            index.close()
        return replace(self, disk=name)


def _mount(argv: list[str]) -> None:
    from cubefs.cli import mount_through_server

    try:
        if mount_through_server(argv):
            return
    except CubefsError as err:
        raise VmError(f"cubefs mount failed: {err}") from None
    cubefs("mount", *argv)


def cubefs(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise VmError(f"cubefs {args[0]} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


# -- templates ---------------------------------------------------------------------

class StaleTemplateError(VmError):
    """A template saved for another machine: it cannot be restored (or would run an old agent)."""


_kernel_digests: dict[tuple[str, int, int], str] = {}


def machine_fingerprint(spec: MachineSpec) -> str:
    """What a saved VM state depends on: QEMU's device and CPU options (a restore into
    different devices fails, or silently misbehaves), and the guest kernel and initramfs
    (the saved RAM holds the agent that was running: a template from before an agent change
    would bring the old agent back).  Paths are left out: they differ per VM; so is TCG's
    translation-cache size (``state_argv``): QEMU's own memory, no part of a saved state."""
    kernel = spec.kernel_dir
    argv = state_argv(Machine(Path("/vm"), spec, Ram(Path("/vm/ram"), shared=True)).argv())
    parts = [qemu_version(argv[0])] + [a.replace(str(kernel), "KERNEL") for a in argv[1:]]
    for name in ("vmlinuz", "initrd.gz"):
        st = (kernel / name).stat()
        key = (str(kernel / name), st.st_mtime_ns, st.st_size)
        if key not in _kernel_digests:
            _kernel_digests[key] = hashlib.sha256((kernel / name).read_bytes()).hexdigest()
        parts.append(_kernel_digests[key])
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


_qemu_versions: dict[str, str] = {}


def qemu_version(qemu: str) -> str:
    """``qemu-system-x86_64 --version``'s first line: a state saved by one QEMU may not load in
    another (7.2's templates do not load in 10.0), so it is part of the fingerprint."""
    if qemu not in _qemu_versions:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        _qemu_versions[qemu] = (out.splitlines() or ["unknown"])[0]
    return _qemu_versions[qemu]


@dataclass
class Template:
    name: str
    memory_mb: int
    cpus: int
    accel: str
    kernel_dir: str
    created: str = ""
    source: str = "boot"  # or "fork of VM"
    seconds: float = 0.0  # to make it
    machine: str = ""  # machine_fingerprint() when it was saved

    @property
    def dir(self) -> Path:
        return template_root() / self.name

    @property
    def spec(self) -> MachineSpec:
        return MachineSpec(Path(self.kernel_dir), self.memory_mb, self.cpus, self.accel)

    def save_meta(self) -> None:
        (self.dir / "template.json").write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, name: str, check: bool = True) -> Template:
        """The template ``name``; with ``check``, StaleTemplateError if it cannot be restored here."""
        path = template_root() / check_name(name, "template") / "template.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no VM template {name} (in {template_root()}; 'cubefs vm template ls')") from None
        t = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
        if not (t.dir / "ram").exists() or not (t.dir / "state").exists():
            raise VmError(f"VM template {name} is incomplete (no ram or state in {t.dir}): remove it")
        if check and t.machine != machine_fingerprint(t.spec):
            raise StaleTemplateError(f"VM template {name} was saved for another machine (QEMU options or guest "
                                     f"kernel/agent changed since): make it again ('cubefs vm template rm {name}', "
                                     "then create)")
        return t

    @classmethod
    def list(cls) -> list[Template]:
        out = []
        root = template_root()
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                out.append(cls.load(d.name, check=False))
            except CubefsError:
                continue
        return out

    @classmethod
    def create(cls, name: str, spec: MachineSpec) -> Template:
        """Boot a VM with its RAM in the template's file, wait for its agent, save it."""
        t = cls(check_name(name, "template"), spec.memory_mb, spec.cpus, spec.accel, str(spec.kernel_dir),
                datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_fingerprint(spec))
        if t.dir.exists():
            raise UsageError(f"VM template {name} exists ('cubefs vm template rm {name}' first)")
        t0 = time.monotonic()
        t.dir.mkdir(parents=True)
        try:
            machine = Machine(t.dir / "boot", spec, Ram(t.dir / "ram", shared=True))
            machine.start()
            try:
                with Agent(machine.agent_path, f"template {name}") as agent:
                    agent.connect(BOOT_TIMEOUT)
                machine.save(t.dir / "state")
            finally:
                machine.stop()
            shutil.rmtree(t.dir / "boot", ignore_errors=True)
            t.seconds = round(time.monotonic() - t0, 3)
            t.save_meta()
        except BaseException:
            shutil.rmtree(t.dir, ignore_errors=True)
            raise
        return t

    def remove(self) -> None:
        users = [v.name for v in Vm.list() if v.info.get("template") == self.name]
        if users:
            raise UsageError(f"VM template {self.name} is in use by {', '.join(users)}")
        shutil.rmtree(self.dir)


# -- VMs -----------------------------------------------------------------------------

@dataclass
class VmInfo:
    name: str
    root: dict[str, Any]
    memory_mb: int
    accel: str
    template: str | None
    created: str
    qemu_pid: int = 0
    start_seconds: float = 0.0
    hostname: str = ""
    machine_id: str = ""
    machine: str = ""  # machine_fingerprint() of the QEMU it runs, when it started: what its checkpoints load into


class Vm:
    def __init__(self, name: str) -> None:
        self.name = check_name(name, "VM")
        self.dir = vm_root() / name
        self.info: dict[str, Any] = {}
        meta = self.dir / "vm.json"
        if meta.exists():
            self.info = json.loads(meta.read_text())

    @property
    def root(self) -> Root:
        return Root(**self.info["root"])

    @property
    def alive(self) -> bool:
        return bool(self.info.get("qemu_pid")) and alive(int(self.info["qemu_pid"]))

    @property
    def fs_socket(self) -> Path:
        return self.dir / "fs.sock"

    @property
    def disk_socket(self) -> Path:
        return self.dir / "disk.sock"

    def machine(self) -> Machine:
        m = Machine(self.dir, MachineSpec(Path(self.info.get("kernel_dir", default_kernel())),
                                          self.info["memory_mb"], 1, self.info["accel"]), Ram())
        m.pid = int(self.info.get("qemu_pid", 0))
        return m

    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.dir / "vm.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def agent(self) -> Agent:
        a = Agent(str(self.dir / "agent.sock"), self.name)
        a.connect(30)
        return a

    # -- life --------------------------------------------------------------------
    @classmethod
    def start(cls, name: str, root: Root, spec: MachineSpec, template: str | None = None,
              writable: bool = False, netdev: Netdev | None = None, disk: int | None = None) -> Vm:
        """Boot (or restore from ``template``) a VM with ``root``, up to a mounted root;
        ``writable``: an image root gets a volume of its own (``vm-NAME``), removed with
        the VM; ``disk``: instead, a block volume of that many bytes (``vm-NAME``, an empty
        ext4, removed with the VM) under an overlay root on the image; ``netdev``: its NIC's
        back-end (none: no peer)."""
        if disk is not None and (not root.image or root.volume or root.disk):
            raise UsageError("--disk gives an image's VM a disk for its writes: it goes with an image, not --volume")
        if disk is not None:
            from vmm.disk import check_size

            check_size(disk)
        vm = cls(name)
        if vm.dir.exists():
            if vm.alive:
                raise UsageError(f"VM {name} is running ('cubefs vm rm {name}' first)")
            vm.destroy()  # what a crashed VM left: its root's daemon too
        vm.dir.mkdir(parents=True)
        t0 = time.monotonic()
        tpl = Template.load(template) if template else None
        if tpl is not None:
            spec = tpl.spec
        machine_id = uuid.uuid4().hex
        info = VmInfo(name, asdict(root), spec.memory_mb, spec.accel, template,
                      datetime.now(UTC).isoformat(timespec="seconds"), hostname=name, machine_id=machine_id,
                      machine=tpl.machine if tpl is not None else machine_fingerprint(spec))
        vm.info = asdict(info) | {"kernel_dir": str(spec.kernel_dir), "cpus": spec.cpus}
        try:
            if disk is not None:
                root = root.own_disk(f"vm-{name}", disk)
                vm.info["root"] = asdict(root)
                vm.info["owns_volume"] = True
                vm._save()
            elif writable and root.image:
                root = root.own_volume(f"vm-{name}")
                vm.info["root"] = asdict(root)
                vm.info["owns_volume"] = True
                vm._save()
            root.serve(vm.fs_socket, vm.disk_socket)
            disk_socket = str(vm.disk_socket) if root.disk else None
            if tpl is None:
                machine = Machine(vm.dir, spec, Ram(), fs_socket=str(vm.fs_socket), netdev=netdev,
                                  blk_socket=disk_socket)
            else:
                machine = Machine(vm.dir, spec, Ram(tpl.dir / "ram", shared=False), incoming=True, netdev=netdev)
            machine.start()
            vm.info["qemu_pid"] = machine.pid
            vm._save()
            if tpl is not None:
                machine.restore(tpl.dir / "state")
            with Agent(machine.agent_path, name) as agent:
                agent.connect(BOOT_TIMEOUT if tpl is None else RESTORE_AGENT_TIMEOUT)
                agent.freshen(name, machine_id)
                if tpl is not None:
                    machine.attach_fs(str(vm.fs_socket))
                    if disk_socket:
                        machine.attach_blk(disk_socket)
                agent.mount(root.read_only, disk=bool(root.disk))
            vm.info["start_seconds"] = round(time.monotonic() - t0, 3)
            vm._save()
        except BaseException:
            vm.destroy()
            raise
        return vm

    def _save(self) -> None:
        tmp = self.dir / "vm.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=1) + "\n")
        os.replace(tmp, self.dir / "vm.json")

    def exec(self, argv: list[str] | str, stdin: bytes = b"", env: dict[str, str] | None = None,
             workdir: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run a command (an argv, or a shell script) in the VM's root; its result."""
        self._running()
        script = argv if isinstance(argv, str) else " ".join(shlex.quote(a) for a in argv)
        prelude = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        if workdir:
            prelude += f"cd {shlex.quote(workdir)} || exit 126\n"
        with self.locked(), self.agent() as agent:
            return agent.run(prelude + script, stdin, timeout=timeout)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file into the VM's root."""
        self._running()
        with self.locked(), self.agent() as agent:
            agent.put(path, data, mode)

    def get(self, path: str) -> bytes:
        """Read a file of the VM's root."""
        self._running()
        with self.locked(), self.agent() as agent:
            return agent.get(path)

    def _running(self) -> None:
        if not self.info:
            raise NotFoundError(f"no VM {self.name} (in {vm_root()}; 'cubefs vm ls')")
        if not self.alive:
            raise VmError(f"VM {self.name} is not running (its QEMU is gone: 'cubefs vm rm {self.name}')")

    def destroy(self) -> None:
        """Stop QEMU (the root's daemon goes with it) and forget the VM: its directory (its
        checkpoints too) and, if it made its volume (``--writable``, a fork), the volume."""
        self.halt()
        if self.info.get("owns_volume"):
            try:
                self.root.cubefs_volume("volume", "rm", str(self.root.writable_volume))
            except VmError as err:
                log.warning("VM %s: its volume stays: %s", self.name, err)
        shutil.rmtree(self.dir, ignore_errors=True)

    def halt(self) -> None:
        """Stop QEMU and wait until the root's daemon has ended (its volume synced and
        unlocked); the VM's directory stays, for a rollback to restore into."""
        if self.info.get("qemu_pid"):
            self.machine().stop()
        self._stop_root()

    def _stop_root(self) -> None:
        """End the root's daemons (they end by themselves when QEMU goes) and wait until they
        have: a volume is synced and unlocked only then.  A shared root's host serves other
        VMs: only this VM's mount ends (its host is never signalled)."""
        for sock in (self.fs_socket, self.disk_socket):
            self._stop_daemon(sock)

    def _stop_daemon(self, sock: Path) -> None:
        try:
            info = control.read_registry(str(sock))
            pid = int(info.get("pid", 0))
        except (CubefsError, OSError, ValueError):
            return
        if info.get("shared"):
            from cubefs.node.roots import end_shared_mount

            end_shared_mount(str(sock), info)
            return
        if pid and not wait_gone(pid, 2):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not wait_gone(pid, 30):
                kill_pid(pid)
        control.remove_registry(str(sock))

    # -- volumes -----------------------------------------------------------------
    def _require_volume(self, what: str) -> str:
        self._running()
        return self.volume_name(what)

    def volume_name(self, what: str) -> str:
        """The volume the VM's root is; a usage error for a VM on an image."""
        if not self.info:
            raise NotFoundError(f"no VM {self.name} (in {vm_root()}; 'cubefs vm ls')")
        vol = self.info["root"].get("volume") or self.info["root"].get("disk")
        if not vol:
            raise UsageError(f"VM {self.name} runs on an image, read-only: {what} needs a VM on a volume "
                             "('cubefs vm start NAME --volume V', or --disk SIZE)")
        return str(vol)

    def volume_index(self) -> VolumeIndex:
        """The index of the VM's volume directory, opened in this process (one O(1)
        transaction per snapshot, clone or rollback: no ``cubefs`` process, ~0.25 s each)."""
        from cubefs.cow.index import VolumeIndex
        from cubefs.volume.cli import default_volume_dir

        return VolumeIndex(os.path.abspath(self.root.volume_dir or default_volume_dir()))

    def snapshot_disk(self, snap: str | None = None) -> str:
        """Snapshot the VM's volume with what the guest wrote (its caches synced first): the
        disk alone, the guest's processes and memory not kept."""
        vol = self._require_volume("a snapshot")
        index = self.volume_index()
        try:
            with self.locked(), self.agent() as agent:
                agent.run("sync")  # what the guest has in dirty pages, to the daemon
                made = index.snapshot(vol, snap)
            index.sync_all()
        finally:
            index.close()
        return made.name

    def rollback_disk(self, snap: str) -> None:
        """Show the disk-only snapshot ``snap`` in the guest: the root is unmounted around
        the rollback, since virtio-fs cannot tell the guest to drop its caches; so a root in
        use (a process's working directory or open file in it) cannot be rolled back so."""
        vol = self._require_volume("a rollback")
        if self.root.disk:
            raise UsageError(f"VM {self.name} writes to a disk: its disk-only snapshots are rolled back with the VM "
                             "stopped ('cubefs vm rm', then 'cubefs rollback'); a memory snapshot ('cubefs vm "
                             "snapshot' without --disk-only) rolls back while it runs")
        with self.locked(), self.agent() as agent:
            try:
                agent.umount()
            except AgentError as err:
                if "busy" not in str(err).lower():
                    raise
                raise VmError(f"VM {self.name}: its root is in use, so it cannot be unmounted for a disk-only "
                              f"rollback ({str(err).rsplit(': ', 1)[-1]}): use a memory snapshot (cubefs vm "
                              "snapshot without --disk-only) to roll back a VM whose root is in use") from None
            try:
                self.root.cubefs_volume("rollback", vol, snap)
            finally:
                agent.mount(read_only=False)

    @classmethod
    def list(cls) -> list[Vm]:
        root = vm_root()
        return [cls(d.name) for d in sorted(root.iterdir()) if (d / "vm.json").exists()] if root.is_dir() else []


def run(root: Root, argv: list[str], spec: MachineSpec, template: str | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None,
        workdir: str | None = None, writable: bool = False, disk: int | None = None) -> tuple[CommandResult, Vm]:
    """``cubefs vm run``: a VM for one command, gone afterwards (its own volume or disk too)."""
    name = check_name(f"run-{os.getpid()}-{uuid.uuid4().hex[:6]}", "VM")
    vm = Vm.start(name, root, spec, template, writable, disk=disk)
    try:
        return vm.exec(argv, env=env, workdir=workdir, timeout=timeout), vm
    finally:
        vm.destroy()
