#!/usr/bin/env python3
"""How many idle sandboxes a node holds, and what each costs (issue 14, "How fast": density).

``--counts`` (default 50,100) idle sandboxes of the ``base`` template (128 MiB guests, made
by ``cubefs sandbox template create base --memory 128``) are created through the stock
E2B SDK and left running (nothing runs in them but the guest agent).  At each count:

* **host memory per sandbox, by part** (PSS, so pages shared between processes are split
  among them, not counted once per process): the guest's RAM (QEMU's mapping of the VM
  template's RAM file: private copy-on-write, so only pages the guest wrote are its own),
  QEMU's own (the rest of its PSS: TCG's translation cache, device emulation, heap), the
  root's cubefs daemon (one per sandbox, forked by the node's mount server; since the root
  hosts, the host's PSS split among the sandboxes it serves), and the agent
  channel in the service (its PSS growth since no sandbox ran, divided by the count); also
  ``MemAvailable``'s fall per sandbox, a check that includes the kernel's own share; and of
  QEMU's own, TCG's translation cache (``$CUBEFS_TCG_TB_SIZE``, recorded in the output), and
  all of QEMU's PSS by kind of mapping (``qemu_by_mapping_mib``: heap, malloc arenas, stacks,
  other anonymous memory, the binary's and libraries' private and shared pages), which is
  where QEMU's own was read and cut (vmm/machine.py, docs/benchmarks.md "Density");
  and the same totals apart for the two kinds of idle sandbox (``by_origin``): ``cold``, made
  for its create, and ``pool``, taken from the warm pool, which ran the pool's warm-up
  (sandbox/service.py ``_warm``: what a first command costs, paid ahead) — with
  ``--concurrency`` creates at once against a pool of ``--pool-size`` refilled one at a time,
  about a quarter of the held ones come from the pool;
* **CPU they burn idle**: user+system seconds of every QEMU, root daemon, the service and
  its mount server over ``--idle-seconds``, in % of one core per sandbox;
* **create latency while they idle**: ``Sandbox.create()`` + ``commands.run("true")``
  p50/p95/p99 over ``--samples`` (or as many as ``--sample-budget`` seconds allow), from
  the warm pool (``--pool-size``, refilled before each sample, as sandbox_create.py's
  ``pool_c1``), against the same with none idle, measured first in the same run.

The service's default capacity is 16 vCPUs per host CPU (32 here: the 33rd 1-vCPU sandbox
would get 429); the bench raises ``--max-vcpus`` to fit the counts and says so in its output.

    .venv/bin/python tools/bench/sandbox_density.py --counts 50,100 --json-out density.json

Needs root, the guest kernel and the test rootfs.  Everything it starts is stopped at the
end, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandbox_create import Service, cubefs, sample
from sandbox_snapshot import log, node_env, on_sigterm, summary, teardown

from cubefs.node import control
from vmm.machine import tcg_tb_size

TICK = os.sysconf("SC_CLK_TCK")
MIB = 2**20


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def mapping_pss_kib(pid: int, path: str) -> int:
    """PSS of ``pid``'s mappings of the file ``path``."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].rstrip("\n").removesuffix(" (deleted)") == path
            elif inside and head[0] == "Pss:":
                total += int(head[1])
    return total


