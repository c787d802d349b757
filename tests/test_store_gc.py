"""cubefs rm and cubefs gc on a real store: what is freed, what stays readable, and a
build running during collection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import S3_ENV, mounted, run_cubefs
from test_volumes import tree_state


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def gc(store: str, *extra: str) -> dict[str, int]:
    return json.loads(run_cubefs("gc", "--store", store, "--json", *extra).stdout)


def test_rm_then_gc_frees_only_what_no_image_needs(tmp_path: Path, local_store: str) -> None:
    shared = os.urandom(3_000_000)
    a = _tree(tmp_path / "a", {"only-a": os.urandom(24_000_000), "shared": shared})
    b = _tree(tmp_path / "b", {"only-b": os.urandom(1_000_000), "shared": shared, "dir/x": b"x"})
    run_cubefs("build", str(a), "--tag", "a:1", "--store", local_store)
    run_cubefs("build", str(b), "--tag", "b:1", "--store", local_store)
    dry = gc(local_store, "--dry-run")
    assert dry["packs_marked"] == 0  # everything is in use
    run_cubefs("rm", "a:1", "--store", local_store)
    first = gc(local_store)
    assert first["packs_marked"] >= 2 and first["packs_deleted"] == 0 and first["images_marked"] == 1
    second = gc(local_store)
    assert second["packs_deleted"] == first["packs_marked"] and second["bytes_freed"] >= 16_000_000
    assert second["images_deleted"] == 1
    images = run_cubefs("images", "--store", local_store, "--json").stdout
    assert [i["ref"] for i in json.loads(images)] == ["b:1"]
    with mounted("b:1", tmp_path / "mnt", local_store, tmp_path / "cache"):
        assert tree_state(tmp_path / "mnt") == tree_state(b)
    # Building a again uploads what gc deleted, and it reads back whole.
    res = json.loads(run_cubefs("build", str(a), "--tag", "a:2", "--store", local_store, "--json").stdout)
    assert res["new_stored_bytes"] >= 16_000_000
    with mounted("a:2", tmp_path / "mnt2", local_store, tmp_path / "cache2"):
        assert tree_state(tmp_path / "mnt2") == tree_state(a)


def test_a_running_build_holds_gc_back(tmp_path: Path, local_store: str) -> None:
    """A lease in the store (a build that started before the packs were hidden) stops the
    second phase; once it is gone, the packs go."""
    a = _tree(tmp_path / "a", {"only-a": os.urandom(20_000_000)})
    run_cubefs("build", str(a), "--tag", "a:1", "--store", local_store)
    run_cubefs("rm", "a:1", "--store", local_store)
    leases = Path(local_store[len("file://"):]) / "leases"
    leases.mkdir(exist_ok=True)
    (leases / "someone").write_text(json.dumps({"started": time.time()}))
    assert gc(local_store)["packs_marked"] >= 1
    held = gc(local_store)
    assert held["waiting_for_leases"] == 1 and held["packs_deleted"] == 0
    # Another image goes, while a build that started after the first marks runs: it
    # holds back only what was marked after it started.
    b = _tree(tmp_path / "b", {"only-b": os.urandom(20_000_000)})
    run_cubefs("build", str(b), "--tag", "b:1", "--store", local_store)
    run_cubefs("rm", "b:1", "--store", local_store)
    time.sleep(0.05)
    (leases / "later").write_text(json.dumps({"started": time.time()}))
    time.sleep(0.05)
    assert gc(local_store)["packs_marked"] >= 1  # b's packs, a second batch
    (leases / "someone").unlink()
    freed = gc(local_store)
    assert 16_000_000 <= freed["bytes_freed"] < 30_000_000  # a's batch, not b's
    assert freed["waiting_for_leases"] == 1
    (leases / "later").unlink()
    assert gc(local_store)["bytes_freed"] >= 16_000_000  # now b's


def test_gc_during_a_real_build_never_deletes_what_it_reuses(tmp_path: Path, local_store: str) -> None:
    """Image a is removed; a build of c, which contains a's big file, starts; gc runs twice
    while it runs. c must still read back whole, and its reused packs get their index back."""
    big = os.urandom(20_000_000)
    a = _tree(tmp_path / "a", {"big": big})
    c = _tree(tmp_path / "c", {"big": big, **{f"filler/{i}": os.urandom(10_000_000) for i in range(4)}})
    run_cubefs("build", str(a), "--tag", "a:1", "--store", local_store)
    run_cubefs("rm", "a:1", "--store", local_store)
    build = subprocess.Popen([sys.executable, "-m", "cubefs", "build", str(c), "--tag", "c:1", "--store", local_store,
                              # zstd level 19 on one worker: ~10 s for the 40 MB of new data,
                              # long enough for two gc runs to race it on any machine
                              "--workers", "1", "--level", "19", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             env={**os.environ, **S3_ENV})
    time.sleep(1.0)  # it has its lease and has read the indexes
    assert build.poll() is None, "the build finished before gc could race it; give it more to do"
    first = gc(local_store)
    second = gc(local_store)
    out, err = build.communicate(timeout=600)
    assert build.returncode == 0, err
    assert first["packs_marked"] >= 2 and second["waiting_for_leases"] == 1 and second["packs_deleted"] == 0
    assert json.loads(out)["new_stored_bytes"] < 41_000_000  # 40 MB of filler: a's big file was reused
    third = gc(local_store)
    assert third["packs_restored"] >= 2 and third["packs_deleted"] == 0
    with mounted("c:1", tmp_path / "mnt", local_store, tmp_path / "cache"):
        assert (tmp_path / "mnt" / "big").read_bytes() == big
    assert gc(local_store)["packs_marked"] == 0  # nothing unused is left
