#!/usr/bin/env python3
"""Round trips of the scheduler's etcd client (sandbox/cluster/etcd.py) to a real etcd.

A one-member etcd 3.4 on loopback (tests/etcd_cluster.py starts it in a temporary
dir); ``--calls`` sequential puts, txns (a compare on mod_revision + a put: a
reservation's shape) and gets, p50/p99 of each; then ``--concurrency`` tasks doing
txns at once on the client's one session, txns per second.

    .venv/bin/python tools/bench/etcd_rtt.py [--calls 1000] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from etcd_cluster import EtcdCluster

from sandbox.cluster.etcd import Compare, Etcd, Op


async def bench(endpoints: list[str], calls: int, concurrency: int) -> dict[str, float]:
    etcd = Etcd(endpoints)
    out: dict[str, float] = {}
    try:
        kinds = {
            "put": lambda i: etcd.put(f"b/{i % 10}", "v" * 200),
            "txn": lambda i: etcd.txn([Compare.mod_revision(f"b/{i % 10}", "<", 1 << 60)],
                                      [Op.put(f"b/{i % 10}", "v" * 200)]),
            "get": lambda i: etcd.get(f"b/{i % 10}"),
        }
        for name, call in kinds.items():
            times = []
            for i in range(calls):
                t0 = time.perf_counter()
                await call(i)
                times.append(time.perf_counter() - t0)
            times.sort()
            out[f"{name}_p50_ms"] = round(times[len(times) // 2] * 1e3, 2)
            out[f"{name}_p99_ms"] = round(times[int(len(times) * 0.99)] * 1e3, 2)

        async def worker(k: int) -> None:
            for _ in range(calls // concurrency):
                await etcd.txn([Compare.mod_revision(f"c/{k}", "<", 1 << 60)], [Op.put(f"c/{k}", "v")])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        out["concurrent_txn_per_s"] = round(calls // concurrency * concurrency / (time.perf_counter() - t0))
    finally:
        await etcd.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EtcdCluster(Path(tmp), 1)
        try:
            result = asyncio.run(bench(cluster.endpoints, args.calls, args.concurrency))
        finally:
            cluster.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
