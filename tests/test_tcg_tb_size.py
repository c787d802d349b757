"""TCG's translation-cache size (``$CUBEFS_TCG_TB_SIZE``, vmm/machine.py): its default and
checks, and that changing it leaves saved VM states loadable — a template saved at one size
restores at another (one boot, one restore), and fingerprints do not depend on it, so the
templates and checkpoints saved before the default changed still load."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from cubefs.errors import UsageError
from vmm import vm
from vmm.agent import Agent
from vmm.machine import TB_SIZE_ENV, Machine, MachineSpec, Ram, tcg_tb_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def test_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TB_SIZE_ENV, raising=False)
    assert tcg_tb_size() == 64
    monkeypatch.setenv(TB_SIZE_ENV, "16")
    assert tcg_tb_size() == 16
    for bad in ("0", "2048", "8M", ""):
        monkeypatch.setenv(TB_SIZE_ENV, bad)
        with pytest.raises(UsageError, match=TB_SIZE_ENV):
            tcg_tb_size()


@pytest.fixture(scope="module")
def kernel() -> Path:
    return make_kernel(Path(DEFAULT))


def _argv(kernel: Path) -> list[str]:
    return Machine(Path("/vm"), MachineSpec(kernel, 128, 1, "tcg"), Ram(Path("/vm/ram"))).argv()


@needs_qemu
def test_fingerprint_ignores_tb_size(kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MachineSpec(kernel, 128, 1, "tcg")
    prints = {}
    for size in ("8", "16", "64"):
        monkeypatch.setenv(TB_SIZE_ENV, size)
        assert f"tcg,tb-size={size}" in _argv(kernel)  # QEMU does get the size asked for
        prints[size] = vm.machine_fingerprint(spec)
    assert len(set(prints.values())) == 1, prints
    # ...and it is the fingerprint the code before state_argv() gave (tb-size=64 always)
    monkeypatch.setenv(TB_SIZE_ENV, "64")
    argv = _argv(kernel)
    parts = [vm.qemu_version(argv[0])] + [a.replace(str(kernel), "KERNEL") for a in argv[1:]]
    parts += [hashlib.sha256((kernel / n).read_bytes()).hexdigest() for n in ("vmlinuz", "initrd.gz")]
    assert prints["8"] == hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    # a real option change still makes a template stale
    assert vm.machine_fingerprint(MachineSpec(kernel, 256, 1, "tcg")) != prints["8"]


@needs_qemu
def test_template_saved_at_64_restores_at_8(kernel: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBEFS_TEMPLATE_DIR", str(tmp_path / "templates"))
    monkeypatch.setenv(TB_SIZE_ENV, "64")
    tpl = vm.Template.create("tb", MachineSpec(kernel, 128, 1, "tcg"))
    monkeypatch.setenv(TB_SIZE_ENV, "8")
    loaded = vm.Template.load("tb")  # not stale
    m = Machine(tmp_path / "clone", loaded.spec, Ram(tpl.dir / "ram", shared=False), incoming=True)
    m.start()
    try:
        m.restore(tpl.dir / "state")  # (cmdline read after: it may be empty until QEMU has exec'd)
        assert "tcg,tb-size=8" in open(f"/proc/{m.pid}/cmdline").read().split("\0")
        with Agent(m.agent_path, "clone") as agent:
            agent.connect(vm.RESTORE_AGENT_TIMEOUT)
        assert m.qmp.execute("query-status")["status"] == "running"
    finally:
        m.stop()
