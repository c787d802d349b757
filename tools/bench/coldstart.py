"""Cold-start benchmark: a lazily mounted cubefs image versus pulling the full layer.

Why this exists: the point of cubefs is that a container can start before
its image is on the node, because only the blocks it reads are fetched.  The
claim has two halves, each with a floor the project has set:

* **lazy cold / full pull <= 0.5** -- mounting the image on an empty cache
  and running a command must take at most half the time of the classic path
  (download the zstd tar layer, decompress, extract, run);
* **lazy warm / native warm <= 1.5** -- once the page cache is warm, running
  from the FUSE mount may cost at most 1.5x running from a plain directory.

Loopback flatters lazy fetching (a request costs ~1 ms), so every measurement
runs twice: directly against the S3 server and through
:mod:`delayproxy`, which adds ``--delay-ms`` (default 10 ms) to every request,
roughly a store in the same region.  The proxy also logs every request, which
shows how many round trips were sequential: the number that latency
multiplies.

What one run does (all against one local SeaweedFS S3 server, as root):

1. tar + ``zstd -3`` the root filesystem once and upload it as a "layer";
   ``cubefs build`` it into a fresh bucket (the image measured below), and
   into more fresh buckets for ``--build-repeats`` builds in all, for the
   build throughput (MB/s of input, from ``cubefs build --json``).
2. For each mode (direct, delayed) and each of ``--repeat`` samples:

   * *lazy cold*: empty ``--cache-dir``, ``sync; echo 3 > drop_caches``, then
     ``cubefs mount`` + ``chroot MNT CMD``, timed together (the mount command
     is part of the cost); ``cubefs stats --json`` gives what came from the store;
   * *lazy warm*: the same command again on the same mount (page cache warm);
   * *lazy warm-disk*: umount, drop caches, remount with the now warm disk
     cache, run;
   * *full pull*: drop caches, GET the layer (cubefs's S3 client, in process: a
     pulling daemon has no start-up cost, so the baseline is not flattered),
     ``zstd -dc | tar -x`` into a fresh directory, run;
   * *native warm*: the command again in the extracted directory.

   * *later start* (unless ``--trace``): a fresh cache again, after the first
     start published its trace by itself (every cold sample starts with the
     image's trace deleted: a first start, no trace anywhere);
   * *full pull* GETs the layer in ``--pull-parts`` (3) parallel ranged GETs.

   ``--image NAME`` picks one of issue 18's trees and its command
   (tools/bench/images.py: deb-python, deb-numpy, py-pandas, deb-node).

3. Print medians per mode, the ratios against their floors, bytes fetched
   from the store against the image's stored size, and build throughput;
   ``--json`` prints everything (samples included) as JSON instead.

Everything it starts (S3 server, proxy, mounts and their daemons) is torn
down on exit, including Ctrl-C, SIGTERM and errors.  Usage, from the
repository root::

    .venv/bin/python tools/bench/coldstart.py                 # both modes, 5 samples
    .venv/bin/python tools/bench/coldstart.py --repeat 3 --only delay --delay-ms 20 --json

The root filesystem is the one the tests use (``tools/make_rootfs.py``:
Debian bookworm minbase + python3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from delayproxy import DelayProxy, summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import S3_ENV, S3Server, free_ports, start_s3_server

from cubefs.remote.loop import LoopThread
from cubefs.remote.s3 import S3Store

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOTFS = os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs")
DEFAULT_CMD = "python3 -c 'import json'"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"}
BUCKET = "coldstart"
LAYER_KEY = "layers/rootfs.tar.zst"
REF = "bench:rootfs"
FLOOR_COLD = 0.5
FLOOR_WARM = 1.5
WARM_RUNS = 3  # warm runs per sample; their median is the sample's value


def log(msg: str) -> None:
    """Progress goes to stderr so that ``--json`` stdout stays machine-readable."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cubefs_argv() -> list[str]:
    """The installed ``cubefs`` console script next to this interpreter, as a user would run it."""
    script = Path(sys.executable).parent / "cubefs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cubefs"]


