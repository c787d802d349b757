"""The etcd client (sandbox.cluster.etcd) against a real etcd 3.4 started by the test:
KV, transactions, leases, watches across restarts and lost members, unavailability, auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from etcd_cluster import EtcdCluster, etcd1, etcd3  # noqa: F401  (fixtures)

from cubefs.errors import UsageError
from sandbox.cluster.etcd import (
    Compacted,
    Compare,
    Etcd,
    EtcdAuthError,
    EtcdUnavailable,
    Event,
    LeaseKeeper,
    Op,
    prefix_end,
)

T = TypeVar("T")


def run(cluster: EtcdCluster, body: Callable[[Etcd], Awaitable[T]], **kw: Any) -> T:
    """``body(client)`` on a fresh event loop with a client of ``cluster``, closed after."""

    async def main() -> T:
        etcd = Etcd(cluster.endpoints, **kw)
        try:
            return await body(etcd)
        finally:
            await etcd.close()

    return asyncio.run(main())


async def collect(etcd: Etcd, prefix: str, start: int, want: int, into: list[Event]) -> None:
    async for batch in etcd.watch(prefix, start):
        into.extend(batch)
        if len(into) >= want:
            return


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_put_get_range_delete(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        assert await etcd.get("nodes/a") is None
        r1 = await etcd.put("nodes/a", b"\x00\xffbinary")
        r2 = await etcd.put("nodes/b", "text")
        await etcd.put("nodesX", "not under the prefix")
        assert r2 == r1 + 1
        kv = await etcd.get("nodes/a")
        assert kv is not None and kv.value == b"\x00\xffbinary" and kv.mod_revision == r1 and kv.version == 1
        kvs, rev = await etcd.range("nodes/")
        assert [k.key for k in kvs] == ["nodes/a", "nodes/b"] and rev == r2 + 1
        assert await etcd.put("nodes/a", "again") > rev
        kv = await etcd.get("nodes/a")
        assert kv is not None and kv.version == 2 and kv.create_revision == r1
        assert await etcd.delete("nodes/", prefix=True) == 2
        assert await etcd.delete("nodes/a") == 0
        assert (await etcd.range("nodes/"))[0] == [] and await etcd.get("nodesX") is not None

    run(etcd1, body)


def test_txn_compare_and_swap_one_winner(etcd1: EtcdCluster) -> None:  # noqa: F811
    """Two fronts reserve the last free unit of a node at once: exactly one wins."""

    async def reserve(etcd: Etcd, who: str) -> bool:
        kv = await etcd.get("free/n1")
        assert kv is not None
        left = int(kv.value)
        if left < 1:
            return False
        res = await etcd.txn([Compare.mod_revision("free/n1", "=", kv.mod_revision)],
                             [Op.put("free/n1", str(left - 1)), Op.put(f"resv/{who}", "n1")],
                             [Op.get("free/n1")])
        if not res.succeeded:
            assert res.responses[0][0].value == b"0"  # the failure branch's read: what won
        return res.succeeded

    async def body(etcd: Etcd) -> None:
        await etcd.put("free/n1", "1")
        other = Etcd(etcd1.endpoints)
        try:
            for _ in range(5):
                await etcd.put("free/n1", "1")
                await etcd.delete("resv/", prefix=True)
                wins = await asyncio.gather(reserve(etcd, "a"), reserve(other, "b"))
                assert sorted(wins) == [False, True], wins
                assert len((await etcd.range("resv/"))[0]) == 1
        finally:
            await other.close()
        # The other compares and a missing key (version 0).
        res = await etcd.txn([Compare.version("nokey", "=", 0), Compare.value("free/n1", "=", b"0")],
                             [Op.put("nokey", "x"), Op.delete("free/n1")])
        assert res.succeeded and res.responses == [None, 1]
        res = await etcd.txn([Compare.create_revision("nokey", "<", 0)], [], [Op.get("nokey")])
        assert not res.succeeded and res.responses[0][0].value == b"x"
        # Over a range (the scheduler's "no reservation on this node since revision R"): every key
        # under the prefix must hold; a put under it after R fails it, one beside it does not.
        since = await etcd.put("resv/n2/a", "1")
        await etcd.put("resv/n20", "beside the prefix")
        unchanged = Compare.mod_revision("resv/n2/", "<", since + 1, range_end=prefix_end("resv/n2/"))
        assert (await etcd.txn([unchanged], [Op.put("resv/n2/b", "2")])).succeeded
        assert not (await etcd.txn([unchanged], [Op.put("resv/n2/c", "3")])).succeeded
        assert [k.key for k in (await etcd.range("resv/n2/"))[0]] == ["resv/n2/a", "resv/n2/b"]
        with pytest.raises(ValueError):
            Compare.version("k", "==", 1)

    run(etcd1, body)


def test_leases_expire_and_keepalive_keeps_them(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        lost: list[bool] = []
        kept = LeaseKeeper(etcd, 2, on_lost=lambda: lost.append(True))
        kept_id = await kept.start()
        loose = await etcd.grant(2)
        assert 0 < await etcd.time_to_live(loose) <= 2
        await etcd.put("alive/kept", "k", lease=kept_id)
        await etcd.put("alive/loose", "l", lease=loose)
        assert (await etcd.get("alive/loose")).lease == loose  # type: ignore[union-attr]
        await asyncio.sleep(4.0)  # two TTLs
        assert await etcd.get("alive/loose") is None and await etcd.time_to_live(loose) == -1
        assert await etcd.keepalive(loose) == 0
        assert await etcd.get("alive/kept") is not None and kept.alive and not lost
        # etcd forgets the lease (as when it expired while etcd was unreachable): noticed.
        await etcd.revoke(kept_id)
        await until(lambda: bool(lost), timeout=3)
        assert not kept.alive and await etcd.get("alive/kept") is None
        await kept.stop()
        # A clean stop revokes: the keys go at once.
        keeper = LeaseKeeper(etcd, 30)
        await etcd.put("alive/x", "x", lease=await keeper.start())
        await keeper.stop()
        assert await etcd.get("alive/x") is None
        await etcd.revoke(keeper.lease)  # already gone: not an error

    run(etcd1, body)


def test_watch_in_order_across_etcd_restart(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        start = await etcd.put("other", "x") + 1
        events: list[Event] = []
        watcher = asyncio.create_task(collect(etcd, "w/", start, 20, events))
        for i in range(5):
            await etcd.put(f"w/{i}", str(i))
        await etcd.delete("w/0")
        await until(lambda: len(events) == 6)
        await asyncio.to_thread(etcd1.stop, 0)
        await asyncio.sleep(0.5)  # the watch retries against nobody
        await asyncio.to_thread(etcd1.start, 0)
        for i in range(5, 10):
            await etcd.put(f"w/{i}", str(i))
        await etcd.delete("w/", prefix=True)  # w/1..w/9: 9 deletes in one revision
        await asyncio.wait_for(watcher, 15)
        got = [(e.type, e.kv.key) for e in events]
        want = ([("PUT", f"w/{i}") for i in range(5)] + [("DELETE", "w/0")]
                + [("PUT", f"w/{i}") for i in range(5, 10)] + [("DELETE", f"w/{i}") for i in range(1, 10)])
        assert got == want
        revs = [e.kv.mod_revision for e in events]
        assert revs == sorted(revs) and len({(r, k) for r, (_t, k) in zip(revs, got)}) == len(got)
        # The last delete's events came in one batch, with its values gone.
        assert events[-1].kv.value == b""

    run(etcd1, body)


def test_watch_from_compacted_revision_raises(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        for i in range(5):
            rev = await etcd.put("c/k", str(i))
        etcd1.etcdctl("compact", str(rev))
        with pytest.raises(Compacted) as err:
            await asyncio.wait_for(collect(etcd, "c/", 2, 1, []), 10)
        assert err.value.compact_revision == rev and "list again" in str(err.value)

    run(etcd1, body)


def test_three_members_one_lost_changes_nothing(etcd3: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        keeper = LeaseKeeper(etcd, 3)
        lease = await keeper.start()
        await etcd.put("n/alive", "1", lease=lease)
        start = await etcd.put("n/0", "0")
        events: list[Event] = []
        watcher = asyncio.create_task(collect(etcd, "n/", start, 11, events))
        await until(lambda: len(events) == 1)
        # The member both the client and its watch use, the leader, dies (SIGKILL).
        await asyncio.to_thread(etcd3.kill, 0)
        t0 = time.monotonic()
        await etcd.put("n/1", "1")
        first = time.monotonic() - t0
        for i in range(2, 10):
            await etcd.put(f"n/{i}", str(i))
            assert await etcd.get(f"n/{i}") is not None
        res = await etcd.txn([Compare.version("n/9", "=", 1)], [Op.delete("n/9")])
        assert res.succeeded
        assert await etcd.keepalive(lease) > 0 and await etcd.time_to_live(lease) > 0
        await asyncio.wait_for(watcher, 15)
        assert [e.kv.key for e in events] == [f"n/{i}" for i in range(10)] + ["n/9"], events
        assert first < etcd.timeout + 0.5, first
        await asyncio.sleep(3.5)  # longer than the lease: the keeper kept it through the loss
        assert keeper.alive and await etcd.get("n/alive") is not None
        await keeper.stop()

    leader = etcd3.leader()  # first in the client's list: the member it talks to
    etcd3.members = etcd3.members[leader:] + etcd3.members[:leader]
    run(etcd3, body, timeout=2.0)


def test_all_members_down_is_unavailable_fast(etcd3: EtcdCluster) -> None:  # noqa: F811
    async def body(etcd: Etcd) -> None:
        await etcd.put("k", "v")
        for i in range(3):
            await asyncio.to_thread(etcd3.stop, i)
        for call in (etcd.get("k"), etcd.put("k", "v"), etcd.grant(5)):
            t0 = time.monotonic()
            with pytest.raises(EtcdUnavailable, match="etcd unavailable"):
                await call
            assert time.monotonic() - t0 < 3.0
        # Back: it recovers by itself.
        for i in range(3):
            await asyncio.to_thread(etcd3.start, i, False)
        await asyncio.to_thread(etcd3.wait_healthy)
        assert (await etcd.get("k")).value == b"v"  # type: ignore[union-attr]

    run(etcd3, body, timeout=1.0)


def test_auth_user_password(etcd1: EtcdCluster) -> None:  # noqa: F811
    etcd1.etcdctl("user", "add", "root:s3cret-pw")
    etcd1.etcdctl("auth", "enable")

    async def anonymous(etcd: Etcd) -> None:
        with pytest.raises(EtcdAuthError, match="user name is empty"):
            await etcd.get("k")

    async def wrong(etcd: Etcd) -> None:
        with pytest.raises(EtcdAuthError, match=r"could not log in: .*invalid user ID or password"):
            await etcd.put("k", "v")

    async def right(etcd: Etcd) -> None:
        rev = await etcd.put("a/k", "v")
        assert (await etcd.get("a/k")).value == b"v"  # type: ignore[union-attr]
        events: list[Event] = []
        await asyncio.wait_for(collect(etcd, "a/", rev, 1, events), 10)
        assert events[0].kv.key == "a/k"

    run(etcd1, anonymous)
    run(etcd1, wrong, user="root", password="wrong")
    run(etcd1, right, user="root", password="s3cret-pw")
    assert etcd1.etcdctl("get", "a/k", user="root:s3cret-pw").stdout.split() == ["a/k", "v"]


def test_https_with_a_ca_file(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd-tls", 1, tls=True)
    try:
        assert cluster.endpoints[0].startswith("https://")

        async def trusted(etcd: Etcd) -> None:
            await etcd.put("t/k", "v")
            assert (await etcd.get("t/k")).value == b"v"  # type: ignore[union-attr]
            events: list[Event] = []
            await asyncio.wait_for(collect(etcd, "t/", 1, 1, events), 10)
            assert events[0].kv.key == "t/k"

        async def untrusted(etcd: Etcd) -> None:  # the system's CAs do not know this one
            with pytest.raises(EtcdUnavailable, match=r"TLS: .*certificate verify failed.*CUBEFS_ETCD_CA"):
                await etcd.get("t/k")

        run(cluster, trusted, ca_file=cluster.ca_file)
        run(cluster, untrusted)
    finally:
        cluster.close()


def test_endpoints_from_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBEFS_ETCD_USER", raising=False)
    monkeypatch.delenv("CUBEFS_ETCD_PASSWORD", raising=False)
    e = Etcd.from_text("10.0.0.1:2379, https://etcd.example:2379/")
    assert e.endpoints == ["http://10.0.0.1:2379", "https://etcd.example:2379"] and e.user is None
    for junk in ("", ",", "ftp://h:1", "h", "http://h", "http://u:p@h:1", "h:notaport", "http://h:1/v3"):
        with pytest.raises(UsageError):
            Etcd.from_text(junk)
    monkeypatch.setenv("CUBEFS_ETCD_USER", "root:pw")
    e = Etcd.from_text("h:1")
    assert (e.user, e.password) == ("root", "pw")
    monkeypatch.setenv("CUBEFS_ETCD_USER", "root")
    with pytest.raises(UsageError, match="CUBEFS_ETCD_PASSWORD"):
        Etcd.from_text("h:1")
