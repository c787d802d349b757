"""Every file cubefs creates that holds image data or metadata is its owner's only
(issue 12, part 2: the disk cache's data.mdb was 0644 in 0755 directories and
an unprivileged user decoded /etc/shadow of an image out of it).

A fresh node under umask 022, all of it real: a build into a ``file://`` store,
a mount with its disk cache and a pushed trace, a volume written through its
mount, ``cubefs serve --listen`` with its own cache and secret.  Then every file
and directory under every directory cubefs made is checked for group/other
bits, and user ``nobody`` tries the cache and the peer port."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports, mounted, run_cubefs

from cubefs.node import control

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SHADOW = b"root:$y$j9T$not.a.real.hash:19700:0:99999:7:::\n"


@pytest.fixture
def open_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A base directory anyone may enter (pytest's own tmp is root's only, which would
    hide what cubefs itself does), a umask of 022, and cubefs's dirs pointed into it."""
    base = Path(tempfile.mkdtemp(prefix="cubefs-private-"))
    base.chmod(0o755)
    old = os.umask(0o022)
    monkeypatch.setenv("CUBEFS_VOLUME_DIR", str(base / "volumes"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    monkeypatch.delenv("CUBEFS_PEER_SECRET_FILE", raising=False)
    try:
        yield base
    finally:
        os.umask(old)
        shutil.rmtree(base, ignore_errors=True)


def _open_to_others(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                bad.append(f"{path} {stat.filemode(mode)}")
    return bad


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "cubefs serve did not come up"
            time.sleep(0.1)


ATTACK = """
import socket, sys
try:
    open(sys.argv[2], "rb")
    print("read the secret")
except OSError as err:
    print("secret:", err.strerror)
digest = bytes.fromhex(sys.argv[3])
body = digest + bytes(32) + bytes(8) + len(sys.argv[4]).to_bytes(4, "little") * 2 + bytes(1)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(("POST /v1/chunks HTTP/1.1\\r\\ncontent-length: %d\\r\\n\\r\\n" % len(body)).encode() + body)
out = b""
while True:
    part = s.recv(65536)
    if not part:
        break
    out += part
print("answer:", out.split(b"\\r\\n")[0].decode(), "shadow" if sys.argv[4].encode() in out else "nothing")
"""


def test_a_fresh_node_under_umask_022_keeps_everything_private(open_base: Path) -> None:
    import hashlib

    base = open_base
    src = base / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "shadow").write_bytes(SHADOW)
    (src / "data").write_bytes(os.urandom(300_000))
    store = f"file://{base / 'store'}"
    run_cubefs("build", str(src), "--tag", "app:1", "--store", store)

    # A mount with its disk cache, recording and pushing a trace.
    mnt = base / "mnt"
    with mounted("app:1", mnt, store, base / "cache", "--record-trace"):
        assert (mnt / "etc" / "shadow").read_bytes() == SHADOW
        (mnt / "data").read_bytes()
        run_cubefs("trace", "push", str(mnt))
        registry = [control.registry_path(str(mnt)), control.socket_path(str(mnt))]
        for path in registry:
            if os.path.exists(path):
                assert not os.stat(path).st_mode & 0o077, path
        assert not os.stat(os.path.dirname(registry[0])).st_mode & 0o077
    assert any((base / "store" / "traces").iterdir())

    # A volume, written through its mount.
    run_cubefs("volume", "create", "box", "--from", "app:1", "--store", store)
    (base / "vol").mkdir()
    run_cubefs("mount", "--volume", "box", str(base / "vol"), "--cache-dir", str(base / "cache"), timeout=120)
    try:
        (base / "vol" / "note").write_bytes(b"private" * 1000)
        os.sync()
    finally:
        run_cubefs("umount", str(base / "vol"), timeout=60)

    # A node daemon: its own cache (warmed through the peer port) and a secret it creates.
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "cubefs", "serve", "--listen", str(port), "--socket",
                             str(base / "serve.sock"), "--cache-dir", str(base / "node-cache"), "--store", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, proc)
        with mounted("app:1", base / "mnt2", store, base / "cache2", "--peers", f"127.0.0.1:{port}"):
            assert (base / "mnt2" / "etc" / "shadow").read_bytes() == SHADOW

        secret = base / "config" / "cubefs" / "peer-secret"
        data = base / "node-cache" / "chunks.lmdb" / "data.mdb"
        assert secret.exists() and data.exists()

        bad = []
        for root in ("store", "cache", "cache2", "node-cache", "volumes", "config"):
            assert (base / root).exists(), root
            bad += _open_to_others(base / root)
        assert bad == [], "\n".join(bad)

        # User nobody: neither the caches' files nor the peer port.
        for f in (data, base / "cache" / "chunks.lmdb" / "data.mdb", secret):
            res = subprocess.run([*NOBODY, "cat", str(f)], capture_output=True)
            assert res.returncode != 0 and b"Permission denied" in res.stderr, (f, res)
        res = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", ATTACK, str(port), str(secret),
                              hashlib.sha256(SHADOW).hexdigest(), SHADOW.decode()],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["secret: Permission denied", "answer: HTTP/1.1 401 Unauthorized nothing"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