class LayerClient:
    """GET/PUT of the full-pull layer through cubefs's own S3 client, in process, so the
    baseline pays no start-up cost (a pulling daemon would already be running)."""

    def __init__(self, endpoint: str) -> None:
        os.environ.update(S3_ENV)
        self.endpoint = endpoint
        self.loop = LoopThread("bench-s3")

    def _store(self, bucket: str) -> S3Store:
        return S3Store(bucket, "", self.endpoint)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        store = self._store(bucket)
        self.loop.run(store.open())
        self.loop.run(store.put(key, data))
        self.loop.run(store.close())

    def get(self, bucket: str, key: str, size: int = 0, parts: int = 1) -> bytes:
        """The object; with ``parts`` > 1 (and its ``size``), as that many ranged GETs in
        parallel, as a registry client pulls a layer (issue 18's baseline: 3)."""
        store = self._store(bucket)
        try:
            if parts <= 1 or size <= 0:
                return self.loop.run(store.get(key))
            step = -(-size // parts)

            async def ranged() -> bytes:
                got = await asyncio.gather(*(store.get_range(key, o, min(step, size - o))
                                             for o in range(0, size, step)))
                return b"".join(got)

            return self.loop.run(ranged())
        finally:
            self.loop.run(store.close())

    def delete(self, bucket: str, key: str) -> None:
        store = self._store(bucket)
        try:
            self.loop.run(store.delete(key))
        finally:
            self.loop.run(store.close())


# -- processes and cleanup -----------------------------------------------------------------------------------


@dataclass
class Cleanup:
    """Everything the benchmark started, torn down once, in reverse order of importance to the host."""

    mounts: dict[Path, int] = field(default_factory=dict)  # mountpoint -> daemon pid (0 if unknown)
    proxies: list[DelayProxy] = field(default_factory=list)
    server: S3Server | None = None
    peer: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    keep: bool = False

    def umount(self, mnt: Path) -> None:
        pid = self.mounts.pop(mnt, 0)
        if not os.path.ismount(mnt):
            if pid:
                _reap(pid)
            return
        res = run([*cubefs_argv(), "umount", str(mnt)], check=False, timeout=60)
        if res.returncode != 0 and os.path.ismount(mnt):
            log(f"cubefs umount {mnt} failed ({res.stderr.strip()}); detaching lazily")
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        if pid:
            _reap(pid)

    def close(self) -> None:
        for mnt in list(self.mounts) + self._stray_mounts():
            with contextlib.suppress(Exception):
                self.umount(mnt)
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        self.proxies.clear()
        if self.peer is not None:
            with contextlib.suppress(Exception):
                os.killpg(self.peer.pid, signal.SIGTERM)
                self.peer.wait(timeout=30)
        self.peer = None
        if self.workdir is not None:  # the mount server the first mount started
            with contextlib.suppress(Exception):
                os.kill(int((self.workdir / "serve.sock.lock").read_text()), signal.SIGTERM)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
            self.server = None
        if self.workdir is not None and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir is not None:
            log(f"kept work directory {self.workdir}")
        self.workdir = None

    def _stray_mounts(self) -> list[Path]:
        """Mounts under our work directory we lost track of (e.g. Ctrl-C during ``cubefs mount``)."""
        if self.workdir is None:
            return []
        prefix = str(self.workdir.resolve()) + "/"
        try:
            with open("/proc/self/mounts") as f:
                points = [line.split()[1] for line in f]
        except OSError:
            return []
        return [Path(p) for p in points if p.startswith(prefix) and Path(p) not in self.mounts]


def _reap(pid: int) -> None:
    """Wait for a mount daemon we started to exit; kill it (by pid) if it lingers."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        time.sleep(1)


def run(argv: list[str], check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **S3_ENV, **(env or {})}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


def drop_caches() -> None:
    """Write back and evict the page cache, dentries and inodes, so 'cold' means cold on this host."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_in(root: Path, cmd: list[str]) -> float:
    """Seconds to run ``chroot ROOT CMD`` (which must succeed)."""
    t0 = time.perf_counter()
    res = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True, env=CHROOT_ENV, timeout=300)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"chroot {root} {shlex.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-1500:]}")
    return dt


# -- measurements --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every sample needs: where things are and how to reach the store in this mode."""

    args: argparse.Namespace
    cleanup: Cleanup
    workdir: Path
    cmd: list[str]
    endpoint: str
    store: str
    proxy: DelayProxy | None
    mount_args: list[str]
    mode: str
    client: LayerClient | None = None  # to delete the image's trace before a first start
    trace_key: str = ""


def mount(ctx: Ctx, mnt: Path, cache_dir: Path, extra: tuple[str, ...] = ()) -> float:
    """``cubefs mount``; returns its seconds and registers the mount for cleanup.

    The daemon's pid is learnt later from ``cubefs stats`` (:func:`sample_stats`), after the timed run, so
    that nothing but the command itself runs between the mount and the run.
    """
    mnt.mkdir(parents=True, exist_ok=True)
    argv = [*cubefs_argv(), "mount", REF, str(mnt), "--store", ctx.store, "--s3-endpoint", ctx.endpoint,
                            "--cache-dir", str(cache_dir), *ctx.mount_args, *extra]
    ctx.cleanup.mounts[mnt] = 0  # registered first: an interrupt mid-mount must still unmount it
    t0 = time.perf_counter()
    res = run(argv, check=False, timeout=300)
    dt = time.perf_counter() - t0
    if res.returncode != 0 or not os.path.ismount(mnt):
        raise RuntimeError(f"cubefs mount exited {res.returncode}: {res.stderr.strip()}")
    return dt


def mount_stats(mnt: Path) -> dict[str, Any]:
    return dict(json.loads(run([*cubefs_argv(), "stats", str(mnt), "--json"]).stdout))


def sample_stats(ctx: Ctx, mnt: Path) -> dict[str, Any]:
    """``cubefs stats`` figures; also records the daemon pid so cleanup can make sure it exits."""
    stats = mount_stats(mnt)
    if mnt in ctx.cleanup.mounts:
        ctx.cleanup.mounts[mnt] = int(stats.get("pid", 0))
    return store_figures(stats)


def store_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """The counters the report needs from ``cubefs stats --json``."""
    store = stats["tiers"]["store"]
    disk = stats["tiers"].get("disk", {})
    reqs = stats.get("store_requests", {})
    return {
        "chunk_requests": int(store["requests"]),  # ranged GETs for chunk data
        "chunk_bytes": int(store["bytes"]),
        "chunks_fetched": int(store["hits"]),
        "store_wait_seconds": round(float(store["seconds"]), 4),  # summed over requests, overlaps counted twice
        "all_gets": int(reqs.get("gets", 0)),  # chunk GETs + metadata GETs (manifest, image, chunk map)
        "all_get_bytes": int(reqs.get("bytes_read", 0)),
        "disk_hits": int(disk.get("hits", 0)),
        "memory_hits": int(stats["tiers"]["memory"]["hits"]),
        "fuse_reads": int(stats["reads"]),
        "fuse_read_bytes": int(stats["read_bytes"]),
    }


def metadata_seconds(cache_dir: Path) -> float | None:
    """'metadata loaded in X s' from the newest mount log line, if present."""
    found = None
    for log_file in sorted((cache_dir / "logs").glob("mount-*.log")):
        for m in re.finditer(r"metadata loaded in ([0-9.]+)s", log_file.read_text(errors="replace")):
            found = float(m.group(1))
    return found


def proxy_window(ctx: Ctx, since: float, until: float) -> dict[str, Any] | None:
    """Requests the proxy saw between two monotonic instants (None in direct mode)."""
    if ctx.proxy is None:
        return None
    snap = ctx.proxy.snapshot()
    snap.requests = [r for r in snap.requests if since <= r.start <= until]
    return summarize(snap)


