"""In-place rollback as a client sees it right after the call answers.

``POST /sandboxes/{id}/rollback`` answers once the restored VM runs; the guest's session,
clock and (where the snapshot's differ) default environment are settled after the answer,
while the sandbox's requests wait (sandbox/service.py, ``_settle``).  What a user checks: a
command sent the moment the call returns already runs with the host's clock, the snapshot's
files, the sandbox's own environment and hostname; also when the snapshot was of another
sandbox.  One service and one template for the module."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sandbox_service import Node, node_in

PROBE = "date +%s.%N; cat /home/user/doc.txt; echo \"env=$ROLL\"; hostname"


@pytest.fixture(scope="module")
def rnode(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from node_in(tmp_path_factory.mktemp("rollback"), rootfs, "--memory", "256")


def probe(sbx: object) -> tuple[float, str, str, str, float, float]:
    """(guest clock, doc.txt, $ROLL, hostname, host clock before, after) of one command."""
    before = time.time()
    out = sbx.commands.run(PROBE).stdout.split("\n")  # type: ignore[attr-defined]
    after = time.time()
    return float(out[0]), out[1], out[2].removeprefix("env="), out[3], before, after


def rollback(node: Node, sandbox_id: str, snapshot_id: str) -> None:
    status, body, _ = node.api("POST", f"/sandboxes/{sandbox_id}/rollback", {"snapshotID": snapshot_id})
    assert status == 200, body
    assert body["sandboxID"] == sandbox_id  # type: ignore[index]


def test_a_command_sent_as_the_rollback_answers_sees_the_hosts_clock_and_the_snapshot(rnode: Node) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(envs={"ROLL": "mine"}, timeout=300)
    snaps = []
    try:
        sbx.files.write("/home/user/doc.txt", "v1\n")
        name = probe(sbx)[3]
        snaps.append(sbx.create_snapshot().snapshot_id)
        sbx.files.write("/home/user/doc.txt", "v2\n")
        time.sleep(6)  # a guest whose clock was not set would be this far behind: the snapshot's time
        for _ in range(2):  # the second from a guest that was itself rolled back
            rollback(rnode, sbx.sandbox_id, snaps[0])
            guest, doc, env, host, before, after = probe(sbx)  # sent at once: the guest may still be settling
            assert before - 1.0 <= guest <= after + 1.0, f"guest clock {guest:.3f}, host {before:.3f}-{after:.3f}"
            assert (doc, env, host) == ("v1", "mine", name)
        assert sbx.get_info().state == "running"
    finally:
        sbx.kill()
        for s in snaps:
            Sandbox.delete_snapshot(s)


def test_a_rollback_to_another_sandboxs_snapshot_keeps_this_ones_identity_and_environment(rnode: Node) -> None:
    from e2b import Sandbox

    mine = Sandbox.create(envs={"ROLL": "mine"}, timeout=300)
    other = Sandbox.create(envs={"ROLL": "other"}, timeout=300)
    snap = None
    try:
        mine.files.write("/home/user/doc.txt", "mine\n")
        other.files.write("/home/user/doc.txt", "other's\n")
        name = probe(mine)[3]
        assert probe(other)[3] != name
        snap = other.create_snapshot().snapshot_id
        time.sleep(3)
        rollback(rnode, mine.sandbox_id, snap)
        guest, doc, env, host, before, after = probe(mine)
        assert before - 1.0 <= guest <= after + 1.0, f"guest clock {guest:.3f}, host {before:.3f}-{after:.3f}"
        # the other sandbox's files, this sandbox's environment, hostname and token (the same SDK object works)
        assert (doc, env, host) == ("other's", "mine", name)
        assert probe(other)[1:3] == ("other's", "other")  # the snapshot's sandbox runs on as it was
    finally:
        mine.kill()
        other.kill()
        if snap is not None:
            Sandbox.delete_snapshot(snap)


def sandbox_leftovers(node: Node, sandbox_id: str) -> dict[str, object]:
    """What the node holds of one sandbox: its QEMUs, volumes, VM dirs, record."""
    import json
    import subprocess

    from conftest import run_cubefs

    qemus = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name sbx-{sandbox_id}"], capture_output=True,
                           text=True).stdout.split()
    volumes = [v["name"] for v in json.loads(run_cubefs("volume", "list", "--json", env=node.env).stdout)
               if sandbox_id in v["name"]]
    vms = [p.name for p in Path(node.env["CUBEFS_VM_DIR"]).glob(f"sbx-{sandbox_id}*")]
    record = (Path(node.env["CUBEFS_SANDBOX_DIR"]) / "sandboxes" / f"{sandbox_id}.json").exists()
    return {"qemu": qemus, "volumes": volumes, "vms": vms, "record": record}


def test_a_kill_during_a_rollback_and_a_stop_right_after_one_lose_nothing_and_leak_nothing(rnode: Node) -> None:
    """A kill while the rollback restores leaves nothing of the sandbox (the restored VM, its
    volume, the old ones); a service stopped the moment a rollback answers leaves the sandbox to
    the next service, which settles it: it runs, with the snapshot's files and the host's clock."""
    import threading

    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    snap = ""
    try:
        sbx.files.write("/home/user/doc.txt", "v1\n")
        snap = sbx.create_snapshot().snapshot_id
        answers: list[int] = []
        t = threading.Thread(target=lambda: answers.append(rnode.api(
            "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", {"snapshotID": snap})[0]))
        t.start()
        time.sleep(0.05)
        sbx.kill()
        t.join(120)
        assert answers and answers[0] in (200, 404), answers
        deadline = time.monotonic() + 30
        while (left := sandbox_leftovers(rnode, sbx.sandbox_id)) != {"qemu": [], "volumes": [], "vms": [],
                                                                         "record": False} \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == {"qemu": [], "volumes": [], "vms": [], "record": False}, left

        kept = Sandbox.create(timeout=300)
        kept.files.write("/home/user/doc.txt", "v1\n")
        snap2 = kept.create_snapshot().snapshot_id
        kept.files.write("/home/user/doc.txt", "v2\n")
        rollback(rnode, kept.sandbox_id, snap2)
        rnode.stop()  # at once: the guest may still be settling
        rnode.start()
        guest, doc, _env, _host, before, after = probe(Sandbox.connect(kept.sandbox_id, timeout=120))
        assert doc == "v1" and before - 1.0 <= guest <= after + 1.0, (doc, guest, before, after)
        left = sandbox_leftovers(rnode, kept.sandbox_id)
        assert len(left["qemu"]) == 1 and len(left["volumes"]) == 1, left  # the old VM and volume ended
        kept.kill()
        Sandbox.delete_snapshot(snap2)
    finally:
        sbx.kill()  # False once killed: the SDK answers a 404 so
        if snap:
            Sandbox.delete_snapshot(snap)
