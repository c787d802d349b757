"""A VM whose writes go to a block disk: ``cubefs vm start NAME IMAGE --disk SIZE`` (TCG here).

The guest's root is an overlay: the image over virtio-fs, read-only, under an ext4
on /dev/vda, a block volume cloned in O(1) from an empty ext4 made once per size
(vmm/disk.py) and served over vhost-user-blk by the node's mount server.  One
template boot for the module; every VM after it is a restore.  A user checks:
what the guest writes lands on the disk (the image and other VMs never see it),
a pip-like untar works, ``df`` shows the disk, a memory snapshot rolls back and
forks with the disk, and the disk outlives its VM (a clone of a snapshot, started
again, and checked with e2fsck on the host).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, run_cubefs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_vm_kernel import DEFAULT, make_kernel

MiB = 1 << 20


@pytest.fixture(scope="module")
def vm_env(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    base = tmp_path_factory.mktemp("blkroot")
    env = {"CUBEFS_VM_DIR": str(base / "vm"), "CUBEFS_TEMPLATE_DIR": str(base / "templates"),
           "CUBEFS_VOLUME_DIR": str(base / "volumes"), "CUBEFS_STORE": f"file://{base / 'store'}",
           "CUBEFS_CACHE_DIR": str(base / "cache"), "CUBEFS_VM_KERNEL": str(make_kernel(Path(DEFAULT)))}
    run_cubefs("build", str(rootfs), "--tag", "debian:12", env=env)
    run_cubefs("vm", "template", "create", "base", "--accel", "tcg", env=env)
    yield env
    run_cubefs("vm", "rm", "--all", env=env, check=False)


def vm(env: dict[str, str], *args: str, check: bool = True) -> dict:  # type: ignore[type-arg]
    res = run_cubefs("vm", *args, env=env, check=check, timeout=900)
    return json.loads(res.stdout) if "--json" in args else {"out": res.stdout, "err": res.stderr,
                                                              "code": res.returncode}


def sh(env: dict[str, str], name: str, script: str) -> str:
    res = vm(env, "exec", name, "--timeout", "600", "--", "sh", "-c", script, check=False)
    assert res["code"] == 0, (script, res)
    return str(res["out"])


def volumes(env: dict[str, str]) -> set[str]:
    return {v["name"] for v in json.loads(run_cubefs("volume", "list", "--json", env=env).stdout)}


def test_a_formatted_disk_is_made_once_per_size_and_cloned(tmp_path: Path) -> None:
    """Two disks of one size: one mkfs (the template volume's snapshot), two O(1) clones, each a
    clean empty ext4 of that size; sizes a guest could not use are refused."""
    from cubefs.cow.index import VolumeIndex
    from cubefs.errors import UsageError
    from vmm import disk

    index = VolumeIndex(str(tmp_path / "volumes"))
    try:
        disk.clone_formatted(index, "a", 128 * MiB)
        disk.clone_formatted(index, "b", 128 * MiB)
        assert {v.name for v in index.volumes()} == {"a", "b", disk.template_name(128 * MiB)}
        with pytest.raises(UsageError, match="at least 64M"):
            disk.clone_formatted(index, "c", 16 * MiB)
    finally:
        index.close()
    img = tmp_path / "b.img"
    run_cubefs("volume", "export", "b", str(img), "--volume-dir", str(tmp_path / "volumes"))
    assert img.stat().st_size == 128 * MiB
    res = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    listing = subprocess.run(["debugfs", "-R", "ls /", str(img)], capture_output=True, text=True).stdout
    assert "lost+found" in listing


def test_bad_disk_options_fail_with_one_line_and_leave_nothing(vm_env: dict[str, str]) -> None:
    for args, why in ((["--disk", "1M"], "at least 64M"), (["--disk-volume", "x", "--writable"], "not with"),
                      (["--disk-volume", "x", "--disk", "256M"], "--disk-volume")):
        res = vm(vm_env, "start", "bad", "debian:12", "--template", "base", *args, check=False)
        assert res["code"] != 0 and why in res["err"] and res["err"].count("\n") == 1, (args, res)
    res = vm(vm_env, "start", "bad", "--volume", "v", "--disk", "256M", check=False)
    assert res["code"] != 0 and "--disk" in res["err"] and res["err"].count("\n") == 1, res
    assert vm(vm_env, "start", "bad", "debian:12", "--disk", "lots", check=False)["code"] == 2
    assert vm(vm_env, "ls", "--json") == []
    assert not {v for v in volumes(vm_env) if v.startswith("vm-")}


@pytest.mark.timeout(2400)
def test_a_vm_on_a_disk_writes_there_snapshots_rolls_back_forks_and_starts_again(vm_env: dict[str, str],
                                                                                 tmp_path: Path) -> None:
    env = vm_env
    vm(env, "start", "box", "debian:12", "--disk", "256M", "--template", "base")
    try:
        # df shows the disk (ext4 of 256 MiB less its metadata); the image is the overlay's lower, read-only.
        df = sh(env, "box", "df -Pk / | tail -1").split()
        assert df[0] == "overlay" and 200 * 1024 < int(df[1]) <= 256 * 1024, df
        mounts = sh(env, "box", "cat /proc/mounts")
        assert "lowerdir=/run/cubefs/lower,upperdir=/run/cubefs/disk/upper" in mounts, mounts
        # pip-like work: the stdlib untarred into /root, and imported from there.
        out = sh(env, "box", "echo hi > /root/hello && tar -C /usr/lib -cf - python3.11 | tar -C /root -xf - && "
                 "find /root/python3.11 | wc -l; find /usr/lib/python3.11 | wc -l; "
                 "python3 -c 'import sys; sys.path.insert(0, \"/root/python3.11\"); import json.decoder as d; "
                 "print(d.__file__)'; sync; df -Pk / | tail -1")
        copied, original, where, df_after = out.splitlines()
        assert copied == original and int(copied) > 1000, out
        assert where == "/root/python3.11/json/decoder.py", out
        assert int(df_after.split()[2]) > int(df[2]) + 20 * 1024, (df, df_after)  # 25 MB more used on the disk
        # Another VM of the same image sees none of it: the image stayed as it was.
        other = vm(env, "run", "--template", "base", "debian:12", "--", "sh", "-c",
                   "test -e /root/hello || echo clean", check=False)
        assert (other["code"], other["out"]) == (0, "clean\n"), other
        # A memory snapshot: the disk's volume, snapshotted with RAM, the VM paused.
        snap = vm(env, "snapshot", "box", "--name", "s1", "--json")
        assert (snap["volume"], snap["memory"]) == ("vm-box", True), snap
        sh(env, "box", "echo after > /root/after && rm -rf /root/hello /root/python3.11 && sync")
        back = vm(env, "rollback", "box", "s1", "--json")
        assert back["memory"], back
        out = sh(env, "box", "cat /root/hello; test -e /root/after || echo no-after; find /root/python3.11 | wc -l")
        assert out.split() == ["hi", "no-after", copied], out
        res = vm(env, "rollback", "box", "nope", check=False)
        assert res["code"] != 0, res
        # A fork: the child goes on from now on a clone of the disk; what it writes is its own.
        forks = vm(env, "fork", "box", "--count", "1", "--json")
        assert [f["name"] for f in forks] == ["box-fork-0"] and forks[0]["root"]["disk"] == "box-fork-0", forks
        assert sh(env, "box-fork-0", "cat /root/hello; echo child > /root/child; sync") == "hi\n"
        assert sh(env, "box", "test -e /root/child || echo parent-clean") == "parent-clean\n"
        vm(env, "rm", "box-fork-0")
        assert "box-fork-0" not in volumes(env)
        run_cubefs("clone", "vm-box@s1", "--prefix", "kept", env=env)  # the disk of s1, kept past its VM
    finally:
        vm(env, "rm", "box", "box-fork-0", check=False)
    assert not {"vm-box", "box-fork-0"} & volumes(env) and "kept-0" in volumes(env)  # a VM's own disk goes with it
    # On the host: the snapshot, taken while the guest ran, is an ext4 that needs only its journal
    # replayed (what a mount does), whose upper directory holds what the guest had synced.  (A memory
    # snapshot does not flush the guest: what was still in its page cache is in the RAM kept beside
    # the disk, as after a power cut; CI once caught /root/hello's data not yet written back.)
    img = tmp_path / "kept.img"
    run_cubefs("volume", "export", "kept-0", str(img), env=env)
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(img)], capture_output=True)
    res = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /upper/root/hello", str(img)], capture_output=True, text=True)
    assert cat.stdout == "hi\n", cat
    # 'cubefs commit' of the disk: the image the VM ran, with what the guest wrote (the overlay's upper
    # on the disk, read in user space) laid over it; the image's own files are not read again.
    out = json.loads(run_cubefs("commit", "kept-0", "--tag", "boxed:1", "--json", env=env, timeout=900).stdout)
    assert out["files_reused"] > 1000, out
    with Mount("boxed:1", tmp_path / "boxed", env["CUBEFS_STORE"], Path(env["CUBEFS_CACHE_DIR"])) as m:
        root = m.mountpoint
        assert (root / "root/hello").read_text() == "hi\n" and not (root / "root/after").exists()
        assert (root / "root/python3.11/json/decoder.py").read_bytes() == \
            (root / "usr/lib/python3.11/json/decoder.py").read_bytes()
    # Started again on that disk (twice, the second seeing the first's write): the files are there.
    vm(env, "start", "again", "debian:12", "--disk-volume", "kept-0", "--template", "base")
    try:
        assert sh(env, "again", "cat /root/hello; echo second > /root/second; sync") == "hi\n"
    finally:
        vm(env, "rm", "again")
    vm(env, "start", "again", "debian:12", "--disk-volume", "kept-0", "--template", "base")
    try:
        assert sh(env, "again", "cat /root/hello /root/second; test -d /root/python3.11 && echo tree") \
            == "hi\nsecond\ntree\n"
    finally:
        vm(env, "rm", "again")
    assert "kept-0" in volumes(env)  # not the VM's own: it stays
