"""What the cluster keeps in etcd, and under which keys (docs/design.md, "The cluster").

Everything lives under one prefix (``--etcd-prefix``, default ``/cubefs/``):

``nodes/NAME``                 a :class:`NodeInfo` (JSON), under the node's lease: a node whose
                               lease lapses disappears, and with it everything below that it owns
``sandboxes/ID``               a :class:`Route` (JSON): which node runs the sandbox; the node's lease
``members/NAME``               the node's peer chunk server address (``""``: none), under its lease:
                               written once per lease, so the nodes watching it (for their peers
                               file) see nothing of the record updates every create makes
``reservations/NODE/RID``      a :class:`Reservation` (JSON): capacity a front has promised a create
                               that the node has not yet answered; the *front's* lease, so a front
                               killed mid-create leaks nothing beyond its lease time

A node's free capacity, as the scheduler sees it, is its limits minus what it
holds (``used_*``, which includes pooled and half-made sandboxes) minus the
reservations outstanding on it.  The node deletes a reservation in the same
transaction that publishes the sandbox it made of it, so a create is counted
once: in the reservation until then, in ``used_*`` from then on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Self

from cubefs.errors import UsageError

DEFAULT_PREFIX = "/cubefs/"
RESERVATION_HEADER = "X-Cubefs-Reservation"  # front -> node: the reservation a create fills


class Record:
    """A value in etcd: compact JSON; fields a newer cubefs added are ignored, missing ones
    (with defaults) filled, so nodes and fronts of two versions read each other's records."""

    def encode(self) -> bytes:
        # The fields as they are, not ``dataclasses.asdict``: that deep-copies every dict and list
        # first, and was the largest part of a node's publishing (cProfile of the simulated nodes,
        # tools/bench/cluster_sim.py: 2.5 of 8.0 s in ``_flush``, ~40 us per NodeInfo).
        doc = {name: getattr(self, name) for name in self.__dataclass_fields__}  # type: ignore[attr-defined]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        doc: dict[str, Any] = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})  # type: ignore[attr-defined]


@dataclass
class NodeInfo(Record):
    """What a node publishes about itself: enough to filter, score and reach it."""

    name: str
    api: str  # http://host:port of its E2B API
    proxy: str  # http://host:port of its sandbox proxy
    peer: str = ""  # host:port of its peer chunk server ("" = none)
    vcpus: int = 0  # limits, overcommit applied
    memory_mb: int = 0
    used_vcpus: int = 0  # held: running, pooled and being made
    used_mb: int = 0
    sandboxes: int = 0
    templates: dict[str, list[int]] = field(default_factory=dict)  # template or snapshot ID -> [vcpus, MiB]
    pools: dict[str, int] = field(default_factory=dict)  # template -> ready pooled sandboxes
    cached: dict[str, float] = field(default_factory=dict)  # template -> fraction of its image's bytes cached
    started: float = 0.0
    version: str = ""


@dataclass
class Route(Record):
    node: str
    template: str = ""


@dataclass
class Reservation(Record):
    node: str
    template: str
    vcpus: int
    memory_mb: int
    front: str = ""


class Layout:
    """Key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix:
            raise UsageError(f"etcd prefix {prefix!r}: use a path like /cubefs/ (leading and trailing slash)")
        self.prefix = prefix
        self.nodes = prefix + "nodes/"
        self.sandboxes = prefix + "sandboxes/"
        self.reservations = prefix + "reservations/"
        self.members = prefix + "members/"

    def node(self, name: str) -> str:
        return self.nodes + name

    def member(self, name: str) -> str:
        return self.members + name

    def sandbox(self, sandbox_id: str) -> str:
        return self.sandboxes + sandbox_id

    def reservations_of(self, node: str) -> str:
        return f"{self.reservations}{node}/"

    def reservation(self, node: str, rid: str) -> str:
        return f"{self.reservations}{node}/{rid}"


def check_node_name(name: str) -> str:
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-.":
        raise UsageError(f"node name {name!r}: use 1-63 letters, digits, '-', '_' or '.'")
    return name
