"""A front's heap and Python's cyclic GC: what stays is frozen, so collections skip it.

A front's event loop answers every create, and a collection stops it: every
decision in flight waits for the pause.  What a front holds for its life (the
modules, aiohttp's and gRPC's machinery, the view's first listing of the
nodes) is most of its heap, and CPython's full (generation-2) collection walks
all of it.  Measured (tools/bench/cluster_sim.py --probe, 1,000 nodes,
best-of-16, 32 clients, ~600 placements/s, before this module): 4 full
collections in 20 s pausing the loop 33 ms at the median and 97 ms at most —
the decision p99 is in the tens of ms; on an idle machine a full collection of
a started front took 9.4 ms, and 20 ms with 20,000 routes as objects.

``settle()`` collects once and freezes what survived (``gc.freeze``: moved to
the permanent generation, never examined again), after the view's first load.
Routes are kept as plain strings (``view.py``), which the GC does not track, so
the frozen routes dict is not walked however many sandboxes run.  The
thresholds are raised so the young generation is collected about ten times less
often (a front allocates per request; each collection costs a loop stop of its
own); a full collection still comes when the survivors since the last one grow
by a quarter (CPython's own rule), so garbage cycles are still freed.
"""

from __future__ import annotations

import gc

# (young, middle, old): CPython's default is (700, 10, 10).
THRESHOLDS = (7000, 10, 10)


def settle() -> None:
    """Collect, then freeze everything alive: call once the long-lived state is loaded."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
