#!/usr/bin/env python3
"""Which eviction policy for the node's disk cache: byte hit ratios on a start-up workload.

The disk cache (cubefs/cache/disk.py) must pick what to drop when a node's
sandboxes need more chunks than it holds.  This replays one synthetic but
measured-shaped workload through LRU, FIFO, CLOCK (what cubefs implements)
and S3-FIFO, at several cache sizes, and prints byte hit ratios relative to
LRU in the same run.

The workload, shaped by what `coldstart.py` measured on this project's
images: a node starts sandboxes from 40 images, chosen with Zipf(1.1)
popularity.  A start reads its image's start-up set in trace order:
5-30 MB in 64 KiB chunks (import json read 5 MB, numpy 16 MB, pandas 28 MB),
of which 60% is shared by every image (the Debian/Python base) and the rest
belongs to the image.  One start in 20 is an agent that also reads a 200 MB
dataset once (a scan that no later start touches again).

    .venv/bin/python tools/bench/eviction.py --starts 4000
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

CHUNK = 64 * 1024


def workload(starts: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    images = 40
    base = list(range(200_000, 200_000 + 480))  # ~30 MB of shared base chunks
    sets = []
    for i in range(images):
        n = rng.randint(80, 480)  # 5-30 MB
        own = [i * 1000 + k for k in range(int(n * 0.4))]
        shared = rng.sample(base, int(n * 0.6))
        order = own + shared
        rng.shuffle(order)
        sets.append(order)
    weights = [1 / (r + 1) ** 1.1 for r in range(images)]
    scan_id = 10_000_000
    for _ in range(starts):
        yield from sets[rng.choices(range(images), weights)[0]]
        if rng.random() < 0.05:
            yield from range(scan_id, scan_id + 3200)  # 200 MB read once
            scan_id += 3200


def lru(capacity: int, promote: bool = True) -> Callable[[int], bool]:
    """LRU; with ``promote=False``, FIFO (a hit does not move the entry)."""
    cache: OrderedDict[int, None] = OrderedDict()

    def access(key: int) -> bool:
        if key in cache:
            if promote:
                cache.move_to_end(key)
            return True
        cache[key] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
        return False

    return access


def fifo(capacity: int) -> Callable[[int], bool]:
    return lru(capacity, promote=False)


def clock(capacity: int) -> Callable[[int], bool]:
    """Insertion-ordered queue with a reference bit; referenced entries go to the back."""
    queue: deque[int] = deque()
    ref: dict[int, bool] = {}

    def access(key: int) -> bool:
        if key in ref:
            ref[key] = True
            return True
        while len(ref) >= capacity:
            victim = queue.popleft()
            if ref[victim]:
                ref[victim] = False
                queue.append(victim)
            else:
                del ref[victim]
        queue.append(key)
        ref[key] = False
        return False

    return access


def s3fifo(capacity: int) -> Callable[[int], bool]:
    """S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO with
    reinsertion, and a ghost queue of keys recently evicted from the small one."""
    small_cap = max(1, capacity // 10)
    small: deque[int] = deque()
    main: deque[int] = deque()
    freq: dict[int, int] = {}
    where: dict[int, str] = {}
    ghost: OrderedDict[int, None] = OrderedDict()

    def evict_main() -> None:
        while True:
            k = main.popleft()
            if freq[k] > 0:
                freq[k] -= 1
                main.append(k)
            else:
                del freq[k], where[k]
                return

    def evict_small() -> None:
        k = small.popleft()
        if freq[k] > 0:
            where[k] = "main"
            freq[k] = 0
            main.append(k)
            if len(main) > capacity - small_cap:
                evict_main()
        else:
            del freq[k], where[k]
            ghost[k] = None
            if len(ghost) > capacity - small_cap:
                ghost.popitem(last=False)

    def access(key: int) -> bool:
        if key in where:
            freq[key] = min(freq[key] + 1, 3)
            return True
        if key in ghost:
            del ghost[key]
            where[key], freq[key] = "main", 0
            main.append(key)
            if len(main) > capacity - small_cap:
                evict_main()
        else:
            where[key], freq[key] = "small", 0
            small.append(key)
            if len(small) > small_cap:
                evict_small()
        return False

    return access


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=3, help="workloads replayed (median reported)")
    args = ap.parse_args()
    policies = {"LRU": lru, "FIFO": fifo, "CLOCK": clock, "S3-FIFO": s3fifo}
    sizes_mb = (64, 256, 1024)
    print(f"{'cache':>8}  " + "  ".join(f"{p:>15}" for p in policies))
    for size_mb in sizes_mb:
        capacity = size_mb * 1024 * 1024 // CHUNK
        ratios: dict[str, list[float]] = {p: [] for p in policies}
        for seed in range(args.seeds):
            trace = list(workload(args.starts, seed))
            for name, make in policies.items():
                access = make(capacity)
                hits = sum(access(k) for k in trace)
                ratios[name].append(hits / len(trace))
        med = {p: sorted(v)[len(v) // 2] for p, v in ratios.items()}
        cells = [f"{med[p]:6.3f} ({med[p] / med['LRU']:.2f}x)" for p in policies]
        print(f"{size_mb:>6}MB  " + "  ".join(f"{c:>15}" for c in cells))
    print("byte hit ratio (median over seeds), and its ratio to LRU in the same run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
