"""QEMU's own memory per VM (vmm/machine.py, docs/benchmarks.md "Density"): a VM restored
from a template runs, and its QEMU holds no copy of the kernel image, has no transparent huge
pages and one malloc arena; one boot (the template), one restore."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from vmm import vm
from vmm.agent import Agent
from vmm.machine import MACHINE, Machine, MachineSpec, Ram

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def anonymous_private_dirty_kib(pid: int) -> list[tuple[str, int]]:
    """(permissions, Private_Dirty KiB) of each anonymous mapping of ``pid``."""
    out: list[tuple[str, int]] = []
    perms = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                perms = head[1] if len(head) == 5 else None  # no path: anonymous
            elif head[0] == "Private_Dirty:" and perms is not None:
                out.append((perms, int(head[1])))
    return out


def test_restored_vm_runs_without_kernel_copy_or_huge_pages(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = make_kernel(Path(DEFAULT))
    monkeypatch.setenv("CUBEFS_TEMPLATE_DIR", str(tmp_path / "templates"))
    tpl = vm.Template.create("mem", MachineSpec(kernel, 128, 1, "tcg"))
    m = Machine(tmp_path / "clone", tpl.spec, Ram(tpl.dir / "ram", shared=False), incoming=True)
    m.start()
    try:
        m.restore(tpl.dir / "state")
        with Agent(m.agent_path, "clone") as agent:  # the guest the template booted runs on
            agent.connect(vm.RESTORE_AGENT_TIMEOUT)
        assert m.qmp.execute("query-status")["status"] == "running"

        argv = open(f"/proc/{m.pid}/cmdline").read().split("\0")
        assert "-kernel" not in argv and "-initrd" not in argv
        assert argv[argv.index("-machine") + 1] == MACHINE
        status = open(f"/proc/{m.pid}/status").read()
        assert "THP_enabled:\t0" in status
        assert "MALLOC_ARENA_MAX=1" in open(f"/proc/{m.pid}/environ").read().split("\0")
        # the kernel image (8 MiB) was QEMU's biggest buffer besides guest RAM and TCG's code
        # (the one executable mapping): no anonymous mapping that large is left
        image_kib = (kernel / "vmlinuz").stat().st_size // 1024
        big = [(p, kib) for p, kib in anonymous_private_dirty_kib(m.pid) if "x" not in p and kib >= image_kib // 2]
        assert big == [], big
    finally:
        m.stop()