def request_log(ctx: Ctx, since: float, until: float) -> list[dict[str, Any]] | None:
    """Every request the proxy saw in a window, times in ms from ``since``: for finding sequential misses."""
    if ctx.proxy is None:
        return None
    return [
        {"t_ms": round(1000 * (r.start - since), 2), "server_ms": round(1000 * (r.first_response - r.forwarded), 2)
         if r.first_response else None, "end_ms": round(1000 * (r.end - since), 2), "conn": r.conn,
         "request": r.line, "range": r.range, "bytes_down": r.bytes_down}
        for r in ctx.proxy.snapshot().requests if since <= r.start <= until
    ]


def forget_trace(ctx: Ctx) -> None:
    """No trace anywhere: a first start of the image (mounts publish one by themselves)."""
    if ctx.client is not None and ctx.trace_key and not ctx.args.trace:
        with contextlib.suppress(Exception):
            ctx.client.delete(BUCKET, ctx.trace_key)


def lazy_sample(ctx: Ctx, i: int) -> dict[str, Any]:
    """Cold mount + run on an empty cache, warm runs, then a remount on the warm disk cache;
    then a later start on another empty cache, which prefetches the trace the first published."""
    mnt = ctx.workdir / f"mnt-{ctx.mode}-{i}"
    cache_dir = ctx.workdir / f"cache-{ctx.mode}-{i}"
    cache_dir.mkdir(parents=True)
    out: dict[str, Any] = {}
    forget_trace(ctx)

    if ctx.args.trace:
        out.update(variant_sample(ctx, i, "trace", ()))
    if ctx.args.peer_address:
        out.update(variant_sample(ctx, i, "peer", ("--peers", ctx.args.peer_address, "--no-prefetch")))
    drop_caches()
    m0 = time.monotonic()
    mount_s = mount(ctx, mnt, cache_dir, ("--no-prefetch",) if ctx.args.trace else ())
    m1 = time.monotonic()
    run_s = run_in(mnt, ctx.cmd)
    m2 = time.monotonic()
    out["cold_mount_s"] = mount_s
    out["cold_run_s"] = run_s
    out["cold_total_s"] = mount_s + run_s
    out["cold_metadata_s"] = metadata_seconds(cache_dir)
    out["cold_proxy_mount"] = proxy_window(ctx, m0, m1)
    out["cold_proxy_run"] = proxy_window(ctx, m1, m2)
    out["cold_proxy_total"] = proxy_window(ctx, m0, m2)
    out["cold_store"] = sample_stats(ctx, mnt)
    out["cold_requests"] = request_log(ctx, m0, m2)
    if out["cold_requests"]:
        # Local start-up cost of the mount: nothing crosses the wire before the daemon has imported its
        # libraries; metadata_done is when the image and chunk map GETs have both finished.
        meta = [q for q in out["cold_requests"] if any(f"/{k}/" in q["request"] for k in ("images", "chunkmaps"))]
        out["cold_first_request_s"] = out["cold_requests"][0]["t_ms"] / 1000
        out["cold_metadata_done_s"] = max(q["end_ms"] for q in meta) / 1000 if meta else None

    warm = [run_in(mnt, ctx.cmd) for _ in range(WARM_RUNS)]
    out["warm_run_s"] = statistics.median(warm)
    out["warm_runs"] = warm
    time.sleep(0.2)  # let background read-ahead land in the disk cache before reading the final counters
    out["after_warm_store"] = sample_stats(ctx, mnt)
    ctx.cleanup.umount(mnt)

    drop_caches()
    w0 = time.monotonic()
    mount_s = mount(ctx, mnt, cache_dir, ("--no-prefetch",) if ctx.args.trace else ())
    run_s = run_in(mnt, ctx.cmd)
    w1 = time.monotonic()
    out["warmdisk_mount_s"] = mount_s
    out["warmdisk_run_s"] = run_s
    out["warmdisk_total_s"] = mount_s + run_s
    out["warmdisk_proxy"] = proxy_window(ctx, w0, w1)
    out["warmdisk_store"] = sample_stats(ctx, mnt)
    ctx.cleanup.umount(mnt)
    if not ctx.args.trace:
        out.update(variant_sample(ctx, i, "later", ()))
    return out


def first_start(ctx: Ctx, name: str, i: int, extra: tuple[str, ...]) -> dict[str, Any]:
    """One first start (no trace anywhere, empty cache, caches dropped) with ``extra`` mount options:
    seconds, store counters, and the proxy's sequential chain (what +N ms multiplies)."""
    mnt = ctx.workdir / f"mnt-{name}-{ctx.mode}-{i}"
    cache_dir = ctx.workdir / f"cache-{name}-{ctx.mode}-{i}"
    cache_dir.mkdir(parents=True)
    forget_trace(ctx)
    drop_caches()
    m0 = time.monotonic()
    mount_s = mount(ctx, mnt, cache_dir, extra)
    run_s = run_in(mnt, ctx.cmd)
    m1 = time.monotonic()
    proxy = proxy_window(ctx, m0, m1)
    time.sleep(0.5)  # background fetches started by the run land: they count in its bytes
    store = sample_stats(ctx, mnt)
    ctx.cleanup.umount(mnt)
    return {"total_s": mount_s + run_s, "mount_s": mount_s, "run_s": run_s, "store": store,
            "chain": proxy["max_sequential_chain"] if proxy else None,
            "fetched_over_read": store["chunk_bytes"] / max(1, store["fuse_read_bytes"])}


