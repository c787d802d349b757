#!/usr/bin/env python3
"""Sandbox streams end to end (issue 13: floor >= 50 MB/s under TCG), through the stock E2B SDK.

One ``cubefs sandbox serve`` on loopback, one sandbox, ``--runs`` rounds of:

* **stdout**: ``commands.run("dd if=/dev/zero bs=1M count=N")`` with an ``on_stdout`` callback
  (agent, envd's Connect stream, the proxy, the SDK); the producer is ``dd bs=1M`` because
  ``head`` (8 KiB writes) is itself the limit under TCG — the guest's own rate of the same
  producer into a pipe (``dd | dd of=/dev/null``) is measured beside it;
* **files.write / files.read** of SIZE bytes at ``--path``, beside the guest's own ``dd`` to and
  from the same path.

For each stream it also reports the CPU seconds the service process, this client (the SDK),
QEMU and the node daemon (the sandbox root's virtio-fs backend) spent: with 2 host cores, which
one saturates says where the time goes.  Medians of the runs.

    sudo .venv/bin/python tools/bench/sandbox_streams.py --size 256M --runs 3 [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

KEY = "e2b_bench_key"
TICK = os.sysconf("SC_CLK_TCK")


def cubefs(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def _cmdline_has(proc: Path, what: Path) -> bool:
    try:
        return str(what).encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def guest_rate(line: str) -> float:
    """MB/s from dd's 'N bytes ... copied, S s, ...' line."""
    head, rest = line.split("copied,")
    return round(int(head.split()[0]) / float(rest.split("s")[0].strip()) / 1e6, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg, default=256 << 20, help="stream size (default 256M)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--path", default="/home/user/big.bin", help="the file written and read in the guest")
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    mib = args.size >> 20

    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-streams-"))
    env = {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
           "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
           "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
           "CUBEFS_SANDBOX_API_KEY": KEY, "CUBEFS_SERVER": str(tmp / "serve.sock")}
    cubefs(env, "build", args.rootfs, "--tag", "bench:1")
    cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
    api, proxy = 45000 + os.getpid() % 1000, 46000 + os.getpid() % 1000
    serve = subprocess.Popen([sys.executable, "-m", "cubefs", "sandbox", "serve", "--api-listen",
                              f"127.0.0.1:{api}", "--proxy-listen", f"127.0.0.1:{proxy}"], env=env,
                             stdout=open(tmp / "serve.log", "wb"), stderr=subprocess.STDOUT)
    os.environ.update({"E2B_API_KEY": KEY, "E2B_API_URL": f"http://127.0.0.1:{api}",
                       "E2B_SANDBOX_URL": f"http://127.0.0.1:{proxy}"})
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    from e2b import Sandbox

    rounds: list[dict[str, float]] = []
    try:
        s = Sandbox.create(timeout=1800)
        node = [int(d.name) for d in Path("/proc").iterdir()
                if d.name.isdigit() and _cmdline_has(d, tmp / "serve.sock")]
        qemu = [q for q in children(serve.pid) if _comm(q).startswith("qemu")]
        procs = {"service": [serve.pid], "qemu": qemu, "node": node}  # node: the root's virtio-fs backend

        def timed(name: str, fn: Callable[[], None], row: dict[str, float]) -> None:
            cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in procs.items()}
            me0 = sum(os.times()[:2])
            t0 = time.monotonic()
            fn()
            secs = time.monotonic() - t0
            row[f"{name}_MBps"] = round(args.size / secs / 1e6, 1)
            for k, v in procs.items():
                row[f"{name}_{k}_cpu_s"] = round(sum(cpu_seconds(p) for p in v) - cpu0[k], 2)
            row[f"{name}_client_cpu_s"] = round(sum(os.times()[:2]) - me0, 2)
            row[f"{name}_s"] = round(secs, 2)

        data = b"x" * args.size
        back: list[bytes] = []
        for _ in range(args.runs):
            row: dict[str, float] = {}
            n = 0

            def count(chunk: str) -> None:
                nonlocal n
                n += len(chunk)

            timed("stdout", lambda: s.commands.run(f"dd if=/dev/zero bs=1M count={mib} status=none",
                                                   on_stdout=count, timeout=0), row)
            assert n == args.size, (n, args.size)
            timed("files_write", lambda: s.files.write(args.path, data), row)
            timed("files_read", lambda: back.append(s.files.read(args.path, format="bytes")), row)
            assert back[0] == data
            back.clear()
            dd = s.commands.run(
                f"dd if=/dev/zero bs=1M count={mib} status=none | dd of=/dev/null bs=1M 2>&1 | tail -1; "
                f"rm -f {args.path}; dd if=/dev/zero of={args.path} bs=1M count={mib} 2>&1 | tail -1; "
                f"dd if={args.path} of=/dev/null bs=1M 2>&1 | tail -1; rm -f {args.path}").stdout.splitlines()
            row["guest_pipe_MBps"], row["guest_dd_write_MBps"], row["guest_dd_read_MBps"] = map(guest_rate, dd)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rounds.append(row)
        s.kill()
    finally:
        serve.terminate()
        serve.wait(30)
        subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
    med = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    for name, guest in (("stdout", "guest_pipe"), ("files_write", "guest_dd_write"), ("files_read", "guest_dd_read")):
        med[f"{name}_vs_guest"] = round(med[f"{name}_MBps"] / med[f"{guest}_MBps"], 2)
    out = {"date": time.strftime("%Y-%m-%d"), "size": args.size, "runs": args.runs, "path": args.path,
           "median": med, "rounds": rounds}
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
