"""Start-up traces: record once, push, and later mounts prefetch in that order."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import mounted, run_cubefs


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"d{i % 3}/f{i:02d}": os.urandom(150_000) for i in range(24)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _wait_prefetched(m: mounted, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = m.stats()
        if stats["tiers"]["prefetch"]["done"]:
            return stats
        time.sleep(0.1)
    raise AssertionError("the prefetch did not finish")


def test_recorded_trace_is_prefetched_by_later_mounts(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    image = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store,
                                  "--json").stdout)["image"]
    workload = ["d2/f05", "d0/f12", "d1/f01", "d2/f20"]  # scattered over the packs' order

    with mounted("app:1", tmp_path / "rec", store, tmp_path / "cache-rec", "--record-trace", "--readahead", "0"):
        for rel in workload:
            assert (tmp_path / "rec" / rel).read_bytes() == files[rel]
        pushed = json.loads(run_cubefs("trace", "push", str(tmp_path / "rec"), "--json").stdout)
    assert pushed["chunks"] >= len(workload) and pushed["stored_bytes"] >= 4 * 150_000
    assert (tmp_path / "store" / "traces" / image).is_file()

    # A fresh node: the trace's chunks arrive before anyone reads them.
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache") as m:
        stats = _wait_prefetched(m)
        assert stats["tiers"]["prefetch"]["chunks"] == pushed["chunks"]
        requests = stats["tiers"]["store"]["requests"]
        assert requests >= 1
        for rel in workload:
            assert (tmp_path / "mnt" / rel).read_bytes() == files[rel]
        after = m.stats()["tiers"]
        assert after["store"]["requests"] == requests, "the workload's reads all hit the prefetched chunks"
        assert after["memory"]["misses"] == 0
        # Anything else is still read on demand.
        assert (tmp_path / "mnt" / "d0/f00").read_bytes() == files["d0/f00"]
        assert m.stats()["tiers"]["store"]["requests"] > requests

    # --no-prefetch leaves it alone.
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache2", "--no-prefetch") as m:
        time.sleep(0.5)
        assert m.stats()["tiers"]["store"]["requests"] == 0


def test_trace_push_needs_a_recording_mount_and_a_bad_trace_is_ignored(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    image = json.loads(run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store,
                                  "--json").stdout)["image"]
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache"):
        res = run_cubefs("trace", "push", str(tmp_path / "mnt"), check=False)
        assert res.returncode == 2 and "--record-trace" in res.stderr
    res = run_cubefs("trace", "push", str(tmp_path / "nowhere"), check=False)
    assert res.returncode == 3, res.stderr
    # Garbage where the trace should be: the mount works and says why it ignores it.
    (tmp_path / "store" / "traces").mkdir()
    (tmp_path / "store" / "traces" / image).write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with mounted("app:1", tmp_path / "mnt", store, tmp_path / "cache3") as m:
        assert (tmp_path / "mnt" / "d1/f04").read_bytes() == files["d1/f04"]
        assert m.stats()["tiers"]["prefetch"]["chunks"] == 0
    logs = "".join(p.read_text() for p in (tmp_path / "cache3" / "logs").iterdir())
    assert "ignoring its trace" in logs
