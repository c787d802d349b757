"""The volume commands: volume create/list/rm, snapshot, snapshots, rollback, clone.

Snapshots and clones are transactions on the volume index and work whether
or not the volume is mounted (LMDB serializes them with the daemon's
writes).  A rollback of a mounted volume goes through its daemon, which must
also make the kernel forget what it cached of the old state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time
from typing import Any
from urllib.parse import quote

from cubefs.errors import EXIT_OK, CubefsError, UsageError
from cubefs.node import control

log = logging.getLogger("cubefs.volume")


def default_volume_dir() -> str:
    env = os.environ.get("CUBEFS_VOLUME_DIR")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "cubefs", "volumes")


def volume_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volume-dir", default=None, metavar="DIR",
                   help="where volumes live: their index and written blocks (default: $CUBEFS_VOLUME_DIR or "
                   "~/.local/share/cubefs/volumes)")


def add_parsers(sub: Any, store_args: Any) -> None:
    p = sub.add_parser("volume", help="create, list and remove writable volumes",
                       description="A volume is a writable filesystem over an image: 'cubefs mount --volume NAME "
                       "MOUNTPOINT' mounts it read-write, fetching the image lazily; what is written stays local "
                       "(--volume-dir). 'create NAME --from NAME:TAG' (or with no --from: an empty volume), "
                       "'list', 'rm NAME', 'gc': flatten long snapshot chains, delete layers and data files "
                       "nothing refers to any more, drop what removed snapshots only held, and give back the "
                       "space of dead blocks (holes punched, mostly-dead data files compacted); safe while "
                       "volumes are mounted, whose daemons also do it in the background. 'create NAME --block "
                       "SIZE' makes a block volume, a VM's disk ('cubefs mount --volume NAME SOCKET --transport "
                       "vhost-user-blk' serves it to QEMU); 'export NAME[@SNAPSHOT] FILE' writes its bytes to a "
                       "raw image file.")
    p.add_argument("action", choices=("create", "list", "rm", "gc", "export"))
    p.add_argument("name", nargs="?", help="the volume (create, rm; export: VOLUME[@SNAPSHOT])")
    p.add_argument("file", nargs="?", help="export: the raw image file to write (must not exist)")
    p.add_argument("--from", dest="image", metavar="NAME:TAG", help="create: the image it starts as")
    p.add_argument("--block", type=_size, metavar="SIZE", default=None,
                   help="create: a block volume of SIZE bytes (e.g. 4G; a multiple of 512), all zeros")
    store_args(p)
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("snapshot", help="a point-in-time snapshot of a volume, in O(1); 'snapshot rm V@S' drops one",
                       description="'cubefs snapshot VOLUME [--name N]' freezes the volume's current state, "
                       "mounted and being written or not, in one small index transaction whatever its size. "
                       "'cubefs snapshot rm VOLUME@SNAPSHOT' forgets a snapshot.")
    p.add_argument("args", nargs="+", metavar="VOLUME | rm VOLUME@SNAPSHOT")
    p.add_argument("--name", default=None, help="the snapshot's name (default: the UTC time)")
    p.add_argument("--sync", action="store_true",
                   help="also make it durable against a power cut before returning (flushes every block "
                   "written since the last flush: takes as long as the disk needs). Without it the snapshot "
                   "survives any crash of the daemon at once, and a power cut after the daemon's next "
                   "background flush (every 5 s)")
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("snapshots", help="list a volume's snapshots")
    p.add_argument("volume")
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", help="make a volume show one of its snapshots again",
                       description="The volume shows SNAPSHOT's state; what was written since is dropped (take a "
                       "snapshot first to keep it). On a mounted volume this is immediate: the kernel's caches are "
                       "invalidated, open files read the snapshot's version of their file, and one created after "
                       "the snapshot fails with ENOENT: it no longer exists (on a --writeback-cache mount a file "
                       "held open keeps its size until its name is looked up again, then fails with EIO).")
    p.add_argument("volume")
    p.add_argument("snapshot")
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("commit", help="push a volume's state, or a snapshot's, to a store as a new image",
                       description="'cubefs commit VOLUME --tag NAME:TAG' snapshots the volume (the snapshot stays, "
                       "named commit-TIME) and builds that state as an image; 'cubefs commit VOLUME@SNAPSHOT' "
                       "commits a snapshot. Files the volume never changed are not read again and only chunks the "
                       "store lacks are uploaded. The store is the volume's base image's unless --store says "
                       "otherwise.")
    p.add_argument("source", metavar="VOLUME[@SNAPSHOT]")
    p.add_argument("--tag", required=True, metavar="NAME:TAG")
    store_args(p)
    p.add_argument("--cache-dir", default=None, help="disk cache for reading the base image (default: "
                   "$CUBEFS_CACHE_DIR or ~/.cache/cubefs)")
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("clone", help="N new volumes from one snapshot, in one transaction",
                       description="'cubefs clone VOLUME@SNAPSHOT --count N --prefix P' makes volumes P-0 .. P-(N-1), "
                       "each starting as the snapshot and diverging independently; all can be mounted at once.")
    p.add_argument("source", metavar="VOLUME@SNAPSHOT")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--prefix", required=True)
    volume_dir_arg(p)
    p.add_argument("--json", action="store_true")


def _size(text: str) -> int:
    from cubefs.humanize import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _index(args: argparse.Namespace) -> Any:
    from cubefs.cow.index import VolumeIndex

    return VolumeIndex(os.path.abspath(args.volume_dir or default_volume_dir()))


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def cmd_volume(args: argparse.Namespace) -> int:
    index = _index(args)
    try:
        if args.action == "list":
            vols = index.volumes()
            if args.json:
                print(json.dumps([{"name": v.name, "image": v.base.ref if v.base else None,
                                   "digest": f"sha256:{v.base.digest}" if v.base else None,
                                   "store": v.base.store if v.base else None, "created_ns": v.created_ns}
                                  for v in vols], indent=1))
            elif not vols:
                print("no volumes")
            else:
                print(f"{'VOLUME':24} {'IMAGE':28} CREATED")
                for v in vols:
                    print(f"{v.name:24} {v.base.ref if v.base else '(empty)':28} {_when(v.created_ns)}")
            return EXIT_OK
        if args.action == "gc":
            return _gc(index, args)
        if not args.name:
            raise UsageError(f"cubefs volume {args.action} needs a volume name")
        if args.action == "export":
            from cubefs.volume.blk import export_disk

            if not args.file:
                raise UsageError("usage: cubefs volume export VOLUME[@SNAPSHOT] FILE")
            volume, _, snap = args.name.partition("@")
            n = export_disk(index, volume, snap or None, args.file)
            print(json.dumps({"exported": args.name, "file": args.file, "bytes": n}) if args.json
                  else f"exported {args.name} to {args.file} ({n} bytes)")
            return EXIT_OK
        if args.action == "rm":
            from cubefs.cow.lock import VolumeLock, holder_of

            holder = holder_of(index, args.name)
            if holder is not None:
                raise UsageError(f"volume {args.name} is mounted at {holder.get('mountpoint', '?')}; unmount it first")
            with index.read() as txn:
                index.volume(txn, args.name)  # NotFound before a lock file is made for it
            lock = VolumeLock.take(index, args.name, "(being removed)")  # no mount may start meanwhile
            try:
                index.remove_volume(args.name)
                lock.unlink()
            finally:
                lock.release()
            print(json.dumps({"removed": args.name}) if args.json else f"removed volume {args.name}")
            return EXIT_OK
        vol = _create(index, args)
        if args.json:
            print(json.dumps({"name": vol.name, "image": vol.base.ref if vol.base else None}))
        else:
            what = (f" from {vol.base.ref}" if vol.base else f" (block, {args.block} bytes)" if args.block
                    else " (empty)")
            print(f"created volume {vol.name}{what}")
        return EXIT_OK
    finally:
        index.close()


def _gc(index: Any, args: argparse.Namespace) -> int:
    """Collect; a mounted volume's daemon is first asked, over its control socket, to let go
    of the data file it appends to, so that its dead blocks can be compacted too."""
    from cubefs.cow.gc import collect
    from cubefs.cow.lock import holder_of
    from cubefs.humanize import size

    for vol in index.volumes():
        holder = holder_of(index, vol.name)
        if holder and holder.get("mountpoint"):
            try:
                control.call(holder["mountpoint"], "/volume/roll", timeout=10)
            except CubefsError as err:  # an older daemon, or one going away: its file stays as it is
                print(f"note: {vol.name}'s daemon at {holder['mountpoint']} keeps its data file: {err}",
                      file=sys.stderr)
    st = collect(index)
    if args.json:
        print(json.dumps(st.as_dict()))
    else:
        print(f"reclaimed {size(st.bytes_reclaimed)}: deleted {st.layers_deleted} layers ({st.records_deleted} "
              f"records), {st.blocks_pruned} blocks hidden above removed snapshots and {st.files_deleted} data "
              f"files; punched {size(st.bytes_punched)} of dead blocks; compacted {st.files_compacted} files "
              f"({size(st.bytes_copied)} copied); flattened {st.chains_flattened} chains; {size(st.live_bytes)} "
              f"live, {size(st.dead_bytes_left)} not reclaimable yet")
    return EXIT_OK


def _create(index: Any, args: argparse.Namespace) -> Any:
    from cubefs.cow.index import BaseImage, Inode

    if args.block is not None:
        from cubefs.volume.blk import create_block_volume

        if args.image:
            raise UsageError("a block volume starts as zeros: --block and --from do not go together")
        return create_block_volume(index, args.name, args.block)
    if not args.image:
        now = time.time_ns()
        root = Inode(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now, now, now, 0, 2)
        return index.create_volume(args.name, None, root, 2)
    from cubefs.image.catalog import load_image, load_manifest
    from cubefs.remote import store_session

    with store_session(args.store, args.s3_endpoint) as (loop, store):
        manifest = loop.run(load_manifest(store, args.image))
        image, _chunkmap = loop.run(load_image(store, manifest))
        url = store.url
    base = BaseImage(manifest.ref, manifest.image, url, args.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"))
    return index.create_volume(args.name, base, None, len(image) + 1)


def _split(text: str) -> tuple[str, str]:
    volume, sep, snap = text.partition("@")
    if not sep or not volume or not snap:
        raise UsageError(f"expected VOLUME@SNAPSHOT, got {text!r}")
    return volume, snap


def cmd_snapshot(args: argparse.Namespace) -> int:
    index = _index(args)
    try:
        if args.args[0] == "rm" and len(args.args) == 2:
            from cubefs.cow.gc import prune

            volume, snap = _split(args.args[1])
            index.remove_snapshot(volume, snap)
            with index.write() as txn:  # what the next layer up hides of it can go now
                if prune(index, txn):
                    index.bump_generation(txn)
            print(json.dumps({"removed": f"{volume}@{snap}"}) if args.json else f"removed snapshot {volume}@{snap}")
            return EXIT_OK
        if len(args.args) != 1:
            raise UsageError("usage: cubefs snapshot VOLUME [--name N] | cubefs snapshot rm VOLUME@SNAPSHOT")
        from cubefs.volume.flush import flush_mounted

        t0 = time.perf_counter()
        flush_mounted(index, args.args[0])  # what a mapped file holds dirty belongs in the snapshot
        s = index.snapshot(args.args[0], args.name)
        if args.sync:
            index.sync_all()
        took = time.perf_counter() - t0
        if args.json:
            print(json.dumps({"volume": s.volume, "snapshot": s.name, "layer": s.layer, "seconds": took}))
        else:
            print(f"{s.volume}@{s.name} ({took * 1000:.1f} ms)")
        return EXIT_OK
    finally:
        index.close()


def cmd_snapshots(args: argparse.Namespace) -> int:
    index = _index(args)
    try:
        snaps = index.snapshots(args.volume)
    finally:
        index.close()
    if args.json:
        print(json.dumps([{"volume": s.volume, "snapshot": s.name, "layer": s.layer, "created_ns": s.created_ns}
                          for s in snaps], indent=1))
    elif not snaps:
        print(f"volume {args.volume} has no snapshots")
    else:
        for s in snaps:
            print(f"{s.volume}@{s.name:32} {_when(s.created_ns)}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from cubefs.cow.lock import holder_of

    index = _index(args)
    try:
        holder = holder_of(index, args.volume)
        if holder is None:
            t0 = time.perf_counter()
            layer = index.rollback(args.volume, args.snapshot)[0]
            result = {"volume": args.volume, "snapshot": args.snapshot, "layer": layer, "invalidations": 0,
                      "seconds": time.perf_counter() - t0}
        else:
            from cubefs.volume.flush import flush_mounted

            # What the kernel holds dirty (a shared mapping; every write with --writeback-cache) goes to
            # the daemon first: written back after the rollback, it would land in the snapshot's state.
            try:
                flush_mounted(index, args.volume)
            except OSError as err:  # a full volume: what would not flush is what the rollback drops anyway
                log.warning("rollback of %s: the mount's dirty pages could not all be flushed (%s): rolling back",
                            args.volume, err)
            result = control.call(holder["mountpoint"], "/volume/rollback/" + quote(args.snapshot, safe=""))
    finally:
        index.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.volume} now shows snapshot {args.snapshot} ({result['seconds'] * 1000:.1f} ms)")
    return EXIT_OK


def cmd_clone(args: argparse.Namespace) -> int:
    volume, snap = _split(args.source)
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    names = [f"{args.prefix}-{i}" for i in range(args.count)]
    index = _index(args)
    try:
        t0 = time.perf_counter()
        index.clone(volume, snap, names)
        took = time.perf_counter() - t0
    finally:
        index.close()
    if args.json:
        print(json.dumps({"source": args.source, "volumes": names, "seconds": took}))
    else:
        print(f"{len(names)} volumes from {args.source}: {names[0]} .. {names[-1]} ({took * 1000:.1f} ms)")
    return EXIT_OK


def cmd_commit(args: argparse.Namespace) -> int:
    from cubefs.format.manifest import parse_ref
    from cubefs.humanize import size
    from cubefs.node.control import default_cache_dir
    from cubefs.volume.commit import commit

    parse_ref(args.tag)
    volume, _, snap = args.source.partition("@")
    index = _index(args)
    try:
        r = commit(index, volume, snap or None, args.tag, args.store, args.s3_endpoint,
                   os.path.abspath(args.cache_dir or default_cache_dir()))
    finally:
        index.close()
    b = r.build
    if args.json:
        print(json.dumps({"volume": r.volume, "snapshot": r.snapshot, "files_reused": r.files_reused,
                          **b.as_dict()}))
    else:
        print(f"committed {r.volume}@{r.snapshot} as {b.ref} → sha256:{b.image[:16]} in {b.store}")
        print(f"  files    {b.files} ({r.files_reused} unchanged since the base image, not read again)")
        print(f"  chunks   {b.new_chunks} new of {b.unique_chunks}; uploaded {size(b.bytes_uploaded)}")
    return EXIT_OK


COMMANDS = {
    "commit": cmd_commit,
    "volume": cmd_volume,
    "snapshot": cmd_snapshot,
    "snapshots": cmd_snapshots,
    "rollback": cmd_rollback,
    "clone": cmd_clone,
}
