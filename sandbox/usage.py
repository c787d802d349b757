"""A sandbox's CPU, memory and disk as its guest sees them: E2B's ``GET /sandboxes/{id}/metrics``
(the SDK's ``get_metrics()``), which answered 404 here before — the SDK then said a running
sandbox was not found.

Sampled when asked, not in the background: a sample is one short process in the guest (two
reads of ``/proc/stat`` ``WINDOW`` seconds apart for the CPU, ``/proc/meminfo``, ``df /``), and
a background sampler would cost every idle sandbox of the node that process every few seconds
under TCG for numbers nobody may read.  Each sample is kept (the last ``HISTORY``), so a caller
that asks now and then gets a time series, filtered by the query's ``start``/``end`` (Unix
seconds) as E2B's is.  A paused sandbox is not sampled: its history is what it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cubefs.errors import CubefsError, UsageError

WINDOW = 0.3  # seconds the CPU is measured over in one sample
DEADLINE = 10.0  # seconds a sample may take (0.3 s of it a sleep; a loaded TCG guest, a few more)
HISTORY = 720  # samples kept per sandbox
MANY = 100  # sandboxes one GET /sandboxes/metrics samples
SCRIPT = (f"head -n1 /proc/stat; sleep {WINDOW}; head -n1 /proc/stat; nproc; "
          "grep -E '^(MemTotal|MemAvailable|Buffers|Cached):' /proc/meminfo; df -P -B1 / | tail -n1")


@dataclass
class Sample:
    at: float
    cpu_count: int
    cpu_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int

    def api(self) -> dict[str, Any]:
        return {"timestamp": datetime.fromtimestamp(self.at, UTC).isoformat(), "timestampUnix": int(self.at),
                "cpuCount": self.cpu_count, "cpuUsedPct": self.cpu_pct, "memUsed": self.mem_used,
                "memTotal": self.mem_total, "memCache": self.mem_cache, "diskUsed": self.disk_used,
                "diskTotal": self.disk_total}


def parse(out: str, at: float) -> Sample:
    """The script's output as a sample; CubefsError if it is not what the script prints."""
    try:
        lines = out.splitlines()
        t0, t1 = ([int(x) for x in line.split()[1:]] for line in lines[:2])
        busy = [b - a for a, b in zip(t0, t1, strict=False)]
        idle = sum(busy[3:5])  # idle, iowait
        total = sum(busy[:8])  # user .. steal (guest time is inside user already)
        cpus = int(lines[2])
        mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines[3:7]}
        disk = lines[7].split()
        return Sample(at, cpus, round(100.0 * (total - idle) / total, 2) if total > 0 else 0.0,
                      mem["MemTotal"] - mem["MemAvailable"], mem["MemTotal"], mem["Buffers"] + mem["Cached"],
                      int(disk[2]), int(disk[1]))
    except (ValueError, IndexError, KeyError) as err:
        raise CubefsError(f"the guest's usage could not be read ({err}): {out[:200]!r}") from None


class Usage:
    """One sandbox's samples."""

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque(maxlen=HISTORY)

    async def sample(self, channel: Any) -> Sample:
        """A sample now; CubefsError if the guest does not give one within ``DEADLINE`` (its
        process is then killed: a stalled ``df`` holds nothing of the service's)."""
        proc = await channel.spawn(["/bin/sh", "-c", SCRIPT], user="root")
        out = bytearray()

        async def read() -> None:
            async for event in proc.events():
                if event[0] == "stdout":
                    out.extend(event[1])
                elif event[0] == "end" and event[1] != 0:
                    raise CubefsError(f"the guest's usage could not be read (exit {event[1]})")

        try:
            await asyncio.wait_for(read(), DEADLINE)
        except TimeoutError:
            with contextlib.suppress(CubefsError, OSError):
                await channel.signal(proc.pid, 9, group=True)  # sh and the df or sleep it waits on
            await proc.detach()
            raise CubefsError(f"the guest gave no usage sample within {DEADLINE:.0f} s") from None
        s = parse(out.decode(errors="replace"), time.time())
        self.samples.append(s)
        return s

    def between(self, start: int | None, end: int | None) -> list[dict[str, Any]]:
        return [s.api() for s in self.samples
                if (start is None or s.at >= start) and (end is None or s.at <= end)]


def bounds(query: Any) -> tuple[int | None, int | None]:
    """``start`` and ``end`` (Unix seconds) of a metrics query."""
    out: list[int | None] = []
    for key in ("start", "end"):
        value = query.get(key)
        try:
            out.append(None if value in (None, "") else int(value))
        except ValueError:
            raise UsageError(f"{key} must be a Unix time in seconds") from None
    return out[0], out[1]
