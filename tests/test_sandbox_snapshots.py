"""Snapshots of running sandboxes, memory and disk at one instant, as the stock E2B SDK takes
them: create from a snapshot, roll back in place, fork, pause and resume.

Each test starts a guest process that counts in its own memory and keeps a file open in the
root: what a user checks is that this process is *still there* afterwards (same pid), that
its counter goes on from the snapshot's value (not from zero, not from the parent's present),
and that the files are the snapshot's.  One service and one template for the module."""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import run_cubefs
from test_sandbox_service import Node, metric, node_in

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

# Counts in RAM, says where it is in /tmp/count (the guest's tmpfs: RAM too), appends to a
# file it holds open in the root, and keeps an unlinked file open whose content it checks.
COUNTER = r"""
import os, sys, time
held = open("/home/user/held.log", "a", buffering=1)
ghost = open("/home/user/ghost", "w+"); ghost.write("still here"); ghost.flush(); os.unlink("/home/user/ghost")
n = 0
while True:
    n += 1
    ghost.seek(0)
    ok = ghost.read() == "still here"
    held.write(f"{n}\n")
    with open("/tmp/count.tmp", "w") as f:
        f.write(f"{os.getpid()} {n} {ok}\n")
    os.replace("/tmp/count.tmp", "/tmp/count")
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def snode(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from node_in(tmp_path_factory.mktemp("snapshots"), rootfs, "--memory", "256")


def counting(sbx: object) -> int:
    """Start the counter in ``sbx``; its pid once it has counted."""
    sbx.files.write("/home/user/counter.py", COUNTER)  # type: ignore[attr-defined]
    sbx.commands.run("python3 /home/user/counter.py", background=True)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = count(sbx)
        if state is not None and state[1] > 3:
            return state[0]
        time.sleep(0.2)
    raise AssertionError("the counter did not start")


def count(sbx: object) -> tuple[int, int, bool] | None:
    out = sbx.commands.run("cat /tmp/count 2>/dev/null || true").stdout  # type: ignore[attr-defined]
    m = re.fullmatch(r"(\d+) (\d+) (True|False)\n", out)
    return (int(m[1]), int(m[2]), m[3] == "True") if m else None


def goes_on(sbx: object, pid: int, low: int) -> int:
    """The counter of ``pid`` runs on in ``sbx`` from at least ``low``, holding its unlinked file,
    and the log it appends to in the root counts 1, 2, 3... with no gap and no repeat: memory
    (the count) and disk (the log) are of one instant."""
    first = count(sbx)
    assert first is not None and first[0] == pid, f"the counting process is gone: {first}"
    assert first[1] >= low, f"the counter went back to {first[1]}, before the snapshot's {low}"
    assert first[2], "the unlinked file the process holds open lost its content"
    time.sleep(0.5)
    later = count(sbx)
    assert later is not None and later[0] == pid and later[1] > first[1], f"the counter stopped: {first} {later}"
    log = [int(x) for x in sbx.commands.run("cat /home/user/held.log").stdout.split()]  # type: ignore[attr-defined]
    assert log == list(range(1, len(log) + 1)) and len(log) >= later[1], f"held.log: {log[:5]}...{log[-5:]}"
    return later[1]


def test_a_snapshot_with_running_processes_makes_sandboxes_that_go_on_from_it(snode: Node) -> None:
    from e2b import Sandbox

    parent = Sandbox.create(timeout=300)
    children = []
    try:
        pid = counting(parent)
        parent.files.write("/home/user/notes.txt", "before the snapshot\n")
        before = count(parent)
        assert before is not None
        info = parent.create_snapshot(name="counting")
        assert info.snapshot_id.startswith("snap-") and "counting" in info.names
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=parent.sandbox_id).next_items()]
        assert listed == [info.snapshot_id]

        # after the snapshot the parent changes a file and loses its process: the child has neither change
        parent.files.write("/home/user/notes.txt", "after the snapshot\n")
        parent.commands.run(f"kill -9 {pid}")

        child = Sandbox.create(info.snapshot_id, timeout=120)
        children.append(child)
        assert child.sandbox_id != parent.sandbox_id
        goes_on(child, pid, before[1])
        assert child.files.read("/home/user/notes.txt") == "before the snapshot\n"
        # the parent went on as it was
        assert parent.files.read("/home/user/notes.txt") == "after the snapshot\n"
        assert parent.commands.run(f"kill -0 {pid} 2>/dev/null || echo gone").stdout == "gone\n"
        # identities differ: hostname (and the RNG: vmgenid)
        ids = [s.commands.run("hostname").stdout for s in (parent, child)]
        assert ids[0] != ids[1]

        # by name too, and after the service restarts
        snode.stop()
        snode.start()
        assert [s.snapshot_id for s in Sandbox.list_snapshots().next_items()] == [info.snapshot_id]
        again = Sandbox.create("counting", timeout=120)
        children.append(again)
        goes_on(again, pid, before[1])

        assert Sandbox.delete_snapshot(info.snapshot_id)
        assert not Sandbox.delete_snapshot(info.snapshot_id)
        assert Sandbox.list_snapshots().next_items() == []
        from e2b import SandboxException

        with pytest.raises(SandboxException):
            Sandbox.create(info.snapshot_id, timeout=60)
        # a sandbox made from a deleted snapshot keeps running: it has its own disk and memory
        assert count(again)[0] == pid  # type: ignore[index]
    finally:
        for s in [parent, *children]:
            s.kill()


def test_rollback_in_place_while_processes_hold_files_open(snode: Node) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    try:
        pid = counting(sbx)
        sbx.files.write("/home/user/doc.txt", "v1\n")
        before = count(sbx)
        info = sbx.create_snapshot()
        sbx.files.write("/home/user/doc.txt", "v2\n")
        sbx.commands.run(f"kill -9 {pid}; rm /home/user/counter.py; touch /home/user/new-file")
        status, body, _ = snode.api("POST", f"/sandboxes/{sbx.sandbox_id}/rollback",
                                    {"snapshotID": info.snapshot_id})
        assert status == 200, body
        assert body["sandboxID"] == sbx.sandbox_id  # type: ignore[index]
        # the same SDK object (same ID, same access token) goes on working
        goes_on(sbx, pid, before[1])  # type: ignore[index]
        assert sbx.files.read("/home/user/doc.txt") == "v1\n"
        assert sbx.commands.run("ls /home/user").stdout.split() == ["counter.py", "doc.txt", "held.log"]
        assert sbx.get_info().state == "running"
        # a snapshot that does not exist: a clear 404, the sandbox untouched
        status, body, _ = snode.api("POST", f"/sandboxes/{sbx.sandbox_id}/rollback", {"snapshotID": "snap-nope"})
        assert status == 404 and "snap-nope" in body["message"]  # type: ignore[index]
        assert count(sbx)[0] == pid  # type: ignore[index]
    finally:
        sbx.kill()
        Sandbox.delete_snapshot(info.snapshot_id)


def guest_ram_mb(sandbox_id: str) -> tuple[float, float]:
    """(resident, of which the QEMU's own copies) MiB of the guest-RAM mapping of a sandbox's QEMU."""
    import subprocess

    pids = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name sbx-{sandbox_id}"], capture_output=True,
                          text=True).stdout.split()
    assert len(pids) == 1, pids
    rss = anon = 0
    in_ram = False
    for line in Path(f"/proc/{pids[0]}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_ram = "memory-backend" in line or line.rstrip().endswith(("/ram", "/ram (deleted)"))
        elif in_ram and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif in_ram and line.startswith("Anonymous:"):
            anon += int(line.split()[1])
    return rss / 1024, anon / 1024


def test_fork_of_a_computing_sandbox_makes_children_that_diverge(snode: Node) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    forks: list = []
    try:
        pid = counting(sbx)
        # 64 MiB the parent holds in memory: its children must share it, not each copy it
        sbx.commands.run("python3 -c 'import os, time; b = os.urandom(64 << 20); open(\"/tmp/held\", \"w\").close(); "
                         "time.sleep(3600)'", background=True)
        while not sbx.files.exists("/tmp/held"):
            time.sleep(0.2)
        before = count(sbx)
        forks = sbx.fork(count=3, timeout=120)
        assert len(forks) == 3 and all(isinstance(f, Sandbox) for f in forks), forks
        assert len({f.sandbox_id for f in forks} | {sbx.sandbox_id}) == 4
        for i, f in enumerate(forks):
            goes_on(f, pid, before[1])  # type: ignore[index]
            f.files.write("/home/user/mine.txt", f"child {i}\n")
        for i, f in enumerate(forks):
            assert f.files.read("/home/user/mine.txt") == f"child {i}\n"
        assert not sbx.files.exists("/home/user/mine.txt")
        identity = {f.commands.run("hostname; head -c 16 /dev/urandom | od -x").stdout
                    for f in [sbx, *forks]}
        assert len(identity) == 4
        assert Sandbox.list_snapshots().next_items() == []  # the fork's own snapshot is gone
        for f in forks:  # each child maps the parent's RAM of that instant: it copies only what it writes
            _rss, own = guest_ram_mb(f.sandbox_id)  # (a load would have copied the 64 MiB into every child)
            assert own < 32, own
        assert count(sbx)[0] == pid  # type: ignore[index]
    finally:
        for f in [sbx, *forks]:
            if isinstance(f, Sandbox):
                f.kill()


def test_pause_and_connect_resume_where_it_was(snode: Node) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    try:
        pid = counting(sbx)
        sbx.pause()
        assert not sbx.is_running()
        assert Sandbox.get_info(sbx.sandbox_id).state == "paused"
        listed = Sandbox.list(query=None).next_items()
        assert sbx.sandbox_id not in [s.sandbox_id for s in listed]  # the default lists running ones
        assert not sbx.pause()  # already paused: 409, which the SDK reads as False
        time.sleep(1.0)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        state = count(resumed)
        assert state is not None and state[0] == pid
        time.sleep(0.5)
        assert count(resumed)[1] > state[1]  # type: ignore[index]
        assert abs(int(resumed.commands.run("date +%s").stdout) - time.time()) < 10  # its clock caught up
    finally:
        sbx.kill()


def test_a_sandbox_paused_at_its_timeout_is_kept_and_resumed_by_traffic(snode: Node) -> None:
    """``lifecycle={"on_timeout": "pause", "auto_resume": True}`` (E2B's autoPause/autoResume):
    at its timeout the sandbox is paused, not killed (it was killed, with its files, before);
    an SDK call to it resumes it where it was, for the timeout it was made with.  Without
    auto_resume it stays paused until connect().  Bad combinations are refused."""
    from e2b import Sandbox

    auto = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": True})
    kept = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause"})
    try:
        pids = [counting(s) for s in (auto, kept)]
        for s in (auto, kept):
            s.set_timeout(2)
        info = Sandbox.get_info(auto.sandbox_id)
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}, info.lifecycle
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(Sandbox.get_info(s.sandbox_id).state != "paused"
                                                  for s in (auto, kept)):
            time.sleep(0.5)
        assert [Sandbox.get_info(s.sandbox_id).state for s in (auto, kept)] == ["paused", "paused"]
        state = count(auto)  # through the proxy to its envd: resumed by that request
        assert state is not None and state[0] == pids[0], state
        info = Sandbox.get_info(auto.sandbox_id)
        assert info.state == "running" and 200 < (info.end_at - datetime.now(UTC)).total_seconds() <= 301
        assert not kept.is_running()  # no auto_resume: it waits for connect()
        assert count(Sandbox.connect(kept.sandbox_id, timeout=120)) is not None
        # traffic without the sandbox's token does not wake it, nor does any undo a pause asked for
        auto.set_timeout(2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and Sandbox.get_info(auto.sandbox_id).state != "paused":
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{snode.proxy_port}/health",
                                     headers={"E2b-Sandbox-Id": auto.sandbox_id, "E2b-Sandbox-Port": "49983"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        assert refused.value.code == 502 and Sandbox.get_info(auto.sandbox_id).state == "paused"
        Sandbox.connect(auto.sandbox_id, timeout=120).pause()
        with pytest.raises(Exception):  # noqa: B017  # the SDK's "not running": envd is not reached
            auto.commands.run("true", request_timeout=30)
        assert Sandbox.get_info(auto.sandbox_id).state == "paused"
        assert metric(snode, "cubefs_sandbox_auto_paused_total") == 3
        assert metric(snode, "cubefs_sandbox_auto_resumed_total") == 1
    finally:
        auto.kill()
        kept.kill()
    with pytest.raises(Exception, match="filesystem"):  # the SDK refuses it before asking
        Sandbox.create(timeout=8, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"},
                                             "auto_resume": True})
    status, doc, _ = snode.api("POST", "/sandboxes", {"templateID": "base", "autoResume": {"enabled": True}})
    assert status == 400 and "autoResume needs autoPause" in str(doc), (status, doc)


def leftovers(node: Node) -> dict[str, object]:
    """What a node holds besides its running sandboxes: snapshot dirs and their volumes, VM dirs."""
    base = Path(node.env["CUBEFS_SANDBOX_DIR"])
    snaps = sorted(p.name for p in (base / "snapshots").glob("*")) if (base / "snapshots").exists() else []
    vols = run_cubefs("volume", "list", "--json", env=node.env).stdout
    import json

    volumes = sorted(v["name"] for v in json.loads(vols) if v["name"].startswith(("sbxsnap-", "sbx-")))
    vms = sorted(p.name for p in Path(node.env["CUBEFS_VM_DIR"]).glob("sbx-*"))
    return {"snapshots": snaps, "volumes": volumes, "vms": vms}


def test_the_cli_snapshots_rolls_back_forks_pauses(snode: Node) -> None:
    env = {**snode.env, **snode.sdk_env}
    sid = run_cubefs("sandbox", "create", env=env).stdout.strip()
    try:
        run_cubefs("sandbox", "exec", sid, "--", "echo one > ~/f", env=env)
        snap = run_cubefs("sandbox", "snapshot", sid, "--name", "cli-one", env=env).stdout.strip()
        assert snap.startswith("snap-")
        assert "cli-one" in run_cubefs("sandbox", "snapshot", "ls", "--sandbox", sid, env=env).stdout
        run_cubefs("sandbox", "exec", sid, "--", "echo two > ~/f", env=env)
        out = run_cubefs("sandbox", "rollback", sid, "cli-one", env=env).stdout
        assert "rolled back" in out
        assert run_cubefs("sandbox", "exec", sid, "--", "cat ~/f", env=env).stdout == "one\n"
        forks = run_cubefs("sandbox", "fork", sid, "--count", "2", env=env).stdout.split()
        assert len(forks) == 2 and all(f.startswith("i") for f in forks)
        for f in forks:
            assert run_cubefs("sandbox", "exec", f, "--", "cat ~/f", env=env).stdout == "one\n"
        run_cubefs("sandbox", "kill", *forks, env=env)
        run_cubefs("sandbox", "pause", sid, env=env)
        assert snode.api("GET", f"/sandboxes/{sid}")[1]["state"] == "paused"  # type: ignore[index]
        res = run_cubefs("sandbox", "pause", sid, env=env, check=False)
        assert res.returncode != 0 and "already paused" in res.stderr
        run_cubefs("sandbox", "resume", sid, env=env)
        assert run_cubefs("sandbox", "exec", sid, "--", "cat ~/f", env=env).stdout == "one\n"
        res = run_cubefs("sandbox", "rollback", sid, "snap-nothere", env=env, check=False)
        assert res.returncode != 0 and "snap-nothere" in res.stderr
        run_cubefs("sandbox", "snapshot", "rm", "cli-one", env=env)
        assert "no snapshots" in run_cubefs("sandbox", "snapshot", "ls", env=env).stdout
    finally:
        run_cubefs("sandbox", "kill", sid, env=env, check=False)


def test_a_service_killed_in_the_middle_of_a_fork_of_ten_leaves_nothing_half_made(snode: Node) -> None:
    import signal
    import threading

    from e2b import Sandbox

    before = leftovers(snode)
    sbx = Sandbox.create(timeout=300)
    try:
        pid = counting(sbx)
        errors: list[BaseException] = []

        def fork() -> None:
            try:
                sbx.fork(count=10, timeout=120)
            except BaseException as err:  # the service dies under it
                errors.append(err)

        t = threading.Thread(target=fork)
        t.start()
        time.sleep(2.5)  # the snapshot is taken, some children are being restored
        snode.stop(signal.SIGKILL)
        t.join(120)
        snode.start()
        deadline = time.monotonic() + 60  # half-made sandboxes and the fork's snapshot are cleaned in the background
        while True:
            now = leftovers(snode)
            vols = [v for v in now["volumes"] if v not in before["volumes"]]  # type: ignore[operator]
            vms = [v for v in now["vms"] if v not in before["vms"]]  # type: ignore[operator]
            running = {s.sandbox_id for s in Sandbox.list().next_items()}
            # what is left is exactly the sandboxes that run (the source and any fork that was finished)
            if now["snapshots"] == before["snapshots"] and len(vms) == len(running) and \
                    len(vols) == len(running):
                break
            assert time.monotonic() < deadline, f"left behind: {now} (running: {running})"
            time.sleep(1)
        assert sbx.sandbox_id in running
        assert count(sbx)[0] == pid  # type: ignore[index]
        for other in running - {sbx.sandbox_id}:
            Sandbox.kill(other)
    finally:
        sbx.kill()


def test_a_full_disk_fails_the_snapshot_alone(snode: Node, tmp_path: Path) -> None:
    """Snapshots on a 48 MiB filesystem (a 256 MiB guest's RAM does not fit): 507, the sandbox
    runs on untouched, and nothing of the snapshot is left: no file, no volume, no snapshot."""
    from contextlib import contextmanager

    from conftest import small_tmpfs
    from e2b import Sandbox

    with contextmanager(small_tmpfs)(tmp_path / "full", "48m") as full:
        snode.stop()
        snode.env["CUBEFS_SNAPSHOT_DIR"] = str(full)
        snode.start()
        sbx = Sandbox.create(timeout=120)
        try:
            pid = counting(sbx)
            before = leftovers(snode)
            status, body, _ = snode.api("POST", f"/sandboxes/{sbx.sandbox_id}/snapshots", {})
            assert status == 507 and "disk full" in body["message"], body  # type: ignore[index]
            assert list(full.iterdir()) == []
            assert leftovers(snode) == before
            goes_on(sbx, pid, 1)
            import json

            assert json.loads(run_cubefs("snapshots", f"sbx-{sbx.sandbox_id}-0", "--json", env=snode.env).stdout) == []
        finally:
            sbx.kill()
            snode.stop()
            del snode.env["CUBEFS_SNAPSHOT_DIR"]
            snode.start()


def test_a_snapshot_of_fifty_writers_is_of_one_instant(snode: Node) -> None:
    """50 processes append numbers to files as fast as they can: a sandbox made from a snapshot
    taken under that load has all 50 still running, and every file counts 1, 2, 3... with no
    hole and no repeat (what its writers had appended at the instant, then their own)."""
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    child = None
    try:
        writer = "n=0; while :; do n=$((n+1)); echo $n >> ~/w/$0; done"
        sbx.commands.run(f"mkdir -p ~/w; for i in $(seq 50); do (exec -a writer bash -c '{writer}' $i) & done; "
                         "sleep 1", background=True)
        deadline = time.monotonic() + 120  # every writer has begun (bash forks slowly under TCG)
        while sbx.commands.run("ls ~/w 2>/dev/null | wc -l").stdout.strip() != "50":
            assert time.monotonic() < deadline, "the 50 writers did not all start"
            time.sleep(0.5)
        info = sbx.create_snapshot()
        child = Sandbox.create(info.snapshot_id, timeout=300)
        time.sleep(1)
        # the 50 go on in the child; stop them (they hold its one vCPU) and read what they wrote
        stop = ("import os, signal\nfound = []\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
                "    try:\n        if open(f'/proc/{p}/cmdline', 'rb').read().startswith(b'writer\\0'):\n"
                "            os.kill(int(p), signal.SIGSTOP); found.append(p)\n"
                "    except OSError: pass\nprint(len(found))")
        stopped = child.commands.run(f"python3 -c \"{stop}\"", timeout=300).stdout
        assert int(stopped) == 50, stopped
        script = ("import glob\nbad = []\nfor f in glob.glob('/home/user/w/*'):\n"
                  "    xs = [int(x) for x in open(f).read().split()]\n"
                  "    if xs != list(range(1, len(xs) + 1)): bad.append((f, len(xs)))\n"
                  "print(len(glob.glob('/home/user/w/*')), bad)")
        out = child.commands.run(f"python3 -c \"{script}\"", timeout=300).stdout
        assert out == "50 []\n", out
    finally:
        for s in (sbx, child):
            if s is not None:
                s.kill()
        with __import__("contextlib").suppress(Exception):
            Sandbox.delete_snapshot(info.snapshot_id)
