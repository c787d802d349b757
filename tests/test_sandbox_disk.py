"""Sandboxes on disk roots (issue 16): a template made with ``--disk SIZE`` gives each sandbox
the prepared image under an overlay whose upper layer is an ext4 on its own block volume (an
O(1) clone), and the service's snapshots, creates from snapshots, rollbacks and forks keep working.

Driven with the stock E2B SDK, as users do.  One service and one template for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cubefs
from test_sandbox_service import Node, node_in

WRITE = ("mkdir -p /home/user/proj && cd /home/user/proj && echo hi > hello && "
         "tar -C /usr/lib -cf - python3.11/json | tar -xf - && sync && find python3.11 -type f | wc -l")


@pytest.fixture(scope="module")
def dnode(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from node_in(tmp_path_factory.mktemp("disk"), rootfs, "--memory", "256", "--disk", "256M")


def volumes(node: Node) -> set[str]:
    return {v["name"] for v in json.loads(run_cubefs("volume", "list", "--json", env=node.env).stdout)}


def test_the_template_records_its_disk_and_bad_sizes_fail_in_one_line(dnode: Node) -> None:
    out = json.loads(run_cubefs("sandbox", "template", "ls", "--json", env=dnode.env).stdout)
    [base] = [t for t in out if t["name"] == "base"]
    assert base["disk_mb"] == 256 and base["root_image"] == "sbxtpl-base:ready", base
    for size, why in (("16M", "at least 64M"), ("lots", "not a size")):
        res = run_cubefs("sandbox", "template", "create", "bad", "--from", "debian:12", "--disk", size,
                         env=dnode.env, check=False)
        assert res.returncode != 0 and why in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "sbxtpl-bad" not in volumes(dnode)


def test_a_sandbox_on_a_disk_writes_there_snapshots_rolls_back_forks_and_leaves_nothing(dnode: Node) -> None:
    from e2b import Sandbox

    before = volumes(dnode)
    sbx = Sandbox.create(timeout=300)
    child = None
    forks: list = []
    try:
        # The root is the prepared image (user 'user', its home) under an overlay on the disk.
        assert sbx.commands.run("whoami; echo $PWD").stdout == "user\n/home/user\n"
        mounts = sbx.commands.run("cat /proc/mounts").stdout
        assert "upperdir=/run/cubefs/disk/upper" in mounts, mounts
        df = sbx.commands.run("df -Pk / | tail -1").stdout.split()
        assert df[0] == "overlay" and 200 * 1024 < int(df[1]) <= 256 * 1024, df
        files = int(sbx.commands.run(WRITE).stdout)
        assert files >= 10
        assert f"sbx-{sbx.sandbox_id}-0" in volumes(dnode)

        info = sbx.create_snapshot(name="on-disk")
        sbx.commands.run("echo after > /home/user/proj/after && rm -rf /home/user/proj/python3.11 && sync")

        # A sandbox from the snapshot sees the files of that instant, not what came after.
        child = Sandbox.create(info.snapshot_id, timeout=120)
        out = child.commands.run("cd /home/user/proj && cat hello && find python3.11 -type f | wc -l && "
                                 "(test -e after || echo no-after)").stdout
        assert out.split() == ["hi", str(files), "no-after"], out
        child.commands.run("echo child > /home/user/proj/child && sync")
        assert sbx.commands.run("test -e /home/user/proj/child || echo parent-clean").stdout == "parent-clean\n"

        # Rolled back in place: the snapshot's files again.
        status, body, _ = dnode.api("POST", f"/sandboxes/{sbx.sandbox_id}/rollback",
                                    {"snapshotID": info.snapshot_id})
        assert status == 200, body
        out = sbx.commands.run("cd /home/user/proj && cat hello && find python3.11 -type f | wc -l && "
                               "(test -e after || echo no-after)").stdout
        assert out.split() == ["hi", str(files), "no-after"], out

        # A fork goes on from now on a clone of the disk; what it writes is its own.
        [fork] = forks = sbx.fork(count=1, timeout=120)
        assert fork.commands.run("cat /home/user/proj/hello; echo fork > /home/user/proj/fork; sync").stdout == "hi\n"
        assert sbx.commands.run("test -e /home/user/proj/fork || echo parent-clean").stdout == "parent-clean\n"
    finally:
        for s in (sbx, child, *forks):
            if s is not None:
                s.kill()
    assert Sandbox.delete_snapshot(info.snapshot_id)
    assert volumes(dnode) == before  # every sandbox's disk and the snapshot's went with them


def test_removing_a_disk_template_removes_its_committed_image(dnode: Node) -> None:
    """A disk template's prepared tree is committed as an image (``sbxtpl-NAME:ready``): ``template
    rm`` removes that name too (it stayed in the store forever before; its data goes at the next
    ``cubefs gc``)."""
    def images() -> set[str]:
        out = json.loads(run_cubefs("images", "--json", env=dnode.env).stdout)
        return {i["ref"] for i in out}

    run_cubefs("sandbox", "template", "create", "second", "--from", "debian:12", "--memory", "256", "--disk", "256M",
               env=dnode.env, timeout=600)
    assert "sbxtpl-second:ready" in images()
    run_cubefs("sandbox", "template", "rm", "second", env=dnode.env)
    assert "sbxtpl-second:ready" not in images() and "sbxtpl-base:ready" in images()
    assert "sbxtpl-second" not in volumes(dnode)
