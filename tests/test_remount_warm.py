"""A daemon kept ready does ahead what a fresh daemon's first requests paid (issue 18, an image
already on the node): its heap mapped and kept, the image's attributes built; it does so at the
node's lowest CPU share, and serves at the usual one."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import mounted, run_cubefs
from test_remount import _nice, _read_all, _server_log, _size, _tree, _wait_for


def test_a_daemons_freed_heap_stays_mapped() -> None:
    """A READ from the hot file allocates a buffer per chunk (~70 KB, 1 MiB a request), replies
    and frees them; a daemon must not take a page fault per 4 KiB of them at every READ (glibc
    gave the top of its heap back at each free: ~3,900 faults for 20 such READs), nor in a worker
    thread (a new malloc arena of its own)."""
    code = textwrap.dedent("""
        import threading
        from cubefs.fuse.kernel import keep_freed_heap
        def faults():
            return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
        def reads():
            for _ in range(20):
                bufs = [bytearray(70_000) for _ in range(15)]
                del bufs
        assert keep_freed_heap()
        [bytearray(70_000) for _ in range(15)]  # the first READ maps the heap it needs
        before = faults()
        reads()
        on_loop = faults() - before
        before = faults()
        t = threading.Thread(target=reads)  # a READ that waits: read in a worker thread
        t.start()
        t.join()
        print(on_loop, faults() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    on_loop, in_thread = map(int, out.split())
    assert on_loop < 100, out
    assert in_thread < 100, out  # the same heap, not a new arena faulted in again


def test_attributes_built_ahead_are_the_ones_served(tmp_path: Path, local_store: str) -> None:
    """The attributes a daemon kept ready built before its request are byte for byte what it
    would have built at each LOOKUP, for every inode, and the server it makes takes them."""
    from cubefs.fuse import server
    from cubefs.image.catalog import CachingReader, MetadataCache, load_for_mount, load_manifest
    from cubefs.image.fs import ImageFS
    from cubefs.remote import make_store

    src = tmp_path / "src"
    _tree(src, 3)
    os.symlink("d0/f0", src / "link")
    os.mkfifo(src / "fifo")
    run_cubefs("build", str(src), "--tag", "aa:1", "--store", local_store)
    async def load() -> tuple[Any, Any, list[int]]:
        reader = CachingReader(make_store(local_store), MetadataCache(str(tmp_path / "c")))
        return await load_for_mount(reader, await load_manifest(reader, "aa:1"))  # type: ignore[arg-type]

    image, chunkmap, _trace = asyncio.run(load())
    steps = list(server.attrs_ahead(ImageFS(image, chunkmap, None, ""), step=0))  # type: ignore[arg-type]
    assert steps[-1] == len(image) and len(steps) > 1  # a step of no time: one inode a step
    ahead = server.FuseServer(ImageFS(image, chunkmap, None, ""))  # type: ignore[arg-type]
    assert len(ahead._attrs) == len(image)  # taken, not built again
    fresh = server.FuseServer(ImageFS(image, chunkmap, None, ""))  # type: ignore[arg-type]
    assert len(fresh._attrs) == 0  # a second server of the image builds its own
    kinds = set()
    for ino in range(1, len(image) + 1):
        assert ahead._attr(ino) == fresh._attr(ino), ino
        kinds.add(stat.S_IFMT(image.record(ino)[0]))
    assert {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFIFO} <= kinds


def _autogroup_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])


def test_a_kept_daemon_warms_up_and_serves_at_the_usual_priority(tmp_path: Path, local_store: str) -> None:
    """The spare reports again once warmed up (its memory then counts what it built); the
    daemon it becomes serves the right attributes and bytes, every thread and its session's
    autogroup at the server's priority (it prepared at nice 19, its autogroup too)."""
    src = tmp_path / "src"
    files = _tree(src, 4)
    run_cubefs("build", str(src), "--tag", "kw:1", "--store", local_store)
    cache, log = tmp_path / "cache", _server_log()
    start = _size(log)
    with mounted("kw:1", tmp_path / "mnt", local_store, cache):
        text = _wait_for("for kw:1 ready (", log, start)
        # prepared, then warmed: a second report
        text = _wait_for("for kw:1 ready (", log, start + text.index("for kw:1 ready (") + 20)
    with mounted("kw:1", tmp_path / "mnt2", local_store, cache) as m:
        for rel in files:
            got, want = os.stat(m.mountpoint / rel), os.stat(src / rel)
            assert (got.st_mode, got.st_size, got.st_mtime_ns, got.st_uid) == \
                (want.st_mode, want.st_size, want.st_mtime_ns, want.st_uid), rel
        _read_all(m.mountpoint, files)
        st = m.stats()
        assert f"forked mount daemon {st['pid']} for kw:1 at {tmp_path / 'mnt2'} (a daemon kept ready)" \
            in log.read_text()
        if os.geteuid() == 0 and os.path.exists(f"/proc/{st['pid']}/autogroup"):
            assert {_nice(st["pid"], t) for t in os.listdir(f"/proc/{st['pid']}/task")} == {os.nice(0)}
            assert _autogroup_nice(st["pid"]) == 0


def test_a_spare_warming_up_takes_a_request_on_a_high_descriptor() -> None:
    """A node of hundreds of mounts: the link a spare is handed its request on has the mount
    server's descriptor number, past 1024 (select(2) refuses those: the spare died with the
    request in its link, and that mount failed); and a warm-up step that raises stops the
    warm-up, never the spare."""
    import json
    import resource
    import socket
    import threading
    from types import SimpleNamespace

    from cubefs.node.spare import wait_for_request

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    high = os.dup2(ours.fileno(), 2000)
    ours.close()
    r, w = os.pipe()
    try:
        def endless() -> Any:
            while True:
                yield

        def failing() -> Any:
            yield
            raise ValueError("a damaged record")

        for warm in (endless(), failing()):
            sender = threading.Timer(0.2, lambda: socket.send_fds(theirs, [json.dumps({"ref": "x:1"}).encode()], [r]))
            sender.start()
            got = wait_for_request(high, SimpleNamespace(warm=warm, lowered=None))  # type: ignore[arg-type]
            sender.join()
            assert got is not None and got[0] == {"ref": "x:1"}
            os.close(got[1])
    finally:
        os.close(high)
        theirs.close()
        os.close(r)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
