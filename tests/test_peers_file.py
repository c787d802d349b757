"""Peers that change while mounted: a mount follows its --peers-file (none, one, two
peers, a bad file, none again) with real node daemons, measured in store bytes; and
PeerSet.replace keeps the owners of the chunks of members that stay."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from conftest import free_ports, mounted, run_cubefs
from test_peers import _node_stats, node_daemon, secret_file

from cubefs.cache.peers import PeerSet, PeersFile, parse_peers
from cubefs.errors import BadInputError
from cubefs.format.packs import ChunkLocation

GROUP = 20  # files read per step
FILES = 5 * GROUP


def _tree(root: Path) -> dict[str, bytes]:
    rnd = random.Random(15)  # the same bytes, packs and owners every run
    files = {f"lib/m{i:03d}.so": rnd.randbytes(200_000) for i in range(FILES)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _write(path: Path, text: str) -> None:
    """As a node service writes it: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    time.sleep(1.1)  # the mount looks at the file once a second at most


def test_mount_follows_its_peers_file(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    store = f"file://{tmp_path / 'store'}"
    run_cubefs("build", str(tmp_path / "src"), "--tag", "app:1", "--store", store)
    names = sorted(files)
    peers_file = tmp_path / "peers"
    ports = free_ports(2)
    n1, n2 = (f"127.0.0.1:{p}" for p in ports)
    mnt = tmp_path / "mnt"

    def read(step: int) -> dict:  # type: ignore[type-arg]
        for rel in names[step * GROUP : (step + 1) * GROUP]:
            assert (mnt / rel).read_bytes() == files[rel], rel
        return m.stats()

    with node_daemon(tmp_path, "n1", store, "", ports[0]), node_daemon(tmp_path, "n2", store, "", ports[1]), \
            mounted("app:1", mnt, store, tmp_path / "cache-mount", "--peers-file", str(peers_file),
                    "--peer-secret", secret_file(tmp_path), "--dir-prefetch", "0", "--pack-readahead", "0",
                    "--no-prefetch") as m:
        # No file: no peers, every byte from the store.
        s0 = read(0)
        assert s0["peers"] == {} and s0["tiers"]["peers"]["requests"] == 0
        assert s0["tiers"]["store"]["bytes"] >= GROUP * 200_000

        # One peer: everything the mount misses comes through it, none from the store.
        _write(peers_file, f"# the cluster's members\n{n1}\n")
        s1 = read(1)
        assert list(s1["peers"]) == [n1]
        assert s1["tiers"]["store"]["requests"] == s0["tiers"]["store"]["requests"], s1["tiers"]
        assert s1["peers"][n1]["bytes"] >= GROUP * 200_000
        assert _node_stats(ports[0])["tiers"]["store"]["bytes"] >= GROUP * 200_000

        # Two peers: both own a share; the one that stayed kept its counters.
        _write(peers_file, f"{n1}\n\n{n2}  # joined\n")
        s2 = read(2)
        assert sorted(s2["peers"]) == sorted([n1, n2])
        assert s2["tiers"]["store"]["requests"] == s0["tiers"]["store"]["requests"], s2["tiers"]
        assert s2["peers"][n1]["bytes"] > s1["peers"][n1]["bytes"] and s2["peers"][n2]["bytes"] > 0
        assert s2["tiers"]["peers"]["bytes"] >= 2 * GROUP * 200_000

        # A malformed file is refused whole: the members stay.
        _write(peers_file, f"{n1}\nnot a peer\n")
        s3 = read(3)
        assert sorted(s3["peers"]) == sorted([n1, n2])
        assert s3["tiers"]["store"]["requests"] == s0["tiers"]["store"]["requests"]

        # Gone: no peers; the store again.  The tier's totals keep what the peers served.
        peers_file.unlink()
        time.sleep(1.1)
        s4 = read(4)
        assert s4["peers"] == {}
        assert s4["tiers"]["store"]["bytes"] - s3["tiers"]["store"]["bytes"] >= GROUP * 200_000
        assert s4["tiers"]["peers"]["bytes"] == s3["tiers"]["peers"]["bytes"]


def _refs(n: int) -> list[ChunkLocation]:
    rnd = random.Random(7)
    return [ChunkLocation(rnd.randbytes(32), rnd.randbytes(32).hex(), rnd.randrange(1 << 30), 100, 100, 0)
            for _ in range(n)]


def test_replace_moves_only_the_share_of_what_changed() -> None:
    peers = PeerSet(["10.0.0.1:1", "10.0.0.2:1"], "file:///s", secret=b"s" * 32)
    refs = _refs(2000)
    before = {r.digest: peers.owner(r) for r in refs}
    kept = {p.address: p for p in peers.peers}
    kept["10.0.0.1:1"].stats.hits = 5
    peers.replace(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])
    assert {p.address: p for p in peers.peers if p.address in kept} == kept  # the same objects
    after = {r.digest: peers.owner(r) for r in refs}
    moved = [d for d in before if after[d] is not before[d]]
    assert all(after[d].address == "10.0.0.3:1" for d in moved)  # type: ignore[union-attr]
    assert 0.25 < len(moved) / len(refs) < 0.42  # about a third goes to the newcomer
    peers.replace(["10.0.0.2:1", "10.0.0.3:1"])
    again = {r.digest: peers.owner(r) for r in refs}
    assert all(again[d] is after[d] for d in before if after[d].address != "10.0.0.1:1")  # type: ignore[union-attr]
    assert peers.stats().keys() == {"10.0.0.2:1", "10.0.0.3:1"} and peers.totals()["hits"] == 5
    peers.replace([])
    assert peers.owner(refs[0]) is None
    peers.close()


def test_peers_file_parsing(tmp_path: Path) -> None:
    assert parse_peers("# c\n\n a:1 \n[::1]:2 # v6\nb:65535\n") == ["a:1", "[::1]:2", "b:65535"]
    for bad in ("a", "a:", ":1", "a:0", "a:65536", "a b:1", "a:x"):
        try:
            parse_peers(f"ok:1\n{bad}\n", "f")
        except BadInputError as err:
            assert str(err).startswith("f line 2:"), err
        else:
            raise AssertionError(bad)
    f = PeersFile(str(tmp_path / "p"))
    assert f.changed() == [] and f.changed() is None
    (tmp_path / "p").write_text("a:1\n")
    assert f.changed() == ["a:1"] and f.changed() is None
    (tmp_path / "p").write_text("a:1\nb:2\n")  # same second, other size
    assert f.changed() == ["a:1", "b:2"]
    (tmp_path / "p").write_text("a:1\nnonsense\n")
    assert f.changed() is None  # refused: the caller keeps its members
    (tmp_path / "p").unlink()
    assert f.changed() == []
