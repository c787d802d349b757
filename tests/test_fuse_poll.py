"""The FUSE serve loop polls ``/dev/fuse`` for a few microseconds after each request
(cubefs/fuse/kernel.py, ``spin_seconds``): a burst of requests is answered without a
wake-up per request, and a daemon with nothing to do still sleeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import new_volume_mounted, run_cubefs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def volume_mount(tmp_path: Path) -> Iterator[Path]:
    with new_volume_mounted(tmp_path / "volumes", tmp_path / "mnt", tmp_path / "cache") as mnt:
        yield mnt


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_daemon_polls_only_right_after_requests(volume_mount: Path) -> None:
    """After a burst of 500 creates the daemon's CPU stops growing: polling lasts
    microseconds past the last request, not for ever."""
    for i in range(500):
        (volume_mount / f"f{i}").write_bytes(b"x" * 100)
    assert sorted(os.listdir(volume_mount))[:2] == ["f0", "f1"]
    pid = json.loads(run_cubefs("stats", str(volume_mount), "--json").stdout)["pid"]
    time.sleep(0.5)
    before = _cpu_seconds(pid)
    time.sleep(2.0)
    idle = _cpu_seconds(pid) - before
    assert idle < 0.1, f"an idle daemon used {idle:.2f} s of CPU in 2 s"
    assert (volume_mount / "f499").read_bytes() == b"x" * 100


def _spin_with(env: dict[str, str], cpus: str | None = None) -> float:
    cmd = [sys.executable, "-c", "from cubefs.fuse.kernel import spin_seconds; print(spin_seconds())"]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env}).stdout
    return float(out)


def test_polling_is_off_on_one_cpu_and_can_be_set() -> None:
    """With one CPU the caller could not run while the daemon polls: no polling there;
    ``CUBEFS_FUSE_SPIN_US`` sets the window (0 turns it off)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to compare with one")
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": ""}) > 0
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "120"}) == pytest.approx(120e-6)
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "0"}) == 0
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "120"}, cpus="0") == 0
    # A setting that makes no sense never stops a mount nor makes a daemon spin for ever.
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "fast"}) == _spin_with({"CUBEFS_FUSE_SPIN_US": ""})
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "inf"}) == pytest.approx(0.01)
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "-5"}) == 0
    assert _spin_with({"CUBEFS_FUSE_SPIN_US": "nan"}) == 0