def run_variants(ctx: Ctx, client: LayerClient) -> dict[str, Any]:
    """``--variants``: first starts only, each variant's mount options in turn within every round
    (the order reversed every other round), one full pull per round; each first start over its
    round's pull.  Before/after pairs measured alternated, in one run, on one build."""
    variants = [(n.strip(), tuple(shlex.split(a))) for n, _, a in
                (v.partition("=") for v in ctx.args.variants.split(";")) if n.strip()]
    rounds: list[dict[str, Any]] = []
    for i in range(ctx.args.repeat):
        t0 = time.monotonic()
        order = variants if i % 2 == 0 else variants[::-1]
        got = {name: first_start(ctx, name, i, extra) for name, extra in order}
        pull = pull_sample(ctx, client, i)
        for g in got.values():
            g["over_pull"] = g["total_s"] / pull["pull_total_s"]
        rounds.append({"pull": pull, "variants": got})
        log(f"  {ctx.mode} round {i + 1}/{ctx.args.repeat} [{time.monotonic() - t0:.0f} s, load "
            f"{os.getloadavg()[0]:.1f}]: pull {pull['pull_total_s']:.2f} s; " + "; ".join(
                f"{n} {g['total_s']:.2f} s ({g['over_pull']:.2f}x), chain {g['chain']}, "
                f"{g['store']['chunk_requests']} GETs, {g['fetched_over_read']:.2f}x read" for n, g in got.items()))
    out: dict[str, Any] = {"rounds": rounds, "variants": {}}
    for name, extra in variants:
        gs = [r["variants"][name] for r in rounds]

        def med(f: Callable[[dict[str, Any]], Any], gs: list[dict[str, Any]] = gs) -> Any:
            vals = [f(g) for g in gs if f(g) is not None]
            return statistics.median(vals) if vals else None

        out["variants"][name] = {
            "mount_args": " ".join(extra), "first_over_pull": med(lambda g: g["over_pull"]),
            "first_over_pull_all": [round(g["over_pull"], 3) for g in gs], "first_s": med(lambda g: g["total_s"]),
            "chain": med(lambda g: g["chain"]), "chains": [g["chain"] for g in gs],
            "gets": med(lambda g: g["store"]["chunk_requests"]),
            "fetched_over_read": med(lambda g: g["fetched_over_read"]),
            "fetched_mb": med(lambda g: g["store"]["chunk_bytes"] / 1e6),
            "read_mb": med(lambda g: g["store"]["fuse_read_bytes"] / 1e6),
        }
    out["pull_s"] = statistics.median(r["pull"]["pull_total_s"] for r in rounds)
    return out


def print_variants(name: str, res: dict[str, Any]) -> None:
    print(f"\n== {name}: first starts, variants alternated, {len(res['rounds'])} rounds; "
          f"full pull median {res['pull_s']:.2f} s ==")
    print(f"  {'variant':10} {'first/pull':>10} {'(each round)':28} {'first s':>8} {'chain':>6} {'(each)':16} "
          f"{'GETs':>5} {'fetched/read':>12} {'MB fetched / read':>18}")
    for v, r in res["variants"].items():
        print(f"  {v:10} {r['first_over_pull']:>10.2f} {r['first_over_pull_all']!s:28} {r['first_s']:>8.2f} "
              f"{r['chain'] if r['chain'] is not None else '-':>6} {r['chains']!s:16} {r['gets']:>5.0f} "
              f"{r['fetched_over_read']:>12.2f} {r['fetched_mb']:>8.1f} / {r['read_mb']:.1f}")


def variant_sample(ctx: Ctx, i: int, prefix: str, extra: tuple[str, ...]) -> dict[str, Any]:
    """Cold mount (with ``extra`` options) + run on an empty cache: the trace and peer variants."""
    mnt = ctx.workdir / f"mnt-{prefix}-{ctx.mode}-{i}"
    cache_dir = ctx.workdir / f"cache-{prefix}-{ctx.mode}-{i}"
    cache_dir.mkdir(parents=True)
    drop_caches()
    m0 = time.monotonic()
    mount_s = mount(ctx, mnt, cache_dir, extra)
    run_s = run_in(mnt, ctx.cmd)
    m1 = time.monotonic()
    out = {f"{prefix}_mount_s": mount_s, f"{prefix}_run_s": run_s, f"{prefix}_total_s": mount_s + run_s,
           f"{prefix}_proxy": proxy_window(ctx, m0, m1), f"{prefix}_store": sample_stats(ctx, mnt)}
    ctx.cleanup.umount(mnt)
    return out


def start_peer(args: argparse.Namespace, cmd: list[str], workdir: Path, endpoint: str, store: str,
               cleanup: Cleanup) -> str:
    """A node daemon (``cubefs serve --listen``) whose cache one mount+run has warmed."""
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    logf = open(workdir / "peer.log", "ab")
    proc = subprocess.Popen([*cubefs_argv(), "serve", "--listen", address, "--socket", str(workdir / "peer.sock"),
                             "--cache-dir", str(workdir / "cache-peer"), "--store", store, "--s3-endpoint", endpoint],
                            stdout=logf, stderr=logf, env={**os.environ, **S3_ENV}, start_new_session=True)
    cleanup.peer = proc
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    ctx = Ctx(args, cleanup, workdir, cmd, endpoint, store, None, shlex.split(args.mount_args), "peerwarm")
    mnt = workdir / "mnt-peerwarm"
    cache_dir = workdir / "cache-peerwarm"
    cache_dir.mkdir(parents=True)
    mount(ctx, mnt, cache_dir, ("--peers", address, "--no-prefetch"))
    run_in(mnt, cmd)
    cleanup.umount(mnt)
    return address


def record_trace(args: argparse.Namespace, cmd: list[str], workdir: Path, endpoint: str, store: str,
                 cleanup: Cleanup) -> dict[str, Any]:
    """Mount with --record-trace, run the command once, push the trace."""
    ctx = Ctx(args, cleanup, workdir, cmd, endpoint, store, None, shlex.split(args.mount_args), "record")
    mnt = workdir / "mnt-record"
    cache_dir = workdir / "cache-record"
    cache_dir.mkdir(parents=True)
    drop_caches()
    mount(ctx, mnt, cache_dir, ("--record-trace", "--no-prefetch"))
    run_in(mnt, cmd)
    pushed = json.loads(run([*cubefs_argv(), "trace", "push", str(mnt), "--json"]).stdout)
    cleanup.umount(mnt)
    return dict(pushed)


