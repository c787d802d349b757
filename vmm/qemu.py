"""One command in a throwaway VM whose root is any vhost-user-fs backend.

For tests and benchmarks that compare backends on the same guest: QEMU's C
virtiofsd as the reference, or a cubefs daemon.  ``cubefs vm run`` (vmm/vm.py)
is the user-facing path, which also starts the cubefs backend itself.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmm.agent import Agent, CommandResult
from vmm.machine import Machine, MachineSpec, Ram


@dataclass
class RunResult(CommandResult):
    console: str = ""


def run_once(kernel_dir: Path, fs_socket: str, command: str, *, memory_mb: int = 512, accel: str = "tcg",
             read_only: bool = False, timeout: float = 180.0) -> RunResult:
    """Boot, mount the root from ``fs_socket``, run ``command`` (a shell command line), power off."""
    work = Path(tempfile.mkdtemp(prefix="cubefs-vm-"))
    machine = Machine(work, MachineSpec(kernel_dir, memory_mb, 1, accel), Ram(), fs_socket=fs_socket)
    try:
        machine.start()
        with Agent(machine.agent_path, "run-once") as agent:
            agent.connect(timeout)
            agent.mount(read_only)
            res = agent.run(command, timeout=timeout)
            agent.poweroff()
        console = machine.console_path.read_text(errors="replace")
        return RunResult(res.exit_code, res.stdout, res.stderr, res.seconds, console)
    finally:
        machine.stop()
        shutil.rmtree(work, ignore_errors=True)
