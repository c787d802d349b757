#!/usr/bin/env python3
"""Memory+disk snapshots of running sandboxes, driven by the stock E2B SDK (issue 14, "How fast").

For each guest size and amount of memory dirtied since the template (``--configs``,
default ``256:10,1024:10,1024:500``: MiB of guest RAM : MiB a guest process allocates,
fills with ``os.urandom`` and keeps alive), one sandbox, and ``--runs`` times each:

* ``snapshot``: ``sbx.create_snapshot()`` wall time, and from the snapshot's record the
  guest's pause (``paused_seconds``), the service's own time (``seconds``) and the RAM kept
  (``ram_bytes``: the pages that differ from the VM template);
* ``full_save`` (baseline): QEMU's own save of the same guest, what a plain ``savevm``-style
  snapshot costs: QMP ``stop``, ``migrate`` to a file without mapped-ram, ``cont`` (the guest
  is paused all along);
* ``from_snapshot``: ``Sandbox.create(snapshot_id)`` + ``commands.run("true")``;
* ``rollback``: ``POST /sandboxes/{id}/rollback`` (our extension) wall time, then with the
  first ``commands.run("true")`` after it, and the restore's phases from the VM's record;
* ``cold`` (baseline of the two above): ``Sandbox.create(template)`` + ``commands.run("true")``
  with no pool (the service runs with ``--pool-size 0``), same guest size.

Then ``--fork-runs`` times ``sbx.fork(count=--fork-count)`` of the first config's sandbox,
against a burst of as many cold creates launched together.  Medians, p95/p99, min and
max: the machine is shared and noisy; the runs alternate baseline and subject.

    .venv/bin/python tools/bench/sandbox_snapshot.py --runs 7 --json-out snap.json

Needs root, the guest kernel (tools/make_vm_kernel.py) and the test rootfs
(tools/make_rootfs.py).  Everything it starts (the service, its mount server, QEMUs, root
daemons) is stopped at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandbox_create import KEY, Service, cubefs, pct

from vmm.qmp import Qmp

# allocates N MiB, writes every page with random bytes (not zero: QEMU would skip zero pages),
# says so, and stays alive holding them
DIRTY = ("import os, sys, time\n"
         "n = int(sys.argv[1]) << 20\n"
         "b = bytearray(n)\n"
         "for i in range(0, n, 1 << 20):\n"
         "    b[i:i + (1 << 20)] = os.urandom(1 << 20)\n"
         "open('/tmp/dirty-ready', 'w').write(str(len(b)))\n"
         "time.sleep(10 ** 7)\n")


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per phase, the median over the runs (a phase a run lacks counts as 0)."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), 4) for k in keys}


def summary(xs: list[float]) -> dict[str, float]:
    """pct() of sandbox_create plus the spread: these machines are shared."""
    return pct(xs) | {"min": round(min(xs), 3), "max": round(max(xs), 3)}


class Bench:
    def __init__(self, env: dict[str, str], tmp: Path, svc: Service, bandwidth: int = 0) -> None:
        self.env, self.tmp, self.svc = env, tmp, svc
        self.bandwidth = bandwidth  # bytes/s for QEMU's migrations of the sandbox's VM; 0: QEMU's default
        self.rollback_only = False  # --rollback-only: snapshot and rollback, no baselines

    def qmp(self, sandbox_id: str) -> Qmp:
        vm = self.record(sandbox_id)["vm"]
        return Qmp(str(self.tmp / "vm" / vm / "qmp.sock"), vm)

    def set_bandwidth(self, sandbox_id: str) -> None:
        """``--max-bandwidth``: QEMU rate-limits a migration, to a file too, to ``max-bandwidth``
        (128 MiB/s by default); the experiment lifts that on the sandbox's current QEMU."""
        if self.bandwidth:
            q = self.qmp(sandbox_id)
            try:
                q.execute("migrate-set-parameters", **{"max-bandwidth": self.bandwidth})
            finally:
                q.close()

    # -- the service's API and records -------------------------------------------
    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.svc.api}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as res:
                return res.status, json.loads(res.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def record(self, sandbox_id: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / "sandbox" / "sandboxes" / f"{sandbox_id}.json").read_text()))

    def vm_info(self, sandbox_id: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / "vm" / self.record(sandbox_id)["vm"] / "vm.json").read_text()))

    def snapshot_record(self, snapshot_id: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / "sandbox" / "snapshots" / snapshot_id / "snapshot.json").read_text()))

    # -- what is measured ----------------------------------------------------------
    def dirty(self, sbx: Any, mib: int) -> None:
        sbx.files.write("/tmp/dirty.py", DIRTY)
        sbx.commands.run(f"python3 /tmp/dirty.py {mib}", background=True)
        deadline = time.monotonic() + 600
        while sbx.commands.run("cat /tmp/dirty-ready 2>/dev/null || true").stdout.strip() != str(mib << 20):
            if time.monotonic() > deadline:
                raise SystemExit(f"the guest did not dirty {mib} MiB in 600 s")
            time.sleep(0.5)

    def full_save(self, sandbox_id: str) -> dict[str, float]:
        """QEMU's own full save of the sandbox's guest: stop, migrate to a file (the plain
        stream: every non-zero page, no mapped-ram), cont.  The guest is paused throughout."""
        out = self.tmp / "full-save.bin"
        q = self.qmp(sandbox_id)
        try:
            q.execute("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": False} for c in ("mapped-ram", "x-ignore-shared",
                                                            "pause-before-switchover")])
            t0 = time.monotonic()
            q.execute("stop")
            q.execute("migrate", uri=f"file:{out}")
            while (info := q.execute("query-migrate")).get("status") != "completed":
                if info.get("status") in ("failed", "cancelled"):
                    q.execute("cont")
                    raise SystemExit(f"QEMU's full save failed: {info.get('error-desc')}")
                time.sleep(0.002)
            q.execute("cont")
            took = time.monotonic() - t0
        finally:
            q.close()
        size = out.stat().st_size
        out.unlink()
        return {"paused_s": took, "bytes": size}

    def cold(self, template: str) -> float:
        from e2b import Sandbox

        t0 = time.monotonic()
        s = Sandbox.create(template, timeout=600)
        s.commands.run("true")
        took = time.monotonic() - t0
        s.kill()
        return took

    def config(self, template: str, memory: int, dirty_mib: int, runs: int) -> dict[str, Any]:
        from e2b import Sandbox

        res: dict[str, list[float]] = {k: [] for k in (
            "snapshot_api_s", "snapshot_paused_s", "snapshot_service_s", "snapshot_ram_mib", "full_save_paused_s",
            "full_save_mib", "from_snapshot_s", "from_snapshot_create_s", "rollback_api_s", "rollback_usable_s",
            "cold_s")}
        phases: list[dict[str, float]] = []
        snap_phases: list[dict[str, float]] = []  # the service's own split of each call (records' ``phases``)
        rollback_phases: list[dict[str, float]] = []
        sbx = Sandbox.create(template, timeout=3600)
        try:
            self.dirty(sbx, dirty_mib)
            for i in range(runs):
                fs = {"paused_s": 0.0, "bytes": 0}
                if not self.rollback_only:
                    res["cold_s"].append(self.cold(template))
                    self.set_bandwidth(sbx.sandbox_id)  # a rollback made a new QEMU
                    fs = self.full_save(sbx.sandbox_id)
                    res["full_save_paused_s"].append(fs["paused_s"])
                    res["full_save_mib"].append(fs["bytes"] / 2**20)

                t0 = time.monotonic()
                info = sbx.create_snapshot()
                res["snapshot_api_s"].append(time.monotonic() - t0)
                rec = self.snapshot_record(info.snapshot_id)
                res["snapshot_paused_s"].append(rec["paused_seconds"])
                res["snapshot_service_s"].append(rec["seconds"])
                res["snapshot_ram_mib"].append(rec["ram_bytes"] / 2**20)
                snap_phases.append(dict(rec.get("phases") or {}))

                if not self.rollback_only:
                    t0 = time.monotonic()
                    child = Sandbox.create(info.snapshot_id, timeout=600)
                    res["from_snapshot_create_s"].append(time.monotonic() - t0)
                    child.commands.run("true")
                    res["from_snapshot_s"].append(time.monotonic() - t0)
                    alive = child.commands.run("cat /tmp/dirty-ready").stdout.strip()
                    child.kill()
                    assert alive == str(dirty_mib << 20), f"the child lost the dirtying process: {alive!r}"

                t0 = time.monotonic()
                status, body = self.api("POST", f"/sandboxes/{sbx.sandbox_id}/rollback",
                                        {"snapshotID": info.snapshot_id})
                res["rollback_api_s"].append(time.monotonic() - t0)
                if status != 200:
                    raise SystemExit(f"rollback: {status} {body}")
                sbx.commands.run("true")
                res["rollback_usable_s"].append(time.monotonic() - t0)
                alive = sbx.commands.run("cat /tmp/dirty-ready").stdout.strip()
                assert alive == str(dirty_mib << 20), f"the rollback lost the dirtying process: {alive!r}"
                vm_info = self.vm_info(sbx.sandbox_id)
                phases.append(dict(vm_info.get("restore_phases") or {}))
                rollback_phases.append(dict(vm_info.get("rollback_phases") or {}))
                Sandbox.delete_snapshot(info.snapshot_id)
                log(f"{memory} MiB / {dirty_mib} MiB dirty, run {i + 1}: snapshot "
                    f"{res['snapshot_api_s'][-1]:.3f} s (paused {rec['paused_seconds'] * 1000:.0f} ms, "
                    f"{rec['ram_bytes'] / 2**20:.0f} MiB kept), full save paused {fs['paused_s']:.3f} s, "
                    f"rollback {res['rollback_api_s'][-1]:.3f} s (+ command {res['rollback_usable_s'][-1]:.3f} s), "
                    f"from snapshot {(res['from_snapshot_s'] or [0])[-1]:.3f} s, "
                    f"cold {(res['cold_s'] or [0])[-1]:.3f} s; snapshot phases {snap_phases[-1]}, rollback phases "
                    f"{rollback_phases[-1]} (restore {phases[-1]})")
        finally:
            sbx.kill()
        if self.rollback_only:
            return {k: summary(v) for k, v in res.items() if v} | {
                "rollback_phases_p50": medians(phases), "rollback_service_phases_p50": medians(rollback_phases),
                "snapshot_phases_p50": medians(snap_phases)}
        out: dict[str, Any] = {k: summary(v) for k, v in res.items()}
        out["rollback_phases_p50"] = medians(phases)  # the VM restore's: back-end, QEMU, load
        out["rollback_service_phases_p50"] = medians(rollback_phases)  # stop, restore, old VM, agent calls
        out["snapshot_phases_p50"] = medians(snap_phases)  # checkpoint (live, scan, ...), clone, sync, record
        out["ratios_p50"] = {
            "snapshot_paused_vs_full_save_paused": round(out["snapshot_paused_s"]["p50"]
                                                         / out["full_save_paused_s"]["p50"], 3),
            "snapshot_api_vs_full_save_paused": round(out["snapshot_api_s"]["p50"]
                                                      / out["full_save_paused_s"]["p50"], 3),
            "rollback_api_vs_cold": round(out["rollback_api_s"]["p50"] / out["cold_s"]["p50"], 3),
            "rollback_usable_vs_cold": round(out["rollback_usable_s"]["p50"] / out["cold_s"]["p50"], 3),
            "from_snapshot_vs_cold": round(out["from_snapshot_s"]["p50"] / out["cold_s"]["p50"], 3)}
        return out

    def forks(self, template: str, dirty_mib: int, count: int, runs: int) -> dict[str, Any]:
        from e2b import Sandbox

        fork_s: list[float] = []
        burst_s: list[float] = []
        sbx = Sandbox.create(template, timeout=3600)
        try:
            self.dirty(sbx, dirty_mib)
            for i in range(runs):
                t0 = time.monotonic()
                with ThreadPoolExecutor(count) as pool:
                    made = list(pool.map(lambda _: Sandbox.create(template, timeout=600), range(count)))
                    list(pool.map(lambda s: s.commands.run("true"), made))
                burst_s.append(time.monotonic() - t0)
                for s in made:
                    s.kill()
                self.set_bandwidth(sbx.sandbox_id)
                t0 = time.monotonic()
                children = sbx.fork(count=count, timeout=600)
                took = time.monotonic() - t0
                ok = [c for c in children if isinstance(c, Sandbox)]
                try:
                    if len(ok) != count:
                        raise SystemExit(f"fork: {count - len(ok)} of {count} failed: "
                                         f"{[c for c in children if not isinstance(c, Sandbox)]}")
                    fork_s.append(took)
                    with ThreadPoolExecutor(count) as pool:
                        list(pool.map(lambda s: s.commands.run("true"), ok))
                finally:
                    for c in ok:
                        c.kill()
                log(f"fork of {count}, run {i + 1}: {took:.2f} s; {count} cold creates at once: {burst_s[-1]:.2f} s")
        finally:
            sbx.kill()
        return {"count": count, "fork_s": summary(fork_s), "cold_burst_s": summary(burst_s),
                "ratio_p50_fork_vs_cold_burst": round(statistics.median(fork_s) / statistics.median(burst_s), 3)}


