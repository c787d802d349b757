"""Latency quantiles a front reports: every sample since it started, in 5 %-wide buckets.

The front kept its last 2,000 decisions and sorted them per ``/metrics`` read; at 500
placements/s that is the last 4 s, so one etcd stall in those seconds made a 20-s run's
p99 (tools/bench/cluster_sim.py, 1,000 nodes: the same code measured p99 12.8 and 89 ms in
turns, the 89 from 20-odd decisions queued behind one slow transaction), and sorting more
would stop the event loop for each read.  Counting into logarithmic buckets costs one
``log`` per sample, keeps everything, and a quantile is a walk over ~200 buckets; it reads
a bucket's upper edge, at most 5 % above the true value.
"""

from __future__ import annotations

import math

STEP = math.log(1.05)  # each bucket 5 % wider than the one below it
FLOOR = 1e-6  # seconds: anything shorter counts as this


class Latency:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, seconds: float) -> None:
        k = math.ceil(math.log(max(seconds, FLOOR)) / STEP)
        self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1

    def quantile(self, q: float) -> float:
        """The q-quantile's bucket's upper edge, in seconds (0.0 with no samples)."""
        if not self.n:
            return 0.0
        rank = min(self.n - 1, int(q * self.n))
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen > rank:
                return math.exp(k * STEP)
        return math.exp(max(self.counts) * STEP)  # not reached: rank < n