def pull_sample(ctx: Ctx, client: LayerClient, i: int) -> dict[str, Any]:
    """The classic path: GET the whole layer, decompress + extract, run; then native warm runs."""
    dest = ctx.workdir / f"pull-{ctx.mode}-{i}"
    blob = ctx.workdir / f"layer-{ctx.mode}-{i}.tar.zst"
    out: dict[str, Any] = {}
    try:
        drop_caches()
        p0 = time.monotonic()
        t0 = time.perf_counter()
        data = client.get(BUCKET, LAYER_KEY, ctx.args.layer_bytes, ctx.args.pull_parts)
        with open(blob, "wb") as f:
            f.write(data)
        del data
        t1 = time.perf_counter()
        dest.mkdir()
        with subprocess.Popen(["zstd", "-dcq", str(blob)], stdout=subprocess.PIPE) as unz:
            tar = subprocess.run(["tar", "-xf", "-", "-C", str(dest), "--numeric-owner"], stdin=unz.stdout,
                                 capture_output=True)
            assert unz.stdout is not None
            unz.stdout.close()
            if unz.wait() != 0 or tar.returncode != 0:
                raise RuntimeError(f"extracting the layer failed: {tar.stderr.decode(errors='replace')[-1500:]}")
        t2 = time.perf_counter()
        p1 = time.monotonic()
        run_s = run_in(dest, ctx.cmd)
        out["pull_download_s"] = t1 - t0
        out["pull_extract_s"] = t2 - t1
        out["pull_run_s"] = run_s
        out["pull_total_s"] = t2 - t0 + run_s
        out["pull_proxy"] = proxy_window(ctx, p0, p1)
        native = [run_in(dest, ctx.cmd) for _ in range(WARM_RUNS)]
        out["native_warm_s"] = statistics.median(native)
        out["native_runs"] = native
        drop_caches()  # the extracted tree on local disk, kernel caches dropped: the warm-disk row's peer
        out["native_cold_s"] = run_in(dest, ctx.cmd)
    finally:
        blob.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
    return out