def stop_mount_server(sock: Path) -> None:
    """The mount server the service's first mount started (its lock file names it): it would
    otherwise wait 15 minutes idle before it exits."""
    try:
        os.kill(int((Path(f"{sock}.lock")).read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def node_env(tmp: Path) -> dict[str, str]:
    """A node of its own under ``tmp``: nothing of /run/cubefs or ~/.cache/cubefs is touched."""
    return {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
            "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
            "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
            "CUBEFS_SANDBOX_API_KEY": KEY, "CUBEFS_SERVER": str(tmp / "serve.sock")}


def teardown(env: dict[str, str], tmp: Path, svc: Service | None, keep: bool) -> None:
    """Everything the bench started, gone: the service, every VM (QEMU and root daemon), the
    mount server, the directory (unless ``keep``)."""
    if svc is not None and svc.proc.poll() is None:
        svc.stop()
    subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
    stop_mount_server(tmp / "serve.sock")
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)


def on_sigterm(*_: Any) -> None:
    raise KeyboardInterrupt  # the finally blocks clean up


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="256:10,1024:10,1024:500",
                    help="GUEST_MIB:DIRTY_MIB,... (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fork-count", type=int, default=10)
    ap.add_argument("--fork-runs", type=int, default=3)
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--max-bandwidth", type=int, default=0, metavar="MIB_S",
                    help="an experiment: QEMU's migration rate limit (max-bandwidth, 128 MiB/s by default) "
                         "for the sandboxes' snapshots and the full-save baseline")
    ap.add_argument("--rollback-only", action="store_true",
                    help="each run a snapshot and a rollback to it, nothing else (no baselines, no create from "
                         "the snapshot): for comparing rollback code quickly")
    ap.add_argument("--keep", action="store_true", help="keep the bench's directory (logs, records)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    signal.signal(signal.SIGTERM, on_sigterm)

    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-snap-"))
    env = node_env(tmp)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                           "loadavg_start": os.getloadavg()[0], "runs": args.runs,
                           "max_bandwidth_mib_s": args.max_bandwidth or "QEMU's default"}
    svc: Service | None = None
    try:
        cubefs(env, "build", args.rootfs, "--tag", "bench:1")
        for memory in sorted({m for m, _ in configs}):
            cubefs(env, "sandbox", "template", "create", f"m{memory}", "--from", "bench:1", "--memory", str(memory))
        svc = Service(env, tmp, 0)
        bench = Bench(env, tmp, svc, args.max_bandwidth << 20)
        bench.rollback_only = args.rollback_only
        for memory, dirty in configs:
            key = f"m{memory}_dirty{dirty}"
            out[key] = bench.config(f"m{memory}", memory, dirty, args.runs)
            print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)
        if args.fork_runs:
            memory, dirty = configs[0]
            out[f"fork_m{memory}_dirty{dirty}"] = bench.forks(f"m{memory}", dirty, args.fork_count, args.fork_runs)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        teardown(env, tmp, svc, args.keep)
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
