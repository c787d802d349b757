#!/usr/bin/env python3
"""Throughput through the guest agent under TCG (issue 13: floor >= 50 MB/s).

One VM (TCG, the test root filesystem built into a cubefs image in a temporary store and
served read-only by cubefs's own vhost-user-fs back-end, as tests/test_vm.py boots it; a
tmpfs on its /tmp), driven through vmm/channel.py as the sandbox service drives it:

* **stdout**: ``head -c 512M /dev/zero`` and ``dd if=/dev/zero bs=1M`` spawned through
  the agent, stdout consumed on the host (every byte through the pipe, the agent,
  virtio-serial), with the agent's own CPU seconds (PID 1's utime+stime in the guest);
* **file write / read**: a 256 MiB file written into the guest's /tmp with
  ``write_file`` and read back with ``read_file``;
* **the same inside the guest**, the ceiling: ``head -c 512M /dev/zero | dd
  of=/dev/null`` (and ``dd | dd``), ``dd`` of the file to and from /tmp, timed in the guest.

    sudo .venv/bin/python tools/bench/agent_stream.py [--mib 512] [--file-mib 256] [--json-out F]

``--cpu MODEL`` tries another QEMU CPU model (how ``max,-erms,-fsrm`` was found);
``--kernel-dir`` builds the initramfs elsewhere, to try an agent without replacing the
shared one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_vm_kernel import DEFAULT, make_kernel

from vmm.channel import AgentChannel
from vmm.machine import Machine, MachineSpec, Ram

ROOTFS = "/var/tmp/cubefs-test/rootfs"


def log(msg: str) -> None:
    print(f"[agent_stream] {msg}", file=sys.stderr, flush=True)


async def sh(c: AgentChannel, script: str) -> str:
    p = await c.spawn(["/bin/sh", "-c", script], user="root", cwd="/")
    out = b""
    async for ev in p.events():
        if ev[0] == "end":
            if ev[1] != 0:
                raise SystemExit(f"{script!r} failed in the guest ({ev[1:]}): {out.decode(errors='replace')}")
        else:
            out += ev[1]
    return out.decode()


async def agent_cpu(c: AgentChannel) -> float:
    """The agent's (PID 1's) user+system CPU seconds in the guest."""
    fields = (await sh(c, "cat /proc/1/stat")).rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def guest_seconds(dd_report: str) -> float:
    """dd's own 'N bytes ... copied, S s, ...' line."""
    line = next(x for x in dd_report.splitlines() if "copied" in x)
    return float(line.split("copied,")[1].split("s")[0].strip())


async def bench(agent_sock: str, mib: int, file_mib: int) -> dict[str, float]:
    c = await AgentChannel.connect(agent_sock, "bench", timeout=180)
    out: dict[str, float] = {}
    try:
        await c.mount(read_only=True)
        await sh(c, "mount -t tmpfs -o size=90% tmpfs /tmp")
        # stdout through the agent, two producers: head (8 KiB writes) and dd bs=1M
        for name, argv in (("stdout", ["head", "-c", f"{mib}M", "/dev/zero"]),
                           ("stdout_dd", ["dd", "if=/dev/zero", "bs=1M", f"count={mib}", "status=none"])):
            cpu0 = await agent_cpu(c)
            t0 = time.monotonic()
            p = await c.spawn(argv, user="root")
            n = 0
            async for ev in p.events():
                if ev[0] == "stdout":
                    n += len(ev[1])
            secs = time.monotonic() - t0
            assert n == mib << 20, n
            out[f"{name}_mb_s"] = round(n / secs / 1e6, 1)
            out[f"{name}_agent_cpu_s"] = round(await agent_cpu(c) - cpu0, 2)
            log(f"{name} through the agent: {n >> 20} MiB in {secs:.2f} s = {out[f'{name}_mb_s']} MB/s, "
                f"agent cpu {out[f'{name}_agent_cpu_s']} s")
        # file write and read through the agent
        block = bytes(1 << 20)

        async def zeros() -> AsyncIterator[bytes]:
            for _ in range(file_mib):
                yield block

        cpu0 = await agent_cpu(c)
        t0 = time.monotonic()
        entry = await c.write_file("/tmp/bench.bin", zeros(), user="root")
        secs = time.monotonic() - t0
        assert entry["size"] == file_mib << 20, entry
        out["file_write_mb_s"] = round((file_mib << 20) / secs / 1e6, 1)
        out["file_write_agent_cpu_s"] = round(await agent_cpu(c) - cpu0, 2)
        cpu0 = await agent_cpu(c)
        t0 = time.monotonic()
        n = 0
        async for chunk in c.read_file("/tmp/bench.bin", user="root"):
            n += len(chunk)
        secs = time.monotonic() - t0
        assert n == file_mib << 20, n
        out["file_read_mb_s"] = round(n / secs / 1e6, 1)
        out["file_read_agent_cpu_s"] = round(await agent_cpu(c) - cpu0, 2)
        log(f"file through the agent: write {out['file_write_mb_s']} MB/s, read {out['file_read_mb_s']} MB/s")
        await sh(c, "rm -f /tmp/bench.bin")
        # the same inside the guest
        pipe = guest_seconds(await sh(c, f"head -c {mib}M /dev/zero | dd of=/dev/null bs=1M 2>&1"))
        out["guest_pipe_mb_s"] = round((mib << 20) / pipe / 1e6, 1)
        pipe = guest_seconds(await sh(c, f"dd if=/dev/zero bs=1M count={mib} status=none | dd of=/dev/null bs=1M 2>&1"))
        out["guest_pipe_dd_mb_s"] = round((mib << 20) / pipe / 1e6, 1)
        wr = guest_seconds(await sh(c, f"dd if=/dev/zero of=/tmp/dd.bin bs=1M count={file_mib} 2>&1"))
        rd = guest_seconds(await sh(c, "dd if=/tmp/dd.bin of=/dev/null bs=1M 2>&1"))
        out["guest_dd_write_mb_s"] = round((file_mib << 20) / wr / 1e6, 1)
        out["guest_dd_read_mb_s"] = round((file_mib << 20) / rd / 1e6, 1)
        log(f"inside the guest: pipe {out['guest_pipe_mb_s']} MB/s (dd: {out['guest_pipe_dd_mb_s']}), "
            f"dd write {out['guest_dd_write_mb_s']} MB/s, dd read {out['guest_dd_read_mb_s']} MB/s")
        await sh(c, "rm -f /tmp/dd.bin; umount /tmp")
        await c.umount()
    finally:
        await c.close()
    return out


