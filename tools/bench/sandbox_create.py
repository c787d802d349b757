#!/usr/bin/env python3
"""How fast the sandbox service is, driven by the stock E2B SDK, against baselines of the same run.

* **create**: ``Sandbox.create()`` + ``commands.run("true")`` (+ kill, not timed),
  p50/p95/p99 over ``--creates`` sandboxes at concurrency 1 and ``--concurrency``,
  against ``cubefs vm run --template T IMAGE -- true`` (the same restore, through
  the CLI) measured ``--baseline`` times in the same run;
* **streams**: ``commands.run`` of ``head -c SIZE /dev/zero`` (stdout through the
  agent, envd and the proxy), ``files.write``/``files.read`` of SIZE bytes, MB/s,
  against ``dd`` of the same inside the guest (``dd if=/dev/zero of=FILE``,
  ``dd if=FILE of=/dev/null``).

Needs root, the guest kernel (tools/make_vm_kernel.py) and the test rootfs
(tools/make_rootfs.py).  Everything lives in a temp dir; one service on loopback.

    sudo .venv/bin/python tools/bench/sandbox_create.py --creates 100 --concurrency 10 --size 256M
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "e2b_bench_key"


def cubefs(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"n": len(s), "p50": round(statistics.median(s), 3), "p95": round(pick(0.95), 3),
            "p99": round(pick(0.99), 3)}


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--baseline", type=int, default=10, help="cubefs vm run --template runs")
    ap.add_argument("--size", type=size_arg, default=256 << 20, help="stream size (default 256M)")
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-sbx-"))
    env = {**os.environ, "CUBEFS_VM_DIR": str(tmp / "vm"), "CUBEFS_TEMPLATE_DIR": str(tmp / "templates"),
           "CUBEFS_VOLUME_DIR": str(tmp / "volumes"), "CUBEFS_STORE": f"file://{tmp / 'store'}",
           "CUBEFS_CACHE_DIR": str(tmp / "cache"), "CUBEFS_SANDBOX_DIR": str(tmp / "sandbox"),
           "CUBEFS_SANDBOX_API_KEY": KEY, "CUBEFS_SERVER": str(tmp / "serve.sock")}
    cubefs(env, "build", args.rootfs, "--tag", "bench:1")
    cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
    api, proxy = 43000 + os.getpid() % 1000, 44000 + os.getpid() % 1000
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

    out: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "size": args.size}
    try:
        tpl = json.loads(cubefs(env, "sandbox", "template", "ls", "--json"))[0]
        base = []
        for _ in range(args.baseline):
            t0 = time.monotonic()
            cubefs(env, "vm", "run", "--template", tpl["vm_template"], "bench:1", "--", "true")
            base.append(time.monotonic() - t0)
        out["vm_run_template"] = pct(base)

        def one() -> float:
            t0 = time.monotonic()
            s = Sandbox.create(timeout=120)
            s.commands.run("true")
            took = time.monotonic() - t0
            s.kill()
            return took

        for conc in (1, args.concurrency):
            with ThreadPoolExecutor(conc) as pool:
                out[f"create_run_c{conc}"] = pct(list(pool.map(lambda _: one(), range(args.creates))))
            print(json.dumps({f"create_run_c{conc}": out[f"create_run_c{conc}"]}), file=sys.stderr)

        s = Sandbox.create(timeout=600)
        mb = args.size / 1e6
        n = 0

        def count(chunk: str) -> None:
            nonlocal n
            n += len(chunk)

        t0 = time.monotonic()
        s.commands.run(f"head -c {args.size} /dev/zero | tr '\\0' a", on_stdout=count, timeout=0)
        out["stdout_MBps"] = round(mb / (time.monotonic() - t0), 1)
        assert n == args.size, (n, args.size)
        data = b"x" * args.size
        t0 = time.monotonic()
        s.files.write("/home/user/big.bin", data)
        out["files_write_MBps"] = round(mb / (time.monotonic() - t0), 1)
        t0 = time.monotonic()
        back = s.files.read("/home/user/big.bin", format="bytes")
        out["files_read_MBps"] = round(mb / (time.monotonic() - t0), 1)
        assert len(back) == args.size
        count_mb = args.size >> 20
        dd = s.commands.run(f"dd if=/dev/zero of=/home/user/dd.bin bs=1M count={count_mb} conv=fsync 2>&1 | "
                            "tail -1; dd if=/home/user/dd.bin of=/dev/null bs=1M 2>&1 | tail -1").stdout
        out["guest_dd"] = dd.strip().splitlines()
        s.kill()
    finally:
        serve.terminate()
        serve.wait(30)
        subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
