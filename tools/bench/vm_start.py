#!/usr/bin/env python3
"""Micro-VM start and memory: cold boot vs restore from a template (issue 6).

Same run, same guest kernel and initramfs, TCG:

* **to agent ready**: QEMU started → the guest agent answers, for a cold boot
  and for a clone restored from a template (RAM file mapped privately);
  floor: restore <= 0.25 x cold boot;
* **to a command's output**: ``Vm.start`` with a cubefs image as the root (for a
  clone: restore, fresh randomness and names, hot-plug of the virtio-fs device,
  mount) plus ``python3 -c 'print(42)'``;
* **memory**: N VMs at once, each having run that command, as clones of one
  template vs cold-booted: summed PSS of the QEMU processes (the root daemons,
  the same in both, reported apart); floor: clones <= 0.4 x cold.

    sudo .venv/bin/python tools/bench/vm_start.py [--repeat 5] [--vms 10] [--json-out F]

Needs the guest kernel (tools/make_vm_kernel.py) and the test root filesystem
(tools/make_rootfs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cubefs.node import control
from vmm.agent import Agent
from vmm.machine import Machine, MachineSpec, Ram


def log(msg: str) -> None:
    print(f"[vm_start] {msg}", file=sys.stderr, flush=True)


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def pss_parts(pid: int, ram_kib: int) -> dict[str, int]:
    """A QEMU's PSS (KiB) by what it holds: guest RAM (the mapping of the memfd or the
    template's file), TCG's translated-code buffer (anonymous, executable: none under
    KVM), and the rest (QEMU's own heap, libraries)."""
    out = {"guest_ram": 0, "tcg_code": 0, "rest": 0}
    head: list[str] = []
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                head = line.split()
            elif line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
                if size == ram_kib:
                    out["guest_ram"] += pss
                elif "x" in head[1] and len(head) == 5:
                    out["tcg_code"] += pss
                else:
                    out["rest"] += pss
    return out


def to_agent_ready(work: Path, spec: MachineSpec, template: Path | None) -> float:
    """Seconds from starting QEMU to the agent's answer."""
    shutil.rmtree(work, ignore_errors=True)
    ram = Ram() if template is None else Ram(template / "ram", shared=False)
    m = Machine(work, spec, ram, incoming=template is not None)
    t0 = time.perf_counter()
    m.start()
    try:
        if template is not None:
            m.restore(template / "state")
        with Agent(m.agent_path) as agent:
            agent.connect(300)
        return time.perf_counter() - t0
    finally:
        m.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--memory", type=int, default=512, metavar="MB")
    ap.add_argument("--rootfs", type=Path, default=Path("/var/tmp/cubefs-test/rootfs"))
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/cubefs-bench"))
    ap.add_argument("--memory-only", action="store_true", help="skip the start-time rounds")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vm-start-", dir=args.workdir))
    env = {"CUBEFS_VM_DIR": str(work / "vm"), "CUBEFS_TEMPLATE_DIR": str(work / "templates"),
           "CUBEFS_STORE": f"file://{work / 'store'}", "CUBEFS_CACHE_DIR": str(work / "cache")}
    os.environ.update(env)
    from vmm import vm  # the directories above are read when used

    spec = MachineSpec(vm.default_kernel(), args.memory, 1, "tcg")
    try:
        subprocess.run([sys.executable, "-m", "cubefs", "build", str(args.rootfs), "--tag", "debian:12",
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        tpl = vm.Template.create("bench", spec)
        log(f"template made in {tpl.seconds:.1f} s")
        cold: list[float] = []
        warm: list[float] = []
        for i in range(0 if args.memory_only else args.repeat):
            cold.append(to_agent_ready(work / "m", spec, None))
            warm.append(to_agent_ready(work / "m", spec, tpl.dir))
            log(f"round {i + 1}: cold boot {cold[-1]:.2f} s, restore {warm[-1]:.3f} s to agent ready")
        root = vm.Root(image="debian:12")
        full: dict[str, list[float]] = {"cold": [], "template": []}
        for i in range(0 if args.memory_only else args.repeat):
            for kind, template in (("cold", None), ("template", "bench")):
                t0 = time.perf_counter()
                v = vm.Vm.start(f"b{i}-{kind}", root, spec, template)
                res = v.exec(["python3", "-c", "print(42)"])
                full[kind].append(time.perf_counter() - t0)
                assert res.stdout == b"42\n", res
                v.destroy()
            log(f"round {i + 1}: to python3's output: cold {full['cold'][-1]:.2f} s, "
                f"template {full['template'][-1]:.2f} s")
        memory: dict[str, dict[str, dict[str, int]]] = {"started": {}, "after_python": {}}
        for kind, template in (("cold", None), ("template", "bench")):
            vms = []
            try:
                for i in range(args.vms):
                    vms.append(vm.Vm.start(f"mem-{kind}-{i}", root, spec, template))
                for state in ("started", "after_python"):
                    if state == "after_python":
                        for v in vms:
                            v.exec(["python3", "-c", "import json; print(42)"])
                    time.sleep(2)
                    parts = [pss_parts(int(v.info["qemu_pid"]), args.memory * 1024) for v in vms]
                    m = {f"{k}_pss_kib": sum(p[k] for p in parts) for k in parts[0]}
                    m["qemu_pss_kib"] = sum(pss_kib(int(v.info["qemu_pid"])) for v in vms)
                    m["daemon_pss_kib"] = sum(pss_kib(int(control.read_registry(str(v.fs_socket))["pid"]))
                                              for v in vms)
                    memory[state][kind] = m
                    mib = {k: v // 1024 for k, v in m.items()}
                    log(f"{args.vms} {kind} VMs, {state}: QEMU PSS {mib['qemu_pss_kib']} MiB (guest RAM "
                        f"{mib['guest_ram_pss_kib']}, TCG code {mib['tcg_code_pss_kib']}, rest "
                        f"{mib['rest_pss_kib']}), root daemons {mib['daemon_pss_kib']} MiB")
            finally:
                for v in vms:
                    v.destroy()

        def med(xs: list[float]) -> float:
            return statistics.median(xs) if xs else float("nan")

        result = {
            "agent_ready_cold_s": med(cold), "agent_ready_restore_s": med(warm),
            "agent_ready_ratio": med(warm) / med(cold),
            "to_output_cold_s": med(full["cold"]), "to_output_template_s": med(full["template"]),
            "to_output_ratio": med(full["template"]) / med(full["cold"]),
            "memory": memory, "vms": args.vms,
            "pss_ratio_started": memory["started"]["template"]["qemu_pss_kib"]
            / memory["started"]["cold"]["qemu_pss_kib"],
            "pss_ratio_after_python": memory["after_python"]["template"]["qemu_pss_kib"]
            / memory["after_python"]["cold"]["qemu_pss_kib"],
            "samples": {"cold": cold, "restore": warm, "full": full},
        }
        print(f"micro-VM start, TCG, {args.memory} MiB guests, medians of {args.repeat}")
        print(f"  to agent ready      cold boot {result['agent_ready_cold_s']:6.2f} s   restore "
              f"{result['agent_ready_restore_s']:6.3f} s   ratio {result['agent_ready_ratio']:.3f} (floor <= 0.25)")
        print(f"  to python3's output cold boot {result['to_output_cold_s']:6.2f} s   template "
              f"{result['to_output_template_s']:6.2f} s   ratio {result['to_output_ratio']:.3f}")
        for state, title in (("started", "just started (root mounted)"), ("after_python", "after python3 ran")):
            print(f"  {args.vms} VMs, {title}:")
            for key, label in (("qemu", "QEMU PSS, all"), ("guest_ram", "  guest RAM"), ("tcg_code", "  TCG code"),
                               ("rest", "  the rest"), ("daemon", "root daemons")):
                c, t = (memory[state][k][f"{key}_pss_kib"] for k in ("cold", "template"))
                print(f"    {label:16} cold {c / 1024:7.0f} MiB   clones {t / 1024:7.0f} MiB   ratio {t / c:.3f}"
                      + ("   (floor <= 0.4)" if key == "qemu" else ""))
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1))
        return 0
    finally:
        for v in vm.Vm.list():
            v.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
