"""Sandbox snapshots: a running sandbox's memory and disk at one instant, kept by the node.

A snapshot is ``STATE/snapshots/ID/``: a VM checkpoint (``vmm.checkpoint``:
``ram`` holds the guest's pages that differ from its VM template, device state
and the root back-end's state; ``checkpoint.json``) and ``snapshot.json``
(this record).  Its disk is a volume of its own, ``sbxsnap-ID``, an O(1)
clone of the sandbox's volume snapshot taken in the same pause, itself
snapshotted as ``@ready``: a sandbox made from the snapshot clones that, so
the snapshot outlives the sandbox it was taken of.  Deleting it removes the
directory and the volume; what only it held goes with the next volume gc.

**Durable after the answer.**  ``create_snapshot()`` answers once the snapshot
can be used (its record written, with ``durable: false``); the service then
trims the RAM file (vmm/memsnap.py) and syncs the volume directory and the
snapshot's files, and marks it durable.  A service that restarts finds a
record not durable: of the same host boot, its files are in the page cache
and it syncs them; of an earlier boot (a power cut came before the sync) it
removes the snapshot, which may have lost pages.  The trim and the sync were
0.1-0.6 s of each call under load (docs/benchmarks.md).

In the E2B API a snapshot is a template: ``Sandbox.create(snapshotID)`` makes
a sandbox from it and ``DELETE /templates/{snapshotID}`` removes it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cubefs.errors import NotFoundError
from sandbox.config import private_dir, state_dir, write_private

ID_ALPHABET = string.ascii_lowercase + string.digits
READY = "ready"


def snapshots_dir() -> Path:
    """``$CUBEFS_SNAPSHOT_DIR`` (``serve --snapshot-dir``: snapshots hold guest RAM, and may
    want a disk of their own), else ``STATE/snapshots``."""
    override = os.environ.get("CUBEFS_SNAPSHOT_DIR")
    return Path(override) if override else state_dir() / "snapshots"


def new_snapshot_id() -> str:
    """``snap-`` and 16 of [a-z0-9]: never a template's name (templates.create refuses ``snap-``)."""
    return "snap-" + "".join(secrets.choice(ID_ALPHABET) for _ in range(16))


def is_snapshot_id(name: str) -> bool:
    return name.startswith("snap-")


@dataclass
class SnapshotRecord:
    snapshot_id: str
    sandbox_id: str  # the sandbox it was taken of
    template: str  # that sandbox's template (a sandbox made from the snapshot reports it)
    volume: str  # sbxsnap-ID: its disk, snapshotted as @ready
    cpus: int
    memory_mb: int
    created: float
    names: list[str] = field(default_factory=list)
    hidden: bool = False  # a fork's snapshot: not listed, removed once the forks run
    memory: bool = True  # False: the disk only; a sandbox made from it boots its template afresh
    env_vars: dict[str, str] = field(default_factory=dict)
    paused_seconds: float = 0.0
    seconds: float = 0.0
    ram_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # where the service's time went: for the benchmarks
    durable: bool = True  # False: answered before its files were synced (the service syncs them next)
    boot_id: str = ""  # the host's boot a not-yet-durable snapshot was taken in (boot_id())

    @property
    def dir(self) -> Path:
        return snapshots_dir() / self.snapshot_id

    def save(self) -> None:
        write_private(self.dir / "snapshot.json", json.dumps(asdict(self), indent=1) + "\n")

    def info(self) -> dict[str, object]:
        """The E2B API's ``SnapshotInfo``."""
        return {"snapshotID": self.snapshot_id, "names": list(self.names) or [self.snapshot_id]}

    @classmethod
    def load(cls, snapshot_id: str) -> SnapshotRecord:
        path = snapshots_dir() / snapshot_id / "snapshot.json"
        if not is_snapshot_id(snapshot_id) or "/" in snapshot_id or not path.is_file():
            raise NotFoundError(f"snapshot {snapshot_id!r} not found")
        doc = json.loads(path.read_text())
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    @classmethod
    def list(cls, include_hidden: bool = False) -> list[SnapshotRecord]:
        out = []
        root = snapshots_dir()
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                rec = cls.load(d.name)
            except (NotFoundError, ValueError, TypeError, OSError):
                continue  # half-made (no record yet): cleaned by the service at start
            if include_hidden or not rec.hidden:
                out.append(rec)
        return sorted(out, key=lambda r: (r.created, r.snapshot_id))

    @classmethod
    def find(cls, name: str) -> SnapshotRecord:
        """A snapshot by its ID or one of its names."""
        if is_snapshot_id(name):
            return cls.load(name)
        for rec in cls.list():
            if name in rec.names:
                return rec
        raise NotFoundError(f"snapshot {name!r} not found")


def boot_id() -> str:
    """This boot of the host: a snapshot not yet synced when the host went down (another boot
    now) may have lost any of its files; one whose service alone died (the same boot) has them
    all in the page cache, and is synced then."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def volume_of(snapshot_id: str) -> str:
    """The volume that holds a snapshot's disk."""
    return "sbxsnap-" + snapshot_id.removeprefix("snap-")


def new_dir(snapshot_id: str) -> Path:
    """The snapshot's directory, made private; the checkpoint goes in ``ckpt`` inside it."""
    return private_dir(private_dir(snapshots_dir()) / snapshot_id)


def remove_dir(snapshot_id: str) -> None:
    shutil.rmtree(snapshots_dir() / snapshot_id, ignore_errors=True)
