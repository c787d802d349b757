"""The warm mount server: `cubefs mount` hands the daemon start to `cubefs serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import S3_ENV, run_cubefs


def _start_server(sock: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--socket", str(sock)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


def test_mounts_through_the_server_and_without_it(tmp_path: Path, local_store: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"hello from the mount server\n")
    run_cubefs("build", str(src), "--tag", "srv:1", "--store", local_store)
    sock = tmp_path / "serve.sock"
    server = _start_server(sock, tmp_path / "serve.log")
    env = {"CUBEFS_SERVER": str(sock)}
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        run_cubefs("mount", "srv:1", str(mnt), "--store", local_store, "--cache-dir", str(tmp_path / "c"), env=env)
        try:
            assert (mnt / "hello").read_bytes() == b"hello from the mount server\n"
            daemon_pid = json.loads(run_cubefs("stats", str(mnt), "--json").stdout)["pid"]
            assert daemon_pid != server.pid
            assert f"forked mount daemon {daemon_pid}" in (tmp_path / "serve.log").read_text()
        finally:
            run_cubefs("umount", str(mnt))
        # Errors come back with their exit code and one line, as from a local start.
        res = run_cubefs("mount", "nope:1", str(mnt), "--store", local_store, "--cache-dir", str(tmp_path / "c"),
                         env=env, check=False)
        assert res.returncode == 3 and "nope:1 not found" in res.stderr
        assert not os.path.ismount(mnt)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # The server removed its socket.  One killed leaves its socket behind: the
    # next mount starts a fresh server there, as it does when there is none.
    assert not sock.exists()
    killed = _start_server(sock, tmp_path / "serve2.log")
    killed.kill()
    killed.wait()
    assert sock.exists()
    (tmp_path / "mnt3").mkdir()
    run_cubefs("mount", "srv:1", str(tmp_path / "mnt3"), "--store", local_store, "--cache-dir",
               str(tmp_path / "c3"), env=env)
    try:
        assert (tmp_path / "mnt3" / "hello").exists()
        started = int((tmp_path / "serve.sock.lock").read_text())
        assert started != killed.pid
        assert "mount server listening" in (tmp_path / "serve.sock.log").read_text()
    finally:
        run_cubefs("umount", str(tmp_path / "mnt3"))
        _stop_auto_server(sock)


def _stop_auto_server(sock: Path) -> None:
    pid = int(Path(f"{sock}.lock").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while sock.exists():
        assert time.monotonic() < deadline, "the mount server did not stop on SIGTERM"
        time.sleep(0.05)


def test_mount_starts_a_server_that_later_mounts_share(tmp_path: Path, local_store: str) -> None:
    """No server: the first mount starts one; the next is forked by that same one and starts
    without a start-up of its own; --no-server starts locally; a client of other code replaces
    the server only when it keeps no mounts alive."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"auto\n")
    run_cubefs("build", str(src), "--tag", "auto:1", "--store", local_store)
    sock = tmp_path / "serve.sock"
    env = {"CUBEFS_SERVER": str(sock)}
    mnts = [tmp_path / f"m{i}" for i in range(4)]
    for m in mnts:
        m.mkdir()

    def mount(i: int, *extra: str) -> int:
        run_cubefs("mount", "auto:1", str(mnts[i]), "--store", local_store, "--cache-dir", str(tmp_path / "c"),
                   *extra, env=env)
        assert (mnts[i] / "f").read_bytes() == b"auto\n"
        return int(json.loads(run_cubefs("stats", str(mnts[i]), "--json").stdout)["pid"])

    try:
        d0 = mount(0)
        server = int(Path(f"{sock}.lock").read_text())
        d1 = mount(1)
        assert int(Path(f"{sock}.lock").read_text()) == server
        log = Path(f"{sock}.log").read_text()
        assert f"forked mount daemon {d0} " in log and f"forked mount daemon {d1} " in log
        # A client of other code, while the installed code is the server's own (an older
        # client): the server keeps the mounts it supervises and goes on serving.
        assert _stale_client(sock) == b"stale\n"
        time.sleep(0.5)
        assert sock.exists() and int(Path(f"{sock}.lock").read_text()) == server
        d2 = mount(2)
        assert f"forked mount daemon {d2} " in Path(f"{sock}.log").read_text()
        d3 = mount(3, "--no-server")
        assert f"forked mount daemon {d3} " not in Path(f"{sock}.log").read_text()
        for m in mnts:
            run_cubefs("umount", str(m))
        # With no mount to keep, a client of other code makes it step down.
        assert _stale_client(sock) == b"stale\n"
        deadline = time.monotonic() + 30
        while sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mount(0)
        assert int(Path(f"{sock}.lock").read_text()) != server
    finally:
        for m in mnts:
            if os.path.ismount(m):
                run_cubefs("umount", str(m))
        _stop_auto_server(sock)


def _stale_client(sock: Path) -> bytes:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(sock))
        client.sendall(json.dumps({"args": {}, "mountpoint": "x", "fingerprint": "other"}).encode() + b"\n")
        return client.recv(64)
    finally:
        client.close()


def test_server_environment_does_not_leak_into_mounts(tmp_path: Path) -> None:
    """The server was started with CUBEFS_STORE pointing at a store that has the image;
    a client without CUBEFS_STORE must get its own default store (where it is not)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    server_store = f"file://{tmp_path / 'server-store'}"
    run_cubefs("build", str(src), "--tag", "leak:1", "--store", server_store)
    sock = tmp_path / "serve.sock"
    proc = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--socket", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **S3_ENV, "CUBEFS_STORE": server_store})
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "CUBEFS_STORE"}
        env.update({"CUBEFS_SERVER": str(sock), "HOME": str(tmp_path / "home"), "XDG_DATA_HOME": ""})
        res = subprocess.run([sys.executable, "-m", "cubefs", "mount", "leak:1", str(mnt), "--cache-dir",
                              str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 3, res.stderr
        assert str(tmp_path / "home") in res.stderr
        assert not os.path.ismount(mnt)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
