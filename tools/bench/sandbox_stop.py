#!/usr/bin/env python3
"""How long ``cubefs sandbox serve`` takes to stop (SIGTERM) while an SDK client follows a
background command (an open envd stream), and when that client sees its stream end.

The code measured is what ``python -m cubefs`` imports from the current directory: run it
from a checkout of another commit (``git archive REV | tar -x -C DIR; cd DIR``) for a
before/after pair.  Needs root, the guest kernel and the test rootfs.

    cd /work/main && .venv/bin/python tools/bench/sandbox_stop.py --runs 3
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from argparse import ArgumentParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_service import Service, bench_env, cubefs, stop_mount_server


def one(env: dict[str, str], tmp: Path, run: int) -> dict[str, float | str]:
    from e2b import Sandbox

    svc = Service(env, tmp / f"serve-{run}.log", 0, 44100 + os.getpid() % 500)
    svc.use()
    sbx = Sandbox.create(timeout=120)
    sleeper = sbx.commands.run("sleep 100", background=True)
    ended: list[float] = []
    how: list[str] = []

    def follow() -> None:
        try:
            sleeper.wait()
        except Exception as err:  # how the client sees its stream end
            how.append(type(err).__name__)
        ended.append(time.monotonic())

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(1)
    t0 = time.monotonic()
    svc.proc.terminate()
    svc.proc.wait(120)
    took = time.monotonic() - t0
    time.sleep(0.5)
    return {"stop_s": round(took, 2), "stream_end_s": round(ended[0] - t0, 2) if ended else -1.0,
            "client_saw": how[0] if how else "end"}


def main() -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rootfs", default="/var/tmp/cubefs-test/rootfs")
    ap.add_argument("--kernel", default=os.environ.get("CUBEFS_VM_KERNEL", "/var/tmp/cubefs-vm/kernel"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cubefs-bench-stop-"))
    env = bench_env(tmp, Path(args.kernel))
    try:
        cubefs(env, "build", args.rootfs, "--tag", "bench:1")
        cubefs(env, "sandbox", "template", "create", "base", "--from", "bench:1")
        for run in range(args.runs):  # each run's sandbox lives on (adopted by the next service)
            print(json.dumps(one(env, tmp, run)), flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "cubefs", "vm", "rm", "--all"], env=env, capture_output=True)
        stop_mount_server(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