def cubefs(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"cubefs {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def serve_root(work: Path, rootfs: str) -> tuple[Path, int]:
    """``rootfs`` built into a store under ``work`` and served on a vhost-user-fs socket by a
    cubefs daemon (QEMU's C virtiofsd, the old back-end here, left QEMU in 8.0); the socket
    and the daemon's pid (it ends with the VM).  Its own mount server, cache and store: nothing
    of the node's."""
    env = {**os.environ, "CUBEFS_STORE": f"file://{work / 'store'}", "CUBEFS_CACHE_DIR": str(work / "cache"),
           "CUBEFS_SERVER": str(work / "mount-server.sock")}
    cubefs(env, "build", rootfs, "--tag", "bench:1")
    sock = work / "vfs.sock"
    cubefs(env, "mount", "bench:1", str(sock), "--transport", "virtiofs")
    return sock, int(json.loads(cubefs(env, "stats", str(sock), "--json"))["pid"])


def stop_daemon(pid: int) -> None:
    """The root's daemon ends by itself once QEMU has gone; SIGTERM it if it has not in 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def stop_mount_server(sock: Path) -> None:
    """The mount server ``cubefs mount`` started for ``sock`` (its lock file names it): it
    would otherwise wait 15 minutes idle before it exits."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(Path(f"{sock}.lock").read_text()), signal.SIGTERM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--file-mib", type=int, default=256)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--rootfs", default=ROOTFS, help="the guest's root directory (built into an image first)")
    ap.add_argument("--cpu", default=None, help="QEMU -cpu model instead of the machine's (an experiment)")
    ap.add_argument("--kernel-dir", default=DEFAULT, help="where to build the guest kernel and initramfs")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    kernel = make_kernel(Path(args.kernel_dir))
    work = Path(tempfile.mkdtemp(prefix="agent-stream-"))
    machine = None
    daemon = 0
    try:
        sock, daemon = serve_root(work, args.rootfs)
        (work / "vm").mkdir()
        machine = Machine(work / "vm", MachineSpec(kernel, args.memory_mb, 1, "tcg"), Ram(), fs_socket=str(sock))
        if args.cpu:
            argv = machine.argv()
            argv[argv.index("-cpu") + 1] = args.cpu
            machine.argv = lambda: argv  # type: ignore[method-assign]
        machine.start()
        result = asyncio.run(bench(machine.agent_path, args.mib, args.file_mib))
    finally:
        if machine is not None:
            machine.stop()
        if daemon:
            stop_daemon(daemon)
        stop_mount_server(work / "mount-server.sock")
        shutil.rmtree(work, ignore_errors=True)
    result |= {"mib": args.mib, "file_mib": args.file_mib, "accel": "tcg", "cpu": args.cpu or "default"}
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
