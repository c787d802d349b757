#!/usr/bin/env python3
"""What a smaller TCG translation cache costs a busy guest (issue 14: the density floor).

TCG keeps the guest code it has translated in one buffer per QEMU (``-accel
tcg,tb-size=T``, MiB; ``$CUBEFS_TCG_TB_SIZE``, vmm/machine.py).  An idle sandbox
fills ~21 MiB of it, which is most of QEMU's own memory per sandbox; a smaller
buffer saves that, but when it is full TCG flushes it whole and translates
everything again.  This bench times what a busy guest pays for that.

One 256 MiB (``--memory``), 1 vCPU VM per ``--sizes`` value, each restored from a template made
at that size (a template's fingerprint includes QEMU's command line, so a
template saved at one tb-size is refused at another), root the test rootfs as a
cubefs image.  All of them run at once, idle between their turns; in each of
``--rounds`` rounds (the order of sizes rotates each round, so a slow minute of
the shared machine does not land on one size) each VM runs, timed inside the
guest (``date +%s%N``):

* ``py_imports``: ``python3 -c 'import json, email, http.client, asyncio,
  decimal, …'`` ten times: new processes, a lot of distinct code (what agents do);
* ``compileall``: ``python3 -m compileall -f`` of stdlib's email, asyncio, json,
  http and xml packages into a tmpfs (PYTHONPYCACHEPREFIX): a compiler's work;
* ``sha256``: ``sha256sum`` of a 16 MiB file in the guest's tmpfs, 6 times: one
  hot loop, the case a small cache should not hurt.

Round 0 is a warm-up and not counted.  Prints the medians per size and workload,
their ratio to the largest size, and each QEMU's PSS by part after the last round
(guest RAM, TCG's code buffer, the rest).

    .venv/bin/python tools/bench/tcg_tb_size.py --sizes 64,32,16,8 --rounds 5 --json-out tb.json

Needs root, the guest kernel and the test rootfs.  Everything it starts is
stopped at the end (its own mount server too).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from blk_disk import stop_mount_server
from vm_start import pss_kib, pss_parts

from vmm.machine import TB_SIZE_ENV, MachineSpec

IMPORTS = "import json, email, email.parser, http.client, asyncio, decimal, argparse, logging, urllib.request, csv"
WORKLOADS: dict[str, str] = {
    "py_imports": f"for i in 1 2 3 4 5 6 7 8 9 10; do python3 -c '{IMPORTS}' || exit 1; done",
    "compileall": "rm -rf /dev/shm/pyc; PYTHONPYCACHEPREFIX=/dev/shm/pyc python3 -m compileall -q -f "
                  + " ".join(f"/usr/lib/python3.11/{p}" for p in ("email", "asyncio", "json", "http", "xml"))
                  + " >/dev/null || exit 1",
    "sha256": "for i in 1 2 3 4 5 6; do sha256sum /dev/shm/big >/dev/null || exit 1; done",
}


# the guest has no /dev/shm of its own: a tmpfs for the big file and compileall's output
SETUP = ("mkdir -p /dev/shm && (mountpoint -q /dev/shm || mount -t tmpfs -o size=64m tmpfs /dev/shm)"
         " && dd if=/dev/urandom of=/dev/shm/big bs=1M count=16 2>/dev/null")


def log(msg: str) -> None:
    print(f"[tcg_tb_size {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed_script(body: str) -> str:
    """A shell script that runs ``body`` and prints its seconds, measured in the guest."""
    return f"s=$(date +%s%N)\n{body}\ne=$(date +%s%N)\necho $(( (e - s) / 1000000 ))\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,32,16,8", help="tb-size values, MiB; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=5, help="counted rounds (after one warm-up round)")
    ap.add_argument("--memory", type=int, default=256, help="guest MiB (at 128 the imports were OOM-killed)")
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/cubefs-bench"))
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tb-size-", dir=args.workdir))
    os.environ.update({"CUBEFS_VM_DIR": str(work / "vm"), "CUBEFS_TEMPLATE_DIR": str(work / "templates"),
                       "CUBEFS_STORE": f"file://{work / 'store'}", "CUBEFS_CACHE_DIR": str(work / "cache"),
                       "CUBEFS_SERVER": str(work / "serve.sock")})  # a mount server of our own
    from vmm import vm  # the directories above are read when used

    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "sizes": sizes, "rounds": args.rounds,
                           "guest_mib": args.memory, "loadavg_start": os.getloadavg()[0]}
    times: dict[int, dict[str, list[float]]] = {t: {w: [] for w in WORKLOADS} for t in sizes}
    vms: dict[int, Any] = {}
    try:
        subprocess.run([sys.executable, "-m", "cubefs", "build", args.rootfs, "--tag", "bench:1", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        spec = MachineSpec(vm.default_kernel(), args.memory, 1, "tcg")
        for t in sizes:
            os.environ[TB_SIZE_ENV] = str(t)  # read by Machine.argv() in the template's boot and the restore
            vm.Template.create(f"tb{t}", spec)
            vms[t] = vm.Vm.start(f"tb{t}", vm.Root(image="bench:1"), spec, f"tb{t}")
            res = vms[t].exec(SETUP)
            assert res.exit_code == 0, res
            log(f"tb-size {t}: VM up (QEMU {vms[t].info['qemu_pid']})")
        for r in range(args.rounds + 1):
            order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
            for t in order:
                for w, body in WORKLOADS.items():
                    res = vms[t].exec(timed_script(body), timeout=600)
                    if res.exit_code != 0:
                        raise SystemExit(f"tb-size {t} {w}: exit {res.exit_code}: {res.stderr[-500:]!r}")
                    secs = int(res.stdout.split()[-1]) / 1000
                    if r:
                        times[t][w].append(secs)
                    log(f"round {r}{' (warm-up)' if not r else ''} tb-size {t} {w}: {secs:.2f} s "
                        f"(load {os.getloadavg()[0]:.1f})")
        base = sizes[0]
        result: dict[str, Any] = {}
        for t in sizes:
            pid = int(vms[t].info["qemu_pid"])
            parts = pss_parts(pid, args.memory * 1024)
            row: dict[str, Any] = {"qemu_pss_mib": round(pss_kib(pid) / 1024, 1),
                                   "qemu_own_mib": round((pss_kib(pid) - parts["guest_ram"]) / 1024, 1),
                                   "tcg_code_mib": round(parts["tcg_code"] / 1024, 1),
                                   "rest_mib": round(parts["rest"] / 1024, 1),
                                   "guest_ram_mib": round(parts["guest_ram"] / 1024, 1)}
            for w in WORKLOADS:
                xs = times[t][w]
                row[w] = {"median_s": round(statistics.median(xs), 3), "min_s": min(xs), "max_s": max(xs),
                          "vs_base": round(statistics.median(xs) / statistics.median(times[base][w]), 3)}
            result[str(t)] = row
        out["by_size"] = result
        out["loadavg_end"] = os.getloadavg()[0]
        print(f"busy guest by tb-size (medians of {args.rounds} rounds, seconds; ratio to tb-size {base})")
        print(f"{'tb-size':>8} " + " ".join(f"{w:>22}" for w in WORKLOADS) + "   QEMU own (TCG code) MiB")
        for t in sizes:
            row = result[str(t)]
            cells = " ".join(f"{row[w]['median_s']:>10.2f} ({row[w]['vs_base']:.2f}x)".rjust(22) for w in WORKLOADS)
            print(f"{t:>8} {cells}   {row['qemu_own_mib']:.1f} ({row['tcg_code_mib']:.1f})")
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=1) + "\n")
        return 0
    finally:
        for v in vm.Vm.list():
            v.destroy()
        stop_mount_server(work / "serve.sock")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