def median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def median_nested(samples: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """Median per field of a dict-valued measurement (store counters, proxy summaries)."""
    dicts = [s[key] for s in samples if s.get(key)]
    if not dicts:
        return None
    return {k: statistics.median(d[k] for d in dicts) for k in dicts[0] if isinstance(dicts[0][k], (int, float))}


def run_mode(ctx: Ctx, client: LayerClient, stored_bytes: int) -> dict[str, Any]:
    """All samples of one mode, interleaving lazy and pull so slow drift hits both alike."""
    samples: list[dict[str, Any]] = []
    for i in range(ctx.args.repeat):
        t0 = time.monotonic()
        s = lazy_sample(ctx, i)
        s.update(pull_sample(ctx, client, i))
        samples.append(s)
        log(f"  {ctx.mode} sample {i + 1}/{ctx.args.repeat}: lazy cold {s['cold_total_s']:.3f} s "
            f"(mount {s['cold_mount_s']:.3f} + run {s['cold_run_s']:.3f}, "
            f"{s['cold_store']['chunk_requests']} chunk GETs), full pull {s['pull_total_s']:.3f} s, "
            f"warm {s['warm_run_s']:.4f} vs native {s['native_warm_s']:.4f} s  [{time.monotonic() - t0:.0f} s]")
    keys = ["cold_mount_s", "cold_run_s", "cold_total_s", "cold_metadata_s", "cold_first_request_s",
            "cold_metadata_done_s", "warm_run_s", "warmdisk_mount_s",
            "warmdisk_run_s", "warmdisk_total_s", "pull_download_s", "pull_extract_s", "pull_run_s",
            "pull_total_s", "native_warm_s", "native_cold_s"]
    if ctx.args.trace:
        keys += ["trace_mount_s", "trace_run_s", "trace_total_s"]
    if ctx.args.peer_address:
        keys += ["peer_mount_s", "peer_run_s", "peer_total_s"]
    if not ctx.args.trace:
        keys += ["later_mount_s", "later_run_s", "later_total_s"]
    med: dict[str, Any] = {k: median_of(samples, k) for k in keys}
    for k in ("cold_store", "after_warm_store", "warmdisk_store", "cold_proxy_mount", "cold_proxy_run",
              "cold_proxy_total", "warmdisk_proxy", "pull_proxy", "trace_proxy", "trace_store", "peer_proxy",
              "peer_store", "later_proxy", "later_store"):
        if all(k in s for s in samples):
            med[k] = median_nested(samples, k)
    ratios = {
        "lazy_cold_over_full_pull": med["cold_total_s"] / med["pull_total_s"],
        "lazy_warm_over_native_warm": med["warm_run_s"] / med["native_warm_s"],
        "warmdisk_over_full_pull": med["warmdisk_total_s"] / med["pull_total_s"],
        "fetched_over_stored": med["cold_store"]["chunk_bytes"] / stored_bytes if stored_bytes else None,
        "fetched_after_warm_over_stored": (med["after_warm_store"]["chunk_bytes"] / stored_bytes
                                           if stored_bytes else None),
    }
    if ctx.args.peer_address:
        ratios["peer_cold_over_cold"] = med["peer_total_s"] / med["cold_total_s"]
    if not ctx.args.trace:
        ratios["later_over_full_pull"] = med["later_total_s"] / med["pull_total_s"]
    ratios["warmdisk_over_native_cold"] = med["warmdisk_total_s"] / med["native_cold_s"]
    if ctx.args.trace:
        ratios["trace_cold_over_cold"] = med["trace_total_s"] / med["cold_total_s"]
        ratios["trace_cold_over_full_pull"] = med["trace_total_s"] / med["pull_total_s"]
    return {"samples": samples, "medians": med, "ratios": ratios,
            "floors": {"lazy_cold_over_full_pull": FLOOR_COLD, "lazy_warm_over_native_warm": FLOOR_WARM}}


# -- report --------------------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def spread(samples: list[dict[str, Any]], key: str) -> str:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return f"{min(vals):.3f}-{max(vals):.3f}" if vals else "-"


def print_mode(name: str, res: dict[str, Any], image: dict[str, Any]) -> None:
    med, samples, ratios = res["medians"], res["samples"], res["ratios"]
    print(f"\n== {name}: medians of {len(samples)} samples (min-max) ==")
    rows = [
        ("lazy cold: cubefs mount", "cold_mount_s"),
        ("lazy cold: chroot run", "cold_run_s"),
        ("lazy cold: total", "cold_total_s"),
        ("lazy warm: run (same mount, page cache)", "warm_run_s"),
        ("lazy warm-disk: remount", "warmdisk_mount_s"),
        ("lazy warm-disk: run", "warmdisk_run_s"),
        ("lazy warm-disk: total", "warmdisk_total_s"),
        ("full pull: download", "pull_download_s"),
        ("full pull: zstd -d | tar -x", "pull_extract_s"),
        ("full pull: chroot run", "pull_run_s"),
        ("full pull: total", "pull_total_s"),
        ("native warm: run", "native_warm_s"),
        ("native, kernel caches dropped: run", "native_cold_s"),
    ]
    if "peer_total_s" in med:
        rows[3:3] = [("lazy cold from a warm peer: cubefs mount", "peer_mount_s"),
                     ("lazy cold from a warm peer: chroot run", "peer_run_s"),
                     ("lazy cold from a warm peer: total", "peer_total_s")]
    if "later_total_s" in med:
        rows[3:3] = [("later start (published trace): mount", "later_mount_s"),
                     ("later start (published trace): run", "later_run_s"),
                     ("later start (published trace): total", "later_total_s")]
    if "trace_total_s" in med:
        rows[3:3] = [("lazy cold + trace prefetch: cubefs mount", "trace_mount_s"),
                     ("lazy cold + trace prefetch: chroot run", "trace_run_s"),
                     ("lazy cold + trace prefetch: total", "trace_total_s")]
    print(f"  {'measurement':42} {'seconds':>9}  {'range':>13}")
    for label, key in rows:
        print(f"  {label:42} {med[key]:>9.4f}  {spread(samples, key):>13}")
    if med.get("cold_metadata_s") is not None:
        print(f"  {'  (mount: metadata load, from mount log)':42} {med['cold_metadata_s']:>9.4f}")
    if med.get("cold_first_request_s") is not None:
        print(f"  {'  (mount: first store request at)':42} {med['cold_first_request_s']:>9.4f}")
        print(f"  {'  (mount: metadata GETs done at)':42} {med['cold_metadata_done_s']:>9.4f}")
    cs, aw, wd = med["cold_store"], med["after_warm_store"], med["warmdisk_store"]
    print("  store traffic (cubefs stats --json, medians)")
    print(f"    lazy cold: {cs['chunk_requests']:.0f} chunk GETs ({cs['chunks_fetched']:.0f} chunks, "
          f"{mb(cs['chunk_bytes'])}), {cs['all_gets']:.0f} GETs in all incl. metadata ({mb(cs['all_get_bytes'])}); "
          f"{cs['fuse_reads']:.0f} FUSE reads ({mb(cs['fuse_read_bytes'])}); "
          f"store wait summed {cs['store_wait_seconds']:.3f} s")
    print(f"    after warm runs (read-ahead landed): {aw['chunk_requests']:.0f} chunk GETs, {mb(aw['chunk_bytes'])}")
    print(f"    warm-disk remount: {wd['chunk_requests']:.0f} chunk GETs, {wd['disk_hits']:.0f} disk hits, "
          f"{wd['all_gets']:.0f} GETs in all")
    if med.get("peer_store"):
        ps = med["peer_store"]
        print(f"    lazy cold from a warm peer: {ps['chunk_requests']:.0f} chunk GETs from the store")
    if med.get("trace_store"):
        ts = med["trace_store"]
        print(f"    lazy cold + trace: {ts['chunk_requests']:.0f} chunk GETs ({mb(ts['chunk_bytes'])})")
    for label, key in (("lazy cold, mount", "cold_proxy_mount"), ("lazy cold, run", "cold_proxy_run"),
                       ("lazy cold, total", "cold_proxy_total"), ("warm-disk mount+run", "warmdisk_proxy"),
                       ("full pull", "pull_proxy"), ("cold + trace, total", "trace_proxy")):
        p = med.get(key)
        if p:
            print(f"    proxy, {label:20}: {p['requests']:.0f} requests on {p['connections_used']:.0f} connections, "
                  f"max sequential chain {p['max_sequential_chain']:.0f}, {p['busy_periods']:.0f} busy periods, "
                  f"busy {p['busy_seconds']:.3f} s, parallelism {p['mean_parallelism']:.2f}, "
                  f"server {p['median_server_ms']:.1f} ms/req, idle gap {p['median_idle_gap_ms']:.1f} ms")
    stored = image["stored_bytes"]
    print("  ratios")
    rc, rw = ratios["lazy_cold_over_full_pull"], ratios["lazy_warm_over_native_warm"]
    print(f"    lazy cold / full pull        {rc:6.3f}   floor <= {FLOOR_COLD}  {'ok' if rc <= FLOOR_COLD else 'FAIL'}")
    print(f"    lazy warm / native warm      {rw:6.3f}   floor <= {FLOOR_WARM}  {'ok' if rw <= FLOOR_WARM else 'FAIL'}")
    print(f"    lazy warm-disk / full pull   {ratios['warmdisk_over_full_pull']:6.3f}")
    rd = ratios["warmdisk_over_native_cold"]
    print(f"    warm-disk / native dropped   {rd:6.3f}   floor <= 1.5 (issue 18)  {'ok' if rd <= 1.5 else 'FAIL'}")
    if "later_over_full_pull" in ratios:
        rl = ratios["later_over_full_pull"]
        print(f"    later start / full pull      {rl:6.3f}   floor <= 0.5 (issue 18)  {'ok' if rl <= 0.5 else 'FAIL'}")
    print(f"    first start / full pull      {rc:6.3f}   floor <= 0.8 (issue 18)  {'ok' if rc <= 0.8 else 'FAIL'}")
    if "peer_cold_over_cold" in ratios:
        rq = ratios["peer_cold_over_cold"]
        print(f"    cold from peer / cold        {rq:6.3f}   floor <= 0.6 (issue 3)  {'ok' if rq <= 0.6 else 'FAIL'}")
    if "trace_cold_over_cold" in ratios:
        rt = ratios["trace_cold_over_cold"]
        print(f"    cold + trace / cold          {rt:6.3f}   floor <= 0.7 (issue 3)  {'ok' if rt <= 0.7 else 'FAIL'}")
        rp = ratios["trace_cold_over_full_pull"]
        print(f"    cold + trace / full pull     {rp:6.3f}   floor < 1 (issue 3)  {'ok' if rp < 1 else 'FAIL'}")
    print(f"    fetched / stored             {ratios['fetched_over_stored']:6.3f}   "
          f"({mb(cs['chunk_bytes'])} of {mb(stored)} during the cold run; "
          f"{ratios['fetched_after_warm_over_stored']:.3f} once read-ahead finished)")


def print_report(result: dict[str, Any]) -> None:
    image, cfg = result["image"], result["config"]
    how = ("forked by the node's mount server (the first mount started it)" if cfg.get("mount_server")
           else "cubefs mount --no-server")
    print(f"cubefs cold-start benchmark: {cfg['cmd']!r} in {cfg['rootfs']}; mounts: {how}")
    print(f"  image {image['ref']}: {image['files']} files, {mb(image['logical_bytes'])} logical, "
          f"{mb(image['stored_bytes'])} stored in {image['packs']} packs, {image['unique_chunks']} chunks; "
          f"layer {mb(result['layer_bytes'])} (tar | zstd -3)")
    b = result["build"]
    print(f"  build throughput (fresh bucket, input in page cache): median {b['median_mb_per_s']:.1f} MB/s "
          f"of input; samples {', '.join(f'{x:.1f}' for x in b['mb_per_s'])} MB/s "
          f"({mb(b['logical_bytes'])} in {', '.join(f'{x:.1f}' for x in b['seconds'])} s)")
    for res in result["modes"].values():
        if "variants" in res:
            print_variants(res["label"], res)
        else:
            print_mode(res["label"], res, image)
    print(f"\ntotal benchmark time {result['elapsed_s']:.0f} s")


# -- main ----------------------------------------------------------------------------------------------------


def preflight(rootfs: Path, cmd: list[str]) -> None:
    """Fail fast, with a fix, on what would otherwise fail minutes in."""
    if os.geteuid() != 0:
        raise SystemExit("coldstart: run as root (chroot, FUSE allow_other, drop_caches)")
    for tool in ("chroot", "tar", "zstd", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"coldstart: {tool!r} not found on PATH")
    if not rootfs.is_dir():
        raise SystemExit(f"coldstart: no root filesystem at {rootfs}; make one with\n"
                         f"  python3 tools/make_rootfs.py {rootfs} --include=python3")
    res = subprocess.run(["chroot", str(rootfs), *cmd], capture_output=True, text=True, env=CHROOT_ENV)
    if res.returncode != 0:
        raise SystemExit(f"coldstart: the command fails natively in {rootfs} (exit {res.returncode}: "
                         f"{res.stderr.strip()[-300:]}).\nA python3-minimal tree has no 'json'; make a tree with "
                         f"the full stdlib:\n  python3 tools/make_rootfs.py /var/tmp/cubefs-test/rootfs-py3 "
                         f"--include=python3")


def make_layer(rootfs: Path, path: Path) -> int:
    """``tar -C ROOTFS -cf - . | zstd -3`` into ``path``; returns its size."""
    with open(path, "wb") as out, subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE
    ) as tar:
        z = subprocess.run(["zstd", "-3", "-q", "-c"], stdin=tar.stdout, stdout=out)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or z.returncode != 0:
            raise RuntimeError("making the tar.zst layer failed")
    return path.stat().st_size


