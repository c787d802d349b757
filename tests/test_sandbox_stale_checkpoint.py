"""A snapshot whose checkpoint this host cannot load is refused before anything changes.

After an upgrade of QEMU, its machine options (c7a237b changed q35's) or the guest kernel, an
older snapshot's saved state no longer loads.  A rollback to it used to stop the sandbox's VM,
clone a volume and only then fail the load, taking the sandbox with it; a create from it used to
half-make a sandbox first.  What a user checks: the call answers 409 naming the snapshot and
why, and the sandbox runs on exactly as it was.  No VM is needed: the refusal happens before
any VM is touched (the service's QEMU calls are replaced by ones that fail the test if reached).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import service as service_mod
from sandbox.pool import Capacity
from sandbox.service import ConflictError, Sandbox, SandboxRecord, SandboxService
from sandbox.snapshots import SnapshotRecord, new_snapshot_id
from vmm import checkpoint
from vmm import vm as vmm
from vmm.machine import MachineSpec

KERNEL = vmm.default_kernel()
pytestmark = pytest.mark.skipif(not (KERNEL / "vmlinuz").exists(), reason="no guest kernel")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SandboxService, Sandbox, list[str]]]:
    """A service holding one running sandbox (no VM behind it) and a list of what touched it."""
    monkeypatch.setenv("CUBEFS_SANDBOX_DIR", str(tmp_path / "sandbox"))
    monkeypatch.delenv("CUBEFS_SNAPSHOT_DIR", raising=False)
    for var, sub in (("CUBEFS_VM_DIR", "vm"), ("CUBEFS_VOLUME_DIR", "volumes"), ("CUBEFS_TEMPLATE_DIR", "templates"),
                     ("CUBEFS_CACHE_DIR", "cache")):  # what a refusal that came too late would touch: never the node's
        monkeypatch.setenv(var, str(tmp_path / sub))
    touched: list[str] = []

    def qmp(sbx: Any, *args: Any, **kw: Any) -> None:
        touched.append("qmp")

    async def disconnect(self: SandboxService, sbx: Sandbox) -> None:
        touched.append("disconnect")

    monkeypatch.setattr(service_mod, "qmp", qmp)
    monkeypatch.setattr(SandboxService, "_disconnect", disconnect)
    svc = SandboxService(capacity=Capacity(64, 1 << 20))
    now = time.time()
    record = SandboxRecord("s1", "base", "sbx-s1", "sbx-s1-0", "token", now, now + 300, 1, 256, state="running")
    record.save()
    sbx = Sandbox(record)
    sbx.vm = vmm.Vm(record.vm)
    sbx.vm.info = {"kernel_dir": str(KERNEL), "memory_mb": 256, "cpus": 1, "accel": "auto"}
    svc.sandboxes[sbx.id] = sbx
    svc.capacity.reserve(sbx.id, 1, 256)
    yield svc, sbx, touched


def snapshot(machine: str) -> SnapshotRecord:
    """A snapshot of sandbox s1 whose checkpoint says it was saved by machine ``machine``."""
    snap = SnapshotRecord(new_snapshot_id(), "s1", "base", "sbxsnap-x", 1, 256, time.time())
    (snap.dir / "ckpt").mkdir(parents=True)
    snap.save()
    checkpoint.Checkpoint(str(snap.dir / "ckpt"), 256, 1, "auto", str(KERNEL), machine, None, snap.volume,
                          "ready").save()
    return snap


@pytest.mark.parametrize("machine", ["0123456789abcdef", checkpoint.UNKNOWN_MACHINE])
def test_a_rollback_to_a_checkpoint_of_another_machine_is_refused_and_the_sandbox_runs_on(
        node: tuple[SandboxService, Sandbox, list[str]], machine: str) -> None:
    svc, sbx, touched = node
    snap = snapshot(machine)
    before = SandboxRecord.path(sbx.id).read_text()
    vm = sbx.vm
    with pytest.raises(ConflictError) as err:
        asyncio.run(svc.rollback(sbx.id, snap.snapshot_id))
    assert snap.snapshot_id in str(err.value)
    assert "saved by another QEMU, machine type or guest kernel" in str(err.value)
    assert svc.sandboxes.get(sbx.id) is sbx and sbx.vm is vm and not sbx.busy.locked()
    assert touched == []  # never paused nor disconnected
    assert SandboxRecord.path(sbx.id).read_text() == before
    assert json.loads(before)["state"] == "running"


def test_a_create_from_such_a_snapshot_is_refused_and_makes_nothing(
        node: tuple[SandboxService, Sandbox, list[str]]) -> None:
    svc, sbx, touched = node
    snap = snapshot("0123456789abcdef")
    with pytest.raises(ConflictError, match=snap.snapshot_id):
        asyncio.run(svc.create(snap.snapshot_id))
    assert list(svc.sandboxes) == [sbx.id] and list(svc.capacity.held) == [sbx.id]
    assert [p.name for p in SandboxRecord.path(sbx.id).parent.iterdir()] == [f"{sbx.id}.json"]
    assert touched == []


def test_a_sandbox_started_before_an_upgrade_is_not_forked(node: tuple[SandboxService, Sandbox, list[str]]) -> None:
    """Its QEMU runs the old machine: its checkpoints carry what its info recorded (here
    nothing: "unknown"), not today's fingerprint, so they are never taken for loadable."""
    svc, sbx, touched = node
    assert sbx.vm is not None
    assert checkpoint.vm_machine(sbx.vm) == checkpoint.UNKNOWN_MACHINE
    with pytest.raises(ConflictError, match="cannot be forked"):
        asyncio.run(svc.fork(sbx.id, 1, None))
    assert list(svc.sandboxes) == [sbx.id] and touched == []
    assert not any((SandboxRecord.path(sbx.id).parent.parent / "snapshots").glob("snap-*"))
    # a VM that recorded this host's machine passes the same check
    sbx.vm.info["machine"] = vmm.machine_fingerprint(MachineSpec(KERNEL, 256, 1, "auto"))
    checkpoint.check_vm(sbx.vm)
