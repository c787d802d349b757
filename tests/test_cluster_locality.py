"""What a node publishes as image locality (the scheduler's second key): the fraction of an
image's chunk bytes in the node's disk cache, on a real disk cache warmed by a real mount.

The image is two files of random data (no chunk shared), 3 MiB and 1 MiB; a mount with no
prefetch and no pack readahead that reads the first file fills the cache with exactly its
chunks, so three quarters of the image is cached, then all of it once the second is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import mounted, run_cubefs

from cubefs.cache.locality import cached_digests, cached_fraction

MIB = 1 << 20


@pytest.fixture
def image(tmp_path: Path, local_store: str) -> str:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 * MIB))
    (src / "small.bin").write_bytes(os.urandom(1 * MIB))
    run_cubefs("build", str(src), "--tag", "loc:1", "--store", local_store)
    return "loc:1"


def test_cached_fraction_follows_what_a_mount_read(tmp_path: Path, local_store: str, image: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    assert cached_digests(str(cache)) == set()
    assert cached_fraction(local_store, None, str(cache), image) == 0.0  # no cache yet: nothing asked of the store
    quiet = ("--no-prefetch", "--pack-readahead", "0", "--no-auto-trace")
    with mounted(image, tmp_path / "mnt", local_store, cache, *quiet) as m:
        assert len((m.mountpoint / "big.bin").read_bytes()) == 3 * MIB
    warm = cached_fraction(local_store, None, str(cache), image)
    assert 0.74 <= warm <= 0.76, warm

    # what a node publishes: per sandbox template, through the template's own store and cache
    from sandbox.cluster.member import template_locality
    from sandbox.templates import SandboxTemplate

    monkeypatch.setenv("CUBEFS_SANDBOX_DIR", str(tmp_path / "sandbox"))
    SandboxTemplate("loc", image, store={"store": local_store, "cache_dir": str(cache)}).save()
    SandboxTemplate("gone", "nosuch:1", store={"store": local_store, "cache_dir": str(cache)}).save()
    assert template_locality() == {"loc": round(warm, 3)}  # an image the store lacks is left out, not an error

    with mounted(image, tmp_path / "mnt", local_store, cache, *quiet) as m:
        assert len((m.mountpoint / "small.bin").read_bytes()) == MIB
    assert cached_fraction(local_store, None, str(cache), image) == 1.0
    assert template_locality() == {"loc": 1.0}