def build_image(rootfs: Path, endpoint: str, bucket: str, ref: str) -> dict[str, Any]:
    res = run([*cubefs_argv(), "build", str(rootfs), "--tag", ref, "--store", f"s3://{bucket}",
                               "--s3-endpoint", endpoint, "--json", "--no-progress"], timeout=900)
    return dict(json.loads(res.stdout))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", type=Path, default=Path(DEFAULT_ROOTFS),
                    help=f"root filesystem to image (default {DEFAULT_ROOTFS}, or $CUBEFS_BENCH_ROOTFS)")
    ap.add_argument("--cmd", default=DEFAULT_CMD, help=f"command run in the chroot (default {DEFAULT_CMD!r})")
    ap.add_argument("--repeat", "-n", type=int, default=5, help="samples per measurement (default 5)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="per-request delay of the delayed mode (default 10)")
    ap.add_argument("--connect-delay-ms", type=float, default=0.0,
                    help="extra delay per new TCP connection in the delayed mode (default 0)")
    ap.add_argument("--only", choices=("direct", "delay"), help="run one mode only (default: both)")
    ap.add_argument("--build-repeats", type=int, default=3,
                    help="builds into fresh buckets for the throughput figure, the benchmark image's included "
                    "(default 3)")
    ap.add_argument("--no-server", action="store_true",
                    help="mount with 'cubefs mount --no-server', every daemon paying its own interpreter start-up; "
                    "the default is what a node gets: the first mount starts the node's mount server, which "
                    "forks the daemons of all later ones")
    ap.add_argument("--trace", action="store_true",
                    help="also record the command's trace once (--record-trace, trace push) and measure cold "
                    "starts that prefetch it; plain cold starts then run with --no-prefetch")
    ap.add_argument("--peer", action="store_true",
                    help="also run a node daemon (cubefs serve --listen) with a warm cache and measure cold starts "
                    "of fresh mounts that ask it (--peers) before the store")
    ap.add_argument("--image", default=None,
                    help="one of issue 18's images (tools/bench/images.py: deb-python, deb-numpy, py-pandas, "
                    "deb-node): its tree and command, made if missing")
    ap.add_argument("--pull-parts", type=int, default=3,
                    help="parallel ranged GETs of the full pull's layer (default 3, as a registry client)")
    ap.add_argument("--mount-args", default="", help="extra 'cubefs mount' options, e.g. '--readahead 8M'")
    ap.add_argument("--variants", default="",
                    help="first starts only, alternated: 'NAME=MOUNT OPTIONS;NAME=...' (e.g. 'off=--hot-pack 0;"
                         "hot=--hot-pack 2'), each variant once per round, one full pull per round")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (mount logs, caches, weed log)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON results to this file")
    return ap.parse_args(argv)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM (and SIGHUP unless ignored, as under nohup) become KeyboardInterrupt, so ``finally`` blocks
    clean up as on Ctrl-C.  SIGINT keeps Python's handler (it is ignored in background jobs of a
    non-interactive shell; stop those with SIGTERM)."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.image:
        from images import by_name, make

        chosen = by_name(args.image)
        args.rootfs, args.cmd = make(chosen), chosen.cmd
    cmd = shlex.split(args.cmd)
    preflight(args.rootfs, cmd)
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cubefs-coldstart-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    cleanup = Cleanup(workdir=workdir, keep=args.keep)
    with signals_raise():
        try:
            result = benchmark(args, cmd, workdir, cleanup)
        except KeyboardInterrupt:
            log("interrupted; cleaning up")
            return 130
        finally:
            cleanup.close()
    result["elapsed_s"] = time.monotonic() - started
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0