def tcg_code_pss_kib(pid: int) -> int:
    """PSS of QEMU's TCG translation cache: its one anonymous executable mapping (``tb-size``
    MiB; none under KVM)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) == 5 and "x" in head[1]
            elif inside and head[0] == "Pss:":
                total += int(head[1])
    return total


ARENA_ALIGN = 64 * MIB  # glibc's thread arenas are 64 MiB-aligned reservations (HEAP_MAX_SIZE)


def qemu_by_mapping_kib(pid: int, ram: str) -> dict[str, int]:
    """PSS of ``pid`` (a QEMU) by kind of mapping, from /proc/PID/smaps: what is left of
    QEMU's own memory once guest RAM and TCG's code are named, and so where to cut.

    ``guest_ram`` the template's RAM file; ``tcg_code`` the one anonymous executable mapping;
    ``heap`` glibc's main arena ([heap]); ``thread_arenas`` glibc's per-thread arenas (anonymous
    ``rw-p`` at a 64 MiB-aligned address); ``stacks`` [stack] and the 8 MiB thread stacks;
    ``other_anon`` every other anonymous mapping (malloc's mmap'd blocks — TCG's TB hash table,
    its TLBs, a ``-kernel`` image's copy — and QEMU's RAM blocks: firmware, option ROMs, ACPI
    tables); ``qemu_binary_private`` / ``libs_private`` the pages relocation made private (PIE
    data, RELRO), ``qemu_binary_shared`` / ``libs_shared`` the rest of them (code, read-only
    data: shared by every QEMU, so small per sandbox at 100); ``other_files`` any other file."""
    parts: dict[str, int] = dict.fromkeys(
        ("guest_ram", "tcg_code", "heap", "thread_arenas", "stacks", "other_anon", "qemu_binary_private",
         "qemu_binary_shared", "libs_private", "libs_shared", "other_files"), 0)
    kind, private_kind = "other_anon", ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                perms, name = head[1], head[5].rstrip("\n").removesuffix(" (deleted)") if len(head) == 6 else ""
                private_kind = ""
                if name == ram:
                    kind = "guest_ram"
                elif name == "[heap]":
                    kind = "heap"
                elif name == "[stack]":
                    kind = "stacks"
                elif name.startswith("["):  # [vdso], [vvar], [vsyscall]
                    kind = "other_files"
                elif name.endswith("/qemu-system-x86_64"):
                    kind, private_kind = "qemu_binary_shared", "qemu_binary_private"
                elif ".so" in name:
                    kind, private_kind = "libs_shared", "libs_private"
                elif name:
                    kind = "other_files"
                elif "x" in perms:
                    kind = "tcg_code"
                elif perms.startswith("rw") and start % ARENA_ALIGN == 0:
                    kind = "thread_arenas"
                elif perms.startswith("rw") and end - start == 8 * MIB:
                    kind = "stacks"
                else:
                    kind = "other_anon"
            elif head[0] == "Pss:":
                parts[kind] += int(head[1])
            elif head[0] == "Private_Dirty:" and private_kind:  # PSS of a private page is the page
                parts[private_kind] += int(head[1])
                parts[kind] -= int(head[1])
    return parts


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


class Node:
    def __init__(self, tmp: Path, svc: Service) -> None:
        self.tmp, self.svc = tmp, svc

    def parts(self, sandbox_id: str) -> tuple[int, int, str]:
        """The sandbox's QEMU pid, its root daemon's pid, and its guest RAM file."""
        vm = json.loads((self.tmp / "sandbox" / "sandboxes" / f"{sandbox_id}.json").read_text())["vm"]
        info = json.loads((self.tmp / "vm" / vm / "vm.json").read_text())
        daemon = int(control.read_registry(str(self.tmp / "vm" / vm / "fs.sock"))["pid"])
        return int(info["qemu_pid"]), daemon, str(self.tmp / "templates" / info["template"] / "ram")

    def origins(self, ids: list[str]) -> dict[str, str]:
        """Per sandbox, ``pool`` (taken from the warm pool: it ran the pool's warm-up) or ``cold``
        (made for its create), from the service's log line for its create."""
        text = "".join(p.read_text(errors="replace") for p in self.tmp.glob("serve-pool*.log"))
        found = dict(re.findall(r"sandbox (\S+) created from template \S+ in [\d.]+ s \((from the pool|made now)",
                                text))
        return {sid: "pool" if found.get(sid) == "from the pool" else "cold" for sid in ids}

    def mount_server(self) -> int:
        return int((self.tmp / "serve.sock.lock").read_text())

    def memory(self, ids: list[str], service_pss0: int, avail0: int) -> dict[str, Any]:
        guest, qemu, daemon, tcg = [], [], [], []
        by_mapping: dict[str, list[float]] = {}
        hosts: dict[int, int] = {}  # a root host serves many sandboxes: its PSS is shared among them
        for sid in ids:
            _q, dpid, _r = self.parts(sid)
            hosts[dpid] = hosts.get(dpid, 0) + 1
        for sid in ids:
            qpid, dpid, ram = self.parts(sid)
            g = mapping_pss_kib(qpid, ram)
            guest.append(g / 1024)
            qemu.append((pss_kib(qpid) - g) / 1024)
            tcg.append(tcg_code_pss_kib(qpid) / 1024)
            for k, v in qemu_by_mapping_kib(qpid, ram).items():
                by_mapping.setdefault(k, []).append(v / 1024)
            daemon.append(pss_kib(dpid) / 1024 / hosts[dpid])
        agent = (pss_kib(self.svc.proc.pid) - service_pss0) / 1024 / len(ids)
        parts = {"guest_ram_mib": summary(guest), "qemu_mib": summary(qemu), "of_which_tcg_code_mib": summary(tcg),
                 "root_daemon_mib": summary(daemon),
                 "service_per_sandbox_mib": round(agent, 2)}
        # p50 and mean of each kind of QEMU mapping (qemu_by_mapping_kib), guest RAM among them
        parts["qemu_by_mapping_mib"] = {k: {"p50": round(statistics.median(v), 2),
                                            "mean": round(statistics.fmean(v), 2)} for k, v in by_mapping.items()}
        # the two kinds of idle sandbox, apart: a pooled one ran the pool's warm-up (service.py _warm)
        totals = [g + q + d for g, q, d in zip(guest, qemu, daemon)]
        kinds: dict[str, list[int]] = {}
        for i, origin in enumerate(self.origins(ids).values()):
            kinds.setdefault(origin, []).append(i)
        parts["by_origin"] = {k: {"n": len(ix), "total_p50_mib": round(statistics.median(totals[i] for i in ix), 1),
                                  "total_mean_mib": round(statistics.fmean(totals[i] for i in ix), 1),
                                  "guest_ram_p50_mib": round(statistics.median(guest[i] for i in ix), 2),
                                  "tcg_code_p50_mib": round(statistics.median(tcg[i] for i in ix), 2)}
                              for k, ix in sorted(kinds.items())}
        parts["total_mean_mib"] = round(statistics.fmean(guest) + statistics.fmean(qemu) + statistics.fmean(daemon)
                                        + agent, 1)
        parts["mem_available_fall_per_sandbox_mib"] = round((avail0 - mem_available_kib()) / 1024 / len(ids), 1)
        parts["mount_server_mib"] = round(pss_kib(self.mount_server()) / 1024, 1)
        return parts

    def idle_cpu(self, ids: list[str], seconds: float) -> dict[str, Any]:
        pids = {"qemu": [], "root_daemon": []}  # type: dict[str, list[int]]
        for sid in ids:
            qpid, dpid, _ = self.parts(sid)
            pids["qemu"].append(qpid)
            if dpid not in pids["root_daemon"]:  # once per root host
                pids["root_daemon"].append(dpid)
        pids["service"] = [self.svc.proc.pid]
        pids["mount_server"] = [self.mount_server()]
        before = {k: sum(cpu_ticks(p) for p in v) for k, v in pids.items()}
        host0 = host_busy()
        time.sleep(seconds)
        after = {k: sum(cpu_ticks(p) for p in v) for k, v in pids.items()}
        host1 = host_busy()
        cores = {k: (after[k] - before[k]) / TICK / seconds for k in pids}
        total = sum(cores.values())
        return {"seconds": seconds, "cores_by_part": {k: round(v, 3) for k, v in cores.items()},
                "cores_total": round(total, 3), "pct_of_a_core_per_sandbox": round(100 * total / len(ids), 2),
                "host_busy_cores": round((host1[0] - host0[0]) / (host1[1] - host0[1]) * (os.cpu_count() or 1), 2)}


def host_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # busy, all (idle and iowait are not busy)


def samples(n: int, before: Any, budget: float) -> list[float]:
    """``n`` timed creates one at a time (``before`` each: the pool refilled), each logged, or
    as many as ``budget`` seconds allow: at 100 idle on 2 cores a refill took 20-97 s."""
    out: list[float] = []
    t0 = time.monotonic()
    while len(out) < n and (not out or time.monotonic() - t0 < budget):
        before()
        out.append(sample())
        log(f"create {len(out)}: {out[-1]:.3f} s")
    return out


def grow(to: int, have: list[Any], concurrency: int) -> str | None:
    """Create idle sandboxes until ``have`` holds ``to``; why it stopped short, if it did."""
    from e2b import Sandbox

    def one(_: int) -> Any:
        try:
            return Sandbox.create("base", timeout=3600)
        except Exception as err:  # the 429 when the node is full
            return err

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        while len(have) < to:
            results = list(pool.map(one, range(min(concurrency, to - len(have)))))
            have += [r for r in results if not isinstance(r, Exception)]
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                return f"refused at {len(have)}: {errors[0]}"
            if len(have) % 10 == 0:
                log(f"{len(have)} idle sandboxes ({time.monotonic() - t0:.0f} s)")
    return None


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="50,100")
    ap.add_argument("--memory", type=int, default=128, help="guest MiB of the base template")
    ap.add_argument("--samples", type=int, default=30, help="creates timed at each count")
    ap.add_argument("--sample-budget", type=float, default=600.0, help="seconds for the samples of one count")
    ap.add_argument("--pool-size", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2, help="creates at once while filling the node")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds idle before measuring")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    signal.signal(signal.SIGTERM, on_sigterm)

    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-density-"))
    env = node_env(tmp)
    max_vcpus = max(counts) + args.pool_size + 8
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                           "host_mem_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB,
                           "loadavg_start": os.getloadavg()[0], "guest_mib": args.memory,
                           "tcg_tb_size_mib": tcg_tb_size(), "default_vcpu_limit": (os.cpu_count() or 1) * 16,
                           "max_vcpus_used": max_vcpus}
    svc: Service | None = None
    held: list[Any] = []
    try:
        cubefs(env, "build", args.rootfs, "--tag", "bench:1")
        cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1", "--memory", str(args.memory))
        svc = Service(env, tmp, args.pool_size, ("--max-vcpus", str(max_vcpus)))
        node = Node(tmp, svc)

        def refill() -> None:
            assert svc is not None
            if args.pool_size:
                svc.wait_pool(args.pool_size)

        refill()
        out["create_idle0"] = summary(samples(args.samples, refill, args.sample_budget))
        log(f"creates with none idle: {out['create_idle0']}")
        refill()
        time.sleep(args.settle)
        service_pss0, avail0 = pss_kib(svc.proc.pid), mem_available_kib()
        for count in counts:
            stopped = grow(count, held, args.concurrency)
            key = f"idle{len(held)}"
            out[key] = {"held": len(held)}
            if stopped:
                out[key]["stopped"] = stopped
                log(stopped)
            refill()
            time.sleep(args.settle)
            ids = [s.sandbox_id for s in held]
            out[key]["memory"] = node.memory(ids, service_pss0, avail0)
            out[key]["idle_cpu"] = node.idle_cpu(ids, args.idle_seconds)
            log(f"{len(held)} idle: {json.dumps(out[key])}")
            out[key]["create"] = summary(samples(args.samples, refill, args.sample_budget))
            out[key]["create_p99_vs_idle0"] = round(out[key]["create"]["p99"] / out["create_idle0"]["p99"], 3)
            log(f"{len(held)} idle: creates {out[key]['create']}")
            if stopped:
                break
    finally:
        teardown(env, tmp, svc, args.keep)
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
