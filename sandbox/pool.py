"""Warm pools and the node's capacity: a create takes a sandbox that is already made.

**Pools** (seed 2.2: "every resource a sandbox needs is pre-prepared and
pooled").  Per template, ``size`` sandboxes are made ahead of demand — volume
cloned, VM restored, root attached and mounted, agent session open, the
template's start command running — and then *paused* (QMP ``stop``): a paused
guest burns no CPU, and its clock and randomness are set again when it is
taken.  A create takes one, resumes it, gives it fresh randomness, the
host's clock, its envVars, metadata and TTL, and the pool refills in the
background, one sandbox at a time (a fill is CPU-bound: two at once on a
small node only slow both, and creates with them).  Before it is paused a
pooled sandbox runs the SDK's first command once (``SandboxService._warm``),
so the caller's first command is fast: under TCG that holds ~13 MiB more
(translated code, page cache) than a sandbox never used, which is what that
first command would cost anyway (docs/benchmarks.md "The pool's warm-up").

**Capacity.**  The node accounts vCPUs and memory of everything it holds
(running, being created, pooled) against its limits times an overcommit
factor.  A create that does not fit first evicts pooled sandboxes (a pool is
an optimisation, never a reason to refuse), then is refused: the API answers
429 with ``Should-Retry: false``, so a cluster scheduler places it elsewhere
instead of the SDK retrying here.  Reservations are made on the event loop
with no ``await`` between the check and the booking, so concurrent creates
never overbook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cubefs.errors import CubefsError


class CapacityError(CubefsError):
    """The node cannot hold another sandbox of this size (HTTP 429, Should-Retry: false)."""


def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


@dataclass
class Capacity:
    """What the node may hold: vCPUs and guest memory (MiB), overcommit included."""

    vcpus: int
    memory_mb: int
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # sandbox id -> (vcpus, MiB)

    @classmethod
    def of_host(cls, cpu_overcommit: float = 16.0, memory_overcommit: float = 1.0,
                vcpus: int | None = None, memory_mb: int | None = None) -> Capacity:
        """Defaults: 16 vCPUs per host CPU, and guest memory up to the host's.  Agent sandboxes
        idle most of their lives (E2B places at 4x the CPUs *requested*, weighing measured use
        at half), so memory is what bounds a node: guests touch little of theirs and a
        template's pages are shared by every clone, but what they declare is what they may use.
        At 4x, this 2-core machine would hold 8 sandboxes."""
        return cls(vcpus if vcpus is not None else int((os.cpu_count() or 1) * cpu_overcommit),
                   memory_mb if memory_mb is not None else int(host_memory_mb() * memory_overcommit))

    @property
    def used(self) -> tuple[int, int]:
        return sum(c for c, _ in self.held.values()), sum(m for _, m in self.held.values())

    def fits(self, cpus: int, memory_mb: int) -> bool:
        used_cpus, used_mb = self.used
        return used_cpus + cpus <= self.vcpus and used_mb + memory_mb <= self.memory_mb

    def reserve(self, sandbox_id: str, cpus: int, memory_mb: int) -> None:
        if not self.fits(cpus, memory_mb):
            used_cpus, used_mb = self.used
            raise CapacityError(f"this node is full: {used_cpus}/{self.vcpus} vCPUs and {used_mb}/"
                                f"{self.memory_mb} MiB held; a sandbox of {cpus} vCPU and {memory_mb} MiB "
                                "does not fit")
        self.held[sandbox_id] = (cpus, memory_mb)

    def release(self, sandbox_id: str) -> None:
        self.held.pop(sandbox_id, None)
