"""``cubefs vm snapshot / rollback / fork``: a running VM's processes kept, memory and disk.

A VM snapshot is a checkpoint (vmm/checkpoint.py) kept in the VM's directory,
``VMDIR/checkpoints/S/`` (0700), plus the snapshot ``S`` of the VM's volume,
taken while QEMU holds the guest paused for the switch-over: the guest's RAM
and the volume are of one instant, and the root stays mounted throughout, so
processes that keep files open in it (unlinked ones too) are no obstacle.

* **Rollback** stops the VM's QEMU (its root's daemon ends with it), rolls the
  volume back to ``S`` in the index (O(1)), and restores the checkpoint under
  the same name, on the same volume, with the same hostname and machine-id:
  the guest's processes go on from ``S``.  A snapshot without a checkpoint
  (``--disk-only``) is rolled back as before: unmount, roll back, mount.
* **Fork** takes one checkpoint (the parent runs on), clones the volume
  snapshot N times in one index transaction, and restores the checkpoint N
  times under new names with new identities.  The checkpoint's RAM is kept
  whole (``take(shared=True)``) and every child maps it privately, so the
  children share the parent's pages of that instant until they write them.
  Its directory and the parent's volume snapshot are removed once the
  children run: a mapped file lives on, unlinked, until its last child ends
  (its space is then the children's shared memory, nothing more).  The fork
  is all or nothing: a child that fails takes the others (and their volumes)
  with it.

``checkpoint.restore`` removes a stopped VM's directory before it restores
into that name (it would take the checkpoints with it, and a VM's own
volume); a rollback therefore moves ``checkpoints/`` aside (``vm_root()/
.NAME.checkpoints``: no ``vm.json``, so never listed as a VM), empties the
directory itself, and puts the checkpoints back after the restore, whether it
worked or not.  A failed restore leaves the VM stopped with its checkpoints:
``vm rollback`` again, or ``vm rm``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cubefs.errors import CubefsError, NotFoundError, UsageError
from vmm import checkpoint
from vmm.agent import Agent
from vmm.machine import VmError
from vmm.vm import NAME_OK, Root, Template, Vm, check_name, vm_root

CHECKPOINTS = "checkpoints"
MAX_FORKS = 64
HOLDER_TIMEOUT = 30.0  # for the VM's old root daemon to let go of the volume


@dataclass
class SnapshotResult:
    vm: str
    snapshot: str
    volume: str
    memory: bool  # a checkpoint was kept (else the disk alone)
    paused_seconds: float = 0.0
    seconds: float = 0.0
    ram_bytes: int = 0


def checkpoint_dir(vm: Vm, snap: str) -> Path:
    return vm.dir / CHECKPOINTS / snap


def aside_dir(vm: Vm) -> Path:
    """Where a rollback keeps the VM's checkpoints while it restores (see the module's doc)."""
    return vm_root() / f".{vm.name}.{CHECKPOINTS}"


def has_checkpoint(vm: Vm, snap: str) -> bool:
    """Whether ``snap`` is a memory snapshot of ``vm`` (any other name is the volume's alone)."""
    aside = aside_dir(vm)
    if aside.is_dir() and vm.dir.is_dir() and not (vm.dir / CHECKPOINTS).exists():
        os.rename(aside, vm.dir / CHECKPOINTS)  # a rollback killed while it restored left them there
    ok = bool(snap) and set(snap) <= NAME_OK and snap[0] not in ".-"
    return ok and (checkpoint_dir(vm, snap) / "checkpoint.json").exists()


def default_name() -> str:
    """The UTC time to the millisecond, in the characters a checkpoint's name may have."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


def snapshot(vm: Vm, name: str | None = None, disk_only: bool = False) -> SnapshotResult:
    """Snapshot a running VM on a volume: a checkpoint (memory and disk at one instant),
    or with ``disk_only`` its volume alone (the guest's caches synced first)."""
    vol = vm._require_volume("a snapshot")
    if disk_only:
        t0 = time.monotonic()
        made = vm.snapshot_disk(name)
        return SnapshotResult(vm.name, made, vol, False, seconds=round(time.monotonic() - t0, 4))
    snap = check_name(name or default_name(), "snapshot")
    dest = checkpoint_dir(vm, snap)
    if dest.exists():
        raise UsageError(f"VM {vm.name} already has a snapshot {snap} ('cubefs vm rm' removes them with the VM)")
    index = vm.volume_index()
    try:
        with index.read() as txn:
            index.volume(txn, vol)
            with contextlib.suppress(NotFoundError):
                index.get_snapshot(txn, vol, snap)
                raise UsageError(f"volume {vol} already has a snapshot {snap}: name this one otherwise (--name)")
        (vm.dir / CHECKPOINTS).mkdir(mode=0o700, exist_ok=True)

        made: list[str] = []

        def at_instant() -> tuple[str | None, str | None]:  # the guest is paused: O(1), ~1 ms
            made.append(index.snapshot(vol, snap).name)
            return vol, snap

        try:
            ck = checkpoint.take(vm, dest, at_instant)
            index.sync_all()  # the snapshot and the blocks under it survive a power cut
            checkpoint.fsync_tree(dest)  # and the RAM file with them (QEMU leaves it in the page cache)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            if made:  # not a disk-only snapshot by accident: the name stays free for a retry
                with contextlib.suppress(CubefsError):
                    index.remove_snapshot(vol, snap)
            raise
    finally:
        index.close()
    return SnapshotResult(vm.name, snap, vol, True, ck.paused_seconds, ck.seconds, ck.ram_bytes)


def rollback(vm: Vm, snap: str) -> dict[str, Any]:
    """Put the VM back to snapshot ``snap``: with a checkpoint, the whole VM (its processes
    and open files as they were; it need not even be running); else its disk alone."""
    vol = vm.volume_name("a rollback")
    t0 = time.monotonic()
    if not has_checkpoint(vm, snap):
        index = vm.volume_index()
        try:
            with index.read() as txn:
                try:
                    index.get_snapshot(txn, vol, snap)
                except NotFoundError:
                    raise NotFoundError(f"VM {vm.name} has no snapshot {snap} (nor has its volume {vol}: "
                                        f"'cubefs snapshots {vol}')") from None
        finally:
            index.close()
        vm.rollback_disk(snap)
        return {"vm": vm.name, "snapshot": snap, "memory": False, "seconds": round(time.monotonic() - t0, 4)}
    ck = checkpoint.Checkpoint.load(checkpoint_dir(vm, snap))
    # everything that could refuse the restore is checked while the VM still runs
    if ck.volume != vol:
        raise VmError(f"snapshot {snap} of VM {vm.name} is of volume {ck.volume}, not of its root {vol}")
    try:
        checkpoint.check_machine(ck)
    except checkpoint.StaleCheckpointError as err:
        raise VmError(f"snapshot {snap} of VM {vm.name}: {err}; its disk can be: 'cubefs rollback' with the VM "
                      "removed") from None
    if ck.template:  # the VM template its RAM is based on: there, and for this machine
        Template.load(ck.template)
    index = vm.volume_index()
    try:
        with index.read() as txn:
            index.get_snapshot(txn, vol, str(ck.snapshot))
        old = dict(vm.info)
        with vm.locked():
            vm.halt()
            _wait_unmounted(index, vol)
            index.rollback(vol, str(ck.snapshot))
            index.sync()
            restored = _restore_in_place(vm, snap, old)
    finally:
        index.close()
    return {"vm": vm.name, "snapshot": snap, "memory": True, "seconds": round(time.monotonic() - t0, 4),
            "restore_seconds": restored.info.get("start_seconds")}


def _wait_unmounted(index: Any, vol: str) -> None:
    """Until no daemon holds ``vol`` (the VM's own ends once QEMU has gone)."""
    from cubefs.cow.lock import holder_of

    deadline = time.monotonic() + HOLDER_TIMEOUT
    while (holder := holder_of(index, vol)) is not None:
        if time.monotonic() > deadline:
            raise VmError(f"volume {vol} is still mounted at {holder.get('mountpoint', '?')} (pid "
                          f"{holder.get('pid', '?')}): it cannot be rolled back")
        time.sleep(0.02)


def _restore_in_place(vm: Vm, snap: str, old: dict[str, Any]) -> Vm:
    """Restore checkpoint ``snap`` as the stopped ``vm``, keeping its identity, its volume's
    ownership and its checkpoints; on failure the VM is left stopped, checkpoints kept."""
    aside = aside_dir(vm)
    os.rename(vm.dir / CHECKPOINTS, aside)
    shutil.rmtree(vm.dir)
    new: Vm | None = None
    try:
        ck = checkpoint.Checkpoint.load(aside / snap)
        new = checkpoint.restore(vm.name, Root(**old["root"]), ck, hostname=old.get("hostname") or vm.name,
                                 freshen=False)
        new.info.update({k: old[k] for k in ("owns_volume", "created", "machine_id") if k in old})
        new.info["checkpoint"] = str(checkpoint_dir(vm, snap))
        if new.info.get("ram_file"):  # its RAM is mapped from the checkpoint, which moves back below
            new.info["ram_file"] = str(checkpoint_dir(vm, snap) / Path(new.info["ram_file"]).name)
        new._save()
    finally:
        if new is None:  # stopped, with what it had: a rollback can be tried again, or 'vm rm'
            vm.dir.mkdir(parents=True, exist_ok=True)
            vm.info = old | {"qemu_pid": 0}
            vm._save()
        os.rename(aside, vm.dir / CHECKPOINTS)
    try:
        with new.locked(), Agent(str(new.dir / "agent.sock"), new.name) as agent:
            agent.connect(checkpoint.RESTORE_AGENT_TIMEOUT)  # its own identity again, the host's clock
            agent.freshen(str(new.info["hostname"]), str(new.info["machine_id"]))
    except BaseException:
        new.halt()
        new.info["qemu_pid"] = 0
        new._save()
        raise
    vm.info = new.info
    return new


def fork(vm: Vm, count: int, prefix: str | None = None) -> list[Vm]:
    """``count`` new VMs, PREFIX-0.., that go on from this running VM's present instant, each
    on its own clone of the volume and with its own identity; the VM runs on."""
    vol = vm._require_volume("a fork")
    if not 1 <= count <= MAX_FORKS:
        raise UsageError(f"--count must be from 1 to {MAX_FORKS}, not {count}")
    prefix = check_name(prefix or f"{vm.name}-fork", "VM")
    names = [check_name(f"{prefix}-{i}", "VM") for i in range(count)]
    for n in names:
        if Vm(n).dir.exists():
            raise UsageError(f"VM {n} exists ('cubefs vm rm {n}', or another --prefix)")
    index = vm.volume_index()
    try:
        with index.read() as txn:
            for n in names:
                with contextlib.suppress(NotFoundError):
                    index.volume(txn, n)
                    raise UsageError(f"volume {n} exists (remove it, or give another --prefix)")
        tag = f"fork-{uuid.uuid4().hex[:12]}"  # the parent volume's snapshot, for the fork's moment only
        (vm.dir / CHECKPOINTS).mkdir(mode=0o700, exist_ok=True)
        dest = vm.dir / CHECKPOINTS / f".{tag}"  # a name no 'vm snapshot' can give
        made: list[str] = []

        def at_instant() -> tuple[str | None, str | None]:
            made.append(index.snapshot(vol, tag).name)
            return vol, tag

        children: list[Vm] = []
        try:
            ck = checkpoint.take(vm, dest, at_instant, shared=True)
            index.clone(vol, tag, names)
            for n in names:
                which = "disk" if vm.root.disk else "volume"  # the clone takes the VM's writes
                child = checkpoint.restore(n, Root(**{**vm.info["root"], which: n}), ck)
                children.append(child)
                child.info.update(owns_volume=True, forked_from=vm.name)
                child.info.pop("checkpoint", None)  # removed below
                child._save()
        except BaseException:
            for child in children:
                child.destroy()  # its volume with it
            for n in names[len(children):]:  # made by the clone (if it was), never started
                with contextlib.suppress(CubefsError):
                    vm.root.cubefs_volume("volume", "rm", n)
            raise
        finally:
            shutil.rmtree(dest, ignore_errors=True)
            if made:
                with contextlib.suppress(CubefsError):
                    index.remove_snapshot(vol, tag)
    finally:
        index.close()
    return children