def benchmark(args: argparse.Namespace, cmd: list[str], workdir: Path, cleanup: Cleanup) -> dict[str, Any]:
    log(f"work directory {workdir}; starting SeaweedFS")
    server = cleanup.server = start_s3_server(workdir / "weed")
    client = LayerClient(server.endpoint)
    store = f"s3://{BUCKET}"

    log("making the tar.zst layer")
    layer = workdir / "layer.tar.zst"
    layer_bytes = args.layer_bytes = make_layer(args.rootfs, layer)  # also warms the page cache for the builds
    log(f"uploading the layer ({mb(layer_bytes)})")
    client.put(BUCKET, LAYER_KEY, layer.read_bytes())
    layer.unlink()
    os.environ["CUBEFS_SERVER"] = str(workdir / "serve.sock")  # this run's own server, not the node's
    if args.no_server:
        args.mount_args = f"{args.mount_args} --no-server"

    builds = []
    for i in range(max(1, args.build_repeats)):
        bucket = BUCKET if i == 0 else f"build-{i}"
        log(f"cubefs build into fresh bucket s3://{bucket}")
        builds.append(build_image(args.rootfs, server.endpoint, bucket, REF))
    image = dict(json.loads(run([*cubefs_argv(), "inspect", REF, "--store", store, "--s3-endpoint",
                                                 server.endpoint, "--json"]).stdout))
    args.peer_address = start_peer(args, cmd, workdir, server.endpoint, store, cleanup) if args.peer else None
    if args.peer:
        log(f"peer node daemon on {args.peer_address}, cache warmed by one run")
    if args.trace:
        pushed = record_trace(args, cmd, workdir, server.endpoint, store, cleanup)
        log(f"recorded and pushed a trace: {pushed['chunks']} chunks, {mb(pushed['stored_bytes'])} stored")
    result: dict[str, Any] = {
        "config": {"rootfs": str(args.rootfs), "cmd": args.cmd, "repeat": args.repeat, "delay_ms": args.delay_ms,
                   "mount_server": not args.no_server,
                   "connect_delay_ms": args.connect_delay_ms, "mount_args": args.mount_args,
                   "variants": args.variants, "trace": args.trace,
                   "peer": args.peer,
                   "warm_runs_per_sample": WARM_RUNS, "cpus": os.cpu_count()},
        "image": image,
        "layer_bytes": layer_bytes,
        "build": {
            "mb_per_s": [b["mb_per_s"] for b in builds],
            "seconds": [b["seconds"] for b in builds],
            "logical_bytes": builds[0]["logical_bytes"],
            "median_mb_per_s": statistics.median(b["mb_per_s"] for b in builds),
            "runs": builds,
        },
        "modes": {},
    }

    modes: list[tuple[str, str, Callable[[], DelayProxy | None]]] = []
    if args.only in (None, "direct"):
        modes.append(("direct", "direct (loopback)", lambda: None))
    if args.only in (None, "delay"):
        host, port = server.hostport

        def make_proxy() -> DelayProxy:
            proxy = DelayProxy(host, port, args.delay_ms, connect_delay_ms=args.connect_delay_ms).start()
            cleanup.proxies.append(proxy)
            return proxy

        label = f"through delayproxy, +{args.delay_ms:g} ms per request"
        if args.connect_delay_ms:
            label += f", +{args.connect_delay_ms:g} ms per connection"
        modes.append((f"delay{args.delay_ms:g}ms", label, make_proxy))

    for name, label, make in modes:
        proxy = make()
        endpoint = proxy.endpoint if proxy else server.endpoint
        log(f"mode {label}: {args.repeat} samples via {endpoint}")
        mode_client = LayerClient(endpoint)
        ctx = Ctx(args, cleanup, workdir, cmd, endpoint, store, proxy, shlex.split(args.mount_args), name,
                  client, f"traces/{str(image['image']).removeprefix('sha256:')}")
        res = (run_variants(ctx, mode_client) if args.variants
               else run_mode(ctx, mode_client, int(image["stored_bytes"])))
        res["label"] = label
        res["endpoint_kind"] = "proxy" if proxy else "direct"
        result["modes"][name] = res
        if proxy is not None:
            proxy.stop()
            cleanup.proxies.remove(proxy)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
