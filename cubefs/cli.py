"""The ``cubefs`` command line.

Every command prints a one-line error and exits with a code from
:mod:`cubefs.errors` on expected failures; ``--json`` gives machine output on
stdout.  ``mount`` detaches by default: it starts the daemon in the
background and returns once the mount is live (or with the daemon's error).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from cubefs import __version__
from cubefs.errors import EXIT_ERROR, EXIT_OK, CubefsError, NotFoundError, UsageError
from cubefs.humanize import Progress, parse_size, setup_logging, size
from cubefs.node import control
from cubefs.node.control import default_cache_dir
from cubefs.volume import cli as volume_cli

log = logging.getLogger("cubefs")

EPILOG = """\
examples:
  cubefs build ./rootfs --tag debian:12            # directory → image in the default store
  cubefs build rootfs.tar.zst --tag app:v1 --store s3://bucket/images --s3-endpoint http://127.0.0.1:8333
  cubefs mount debian:12 /mnt/debian               # lazy, read-only; returns once live
  chroot /mnt/debian python3 -c 'import json'
  cubefs stats /mnt/debian                          # bytes served by memory, disk, store
  cubefs umount /mnt/debian
  cubefs convert docker://127.0.0.1:5000/app:1 --insecure --tag app:1   # from a registry (or oci:DIR)
  cubefs volume create box --from debian:12; cubefs mount --volume box /mnt/box   # read-write
  cubefs snapshot box --name s1; cubefs rollback box s1; cubefs clone box@s1 --count 10 --prefix t

The default store is file://~/.local/share/cubefs/store (or $CUBEFS_STORE).
Exit codes: 0 ok, 1 internal error, 2 usage, 3 not found, 4 bad or corrupt input,
5 store unreachable, 6 unsupported format version.
"""


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL", help="file:///abs/dir or s3://bucket/prefix (default: $CUBEFS_STORE "
                   "or file://~/.local/share/cubefs/store)")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint, e.g. http://127.0.0.1:8333 "
                   "(default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--s3-addressing", choices=("auto", "virtual", "path"), default=None,
                   help="bucket in the host name (virtual) or in the path; auto: virtual for AWS and COS "
                   "endpoints, path for the rest (default: $AWS_S3_ADDRESSING_STYLE, else auto)")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _reserve_arg(text: str) -> str:
    from cubefs.cache.disk import parse_reserve

    try:
        parse_reserve(text)
    except CubefsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _plugins() -> list[Any]:
    """Command modules that other packages register under the ``cubefs.commands``
    entry point (``vm`` from vmm/): cubefs never imports what stands above it."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group="cubefs.commands"):
        try:
            out.append(ep.load())
        except ImportError as err:  # a broken plugin must not take the core commands with it
            logging.getLogger(__name__).warning("cubefs %s is unavailable: %s", ep.name, err)
    return out


def make_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cubefs",
        description="Block-deduplicated images in an object store, mounted lazily.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cubefs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="turn a directory or tarball into an image",
                       description="Chunk (FastCDC), hash (SHA-256), deduplicate against the store, compress "
                       "(zstd) and upload a directory tree or a tarball (.tar, .tar.gz, .tar.zst) as an image. "
                       "Building the same tree twice gives the same image digest and uploads nothing new.")
    p.add_argument("src", help="a directory, or a tarball (.tar, .tar.gz, .tar.bz2, .tar.xz, .tar.zst)")
    p.add_argument("--tag", required=True, metavar="NAME:TAG", help="name of the image, e.g. debian:12")
    _store_args(p)
    _build_args(p)
    p.add_argument("--trace-cmd", metavar="CMD", default=None,
                   help="then mount the image lazily, run 'chroot MOUNT /bin/sh -c CMD' once (root) and publish "
                   "what it read as the image's start-up trace, so even its first start on a node prefetches")

    p = sub.add_parser("convert", help="turn an OCI or Docker image into a cubefs image",
                       description="Read an image's layers in order, with OCI semantics (whiteouts, opaque "
                       "directories, hard links into earlier layers, replaced types), into one tree, and build it "
                       "like 'cubefs build'; the config's env, entrypoint, cmd, working dir and user are kept in "
                       "the manifest ('cubefs inspect'). Layers are streamed and checked against their digests.")
    p.add_argument("src", metavar="SOURCE", help="oci:DIR[:REF] (an OCI image layout), docker-archive:FILE "
                   "('docker save'), or docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] (a registry)")
    p.add_argument("--tag", required=True, metavar="NAME:TAG", help="name of the cubefs image")
    _store_args(p)
    p.add_argument("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform index (default: this host's, e.g. linux/amd64)")
    p.add_argument("--insecure", action="store_true", help="talk plain HTTP to the registry (a local one)")
    p.add_argument("--allow-devices", action="store_true",
                   help="keep the character and block device nodes layers contain (left out, with a warning, "
                   "by default: a runtime makes /dev)")
    _build_args(p)

    p = sub.add_parser("export", help="write an image out as an OCI image layout",
                       description="Write NAME:TAG to the OCI image layout DIR (created, or added to) as one gzip "
                       "layer and a config with the runtime settings 'cubefs convert' kept, so any OCI tool "
                       "(skopeo, umoci, podman) can take it. 'cubefs convert oci:DIR:TAG' gives back the same "
                       "image digest.")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--oci", required=True, metavar="DIR", help="the OCI layout to write")
    p.add_argument("--name", default=None, help="its ref name in the layout (default: the tag)")
    _store_args(p)
    p.add_argument("--cache-dir", default=None, help="disk cache for reading the image (default: $CUBEFS_CACHE_DIR "
                   "or ~/.cache/cubefs)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rm", help="remove an image's name (its data goes at the next gc runs)")
    p.add_argument("refs", nargs="+", metavar="NAME:TAG")
    _store_args(p)

    p = sub.add_parser("gc", help="delete what no image in the store needs",
                       description="Two-phase and safe while builds and conversions run: a run hides the packs no "
                       "image references from new builds and deletes those the previous run hid, unless a build "
                       "that started before then still runs (builds hold a lease in the store) or an image now "
                       "uses them again. So run it twice, or periodically, to reclaim space. Packs that are "
                       "partly used are kept whole; the report says how many bytes in them are dead.")
    _store_args(p)
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("du", help="what the store's images take, together and each, vs layer-level dedup",
                       description="Logical bytes of every image, stored bytes (each chunk once), what each image "
                       "adds that no other has (what 'cubefs rm' + 'gc' of it would free), and what a registry "
                       "storing the same images as deduplicated layers would hold.")
    _store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("images", help="list the images in a store")
    _store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="files, sizes and dedup figures of one image")
    p.add_argument("ref", metavar="NAME:TAG")
    _store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", help="check that every chunk of an image can be read back from its store",
                       description="Check the image's records (manifest, metadata, chunk map, every chunk in its "
                       "pack's index, every delta's base stored whole) and, unless --quick, read every chunk from "
                       "the store and check its SHA-256. One line per problem; exit 4 if there is any.")
    p.add_argument("refs", nargs="*", metavar="NAME:TAG")
    p.add_argument("--all", action="store_true", help="every image in the store")
    p.add_argument("--quick", action="store_true", help="records only: read no chunk")
    _store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("mount", help="mount an image read-only, or a volume read-write, fetching data lazily",
                       description="Mount NAME:TAG at MOUNTPOINT, read-only, or (--volume NAME MOUNTPOINT) a volume "
                       "read-write. Only the image metadata is fetched up front; file data is fetched on first "
                       "read, chunk by chunk, through a memory cache and a disk cache (--cache-dir) that survives "
                       "remounts. Detaches once the mount is live unless --foreground.")
    p.add_argument("targets", nargs="+", metavar="NAME:TAG MOUNTPOINT | MOUNTPOINT")
    p.add_argument("--volume", default=None, metavar="NAME[@SNAPSHOT]",
                   help="mount this volume read-write ('cubefs volume create'), or one of its snapshots "
                   "read-only; its store is the one it was created with unless --store says otherwise")
    p.add_argument("--writeback-cache", action="store_true",
                   help="with --volume: the kernel caches writes and sends them in large runs (an untar makes "
                   "~40%% fewer requests), but a full disk then fails fsync or close, not write, and a file held "
                   "open across a rollback keeps its old size")
    volume_cli.volume_dir_arg(p)
    _store_args(p)
    p.add_argument("--cache-dir", default=None, help="disk cache directory (default: $CUBEFS_CACHE_DIR or "
                   "~/.cache/cubefs)")
    p.add_argument("--cache-size", type=_size_arg, default="10G", help="disk cache limit (default 10G; 0 disables)")
    p.add_argument("--cache-reserve", type=_reserve_arg, default=None, metavar="SHARE|SIZE",
                   help="free space the disk cache leaves its filesystem: it stops caching (never "
                   "serving) there (default 5%%, or $CUBEFS_CACHE_RESERVE; e.g. 10%% or 2G)")
    p.add_argument("--memory-cache", type=_size_arg, default="256M", help="memory cache limit (default 256M)")
    p.add_argument("--readahead", type=_size_arg, default="4M",
                   help="bytes of a file fetched ahead of a read (default 4M)")
    p.add_argument("--pack-readahead", type=_size_arg, default="512K",
                   help="stored bytes fetched, in the background, after a read's chunks in the same pack: the "
                   "files built next to it, which a start-up tends to read next (default 512K; 0 turns it off). "
                   "Kept as fetched and decoded only if read; skipped when the read was a disk-cache hit")
    p.add_argument("--dir-prefetch", type=_size_arg, default="4M",
                   help="once two files of a directory miss the cache, fetch its other files (up to 1 MiB each), "
                   "up to this many stored bytes, in the background (default 4M; 0 turns it off)")
    p.add_argument("--hot-pack", type=int, default=2, metavar="N",
                   help="once reads of N files (of 1 MiB or less) miss the node in one pack, fetch the rest of that "
                   "pack in the background, 1 MiB ranges at once, while the bytes asked of the store and peers stay "
                   "within 1.3x the bytes read (default 2: a first 'import pandas' at +10 ms 16-26%% faster in 4 runs "
                   "of 5; 0 turns it off, as does --pack-readahead 0; VM root hosts take none)")
    p.add_argument("--stream", type=_size_arg, default="0",
                   help="once this mount's reads have missed the store 8 times, fetch the rest of the image in the "
                   "background, in pack order from where it reads, up to this many stored bytes (default 0: off)")
    p.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds before a read that cannot be served fails with EIO (default 60)")
    p.add_argument("--store-timeout", type=float, default=10.0, help="seconds per store request attempt (default 10)")
    p.add_argument("--store-attempts", type=int, default=4, help="attempts per store request (default 4)")
    p.add_argument("--transport", choices=("kernel", "pyfuse3", "virtiofs", "vhost-user-blk"), default="kernel",
                   help="how FUSE is spoken: 'kernel' (default) talks to /dev/fuse directly and has the kernel "
                   "cache symlinks, directory listings and open files, so a warm re-run makes almost no requests; "
                   "'pyfuse3' goes through libfuse; 'virtiofs' serves a VM instead: MOUNTPOINT is then the "
                   "vhost-user socket QEMU's vhost-user-fs device connects to, and the daemon ends with the VM; "
                   "'vhost-user-blk' serves a block volume ('volume create NAME --block SIZE') to QEMU's "
                   "vhost-user-blk device the same way")
    p.add_argument("--raw", action="store_true",
                   help="with --volume of a VM's disk (a block volume with an image under it): show the disk as "
                   "the file /disk (without it such a mount is refused: the host does not mount what a guest "
                   "wrote; 'cubefs commit' the disk and mount that image to see its files)")
    p.add_argument("--shared", action="store_true",
                   help="with --volume and --transport virtiofs: served by the node's one root host for the "
                   "volume's image (forked by the mount server when none runs), which holds the image's metadata "
                   "and caches once for every VM root over it instead of a daemon per VM; the mount ends when its "
                   "VM disconnects, the host 60 s after its last mount")
    p.add_argument("--peers", default="", metavar="HOST:PORT,...",
                   help="peer chunk servers ('cubefs serve --listen') asked before the store, this node's own "
                   "included; each chunk is asked of the one peer that owns it")
    p.add_argument("--peers-file", default="", metavar="PATH",
                   help="the peers, one HOST:PORT a line ('#' comments), followed while mounted: the file is read "
                   "again when it changes (looked at once a second at most; a missing file is no peers). A "
                   "cluster's node service writes it ('cubefs sandbox serve --etcd'); write it atomically (rename)")
    p.add_argument("--peer-timeout", type=float, default=3.0,
                   help="seconds a peer may take before its chunks are read from the store (default 3)")
    _peer_secret_arg(p)
    p.add_argument("--record-trace", action="store_true",
                   help="note every chunk first read for as long as the mount lives, not only in its first minute "
                   "(every mount records its start-up and publishes it with the image; 'cubefs trace push' "
                   "publishes now)")
    pt = p.add_mutually_exclusive_group()
    pt.add_argument("--passthrough", dest="passthrough", action="store_const", const="on", default="auto",
                    help="always keep files of 1 MiB and more that the mount served whole as private local copies "
                    "the kernel reads itself (FUSE passthrough, Linux 6.9+, as root): big files at the local disk's "
                    "speed, but every open then costs a round trip (a warm 'import numpy' 1.2x slower). By default "
                    "(auto) only for an image holding a file of 64 MiB or more")
    pt.add_argument("--no-passthrough", dest="passthrough", action="store_const", const="off",
                    help="never FUSE passthrough, whatever the image holds")
    p.add_argument("--fuse-uring", action="store_true",
                   help="take FUSE requests through io_uring where the kernel offers it (Linux 6.14+, "
                   "/sys/module/fuse/parameters/enable_uring=Y; or CUBEFS_FUSE_URING=1); off by default: a daemon "
                   "killed -9 leaves the requests it held unanswered ('cubefs stats' shows the path)")
    p.add_argument("--no-auto-trace", dest="auto_trace", action="store_false",
                   help="do not publish this mount's start-up trace with the image (by default the first start of "
                   "an image records which chunks it reads, by index, and later starts on any node prefetch them)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="do not prefetch the image's trace even if it has one")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--no-server", action="store_true",
                   help="start the daemon from this process instead of through the node's mount server (which "
                   "'cubefs mount' otherwise starts when none runs, and which spares later mounts ~0.4 s of "
                   "start-up); also $CUBEFS_NO_SERVER=1")

    volume_cli.add_parsers(sub, _store_args)
    for module in _plugins() if plugins else []:
        module.add_parsers(sub, _store_args)
        COMMANDS.update(module.COMMANDS)

    p = sub.add_parser("serve", help="the node daemon: a warm mount server, and (--listen) a peer chunk server",
                       description="Run (in the foreground) a mount server on a unix socket. It has already "
                       "imported everything a mount daemon needs, and forks one per 'cubefs mount', which then "
                       "skips the interpreter start-up and imports (~0.4 s). 'cubefs mount' uses the server "
                       "on $CUBEFS_SERVER (default /run/cubefs/serve.sock for root) and, when none answers, "
                       "starts one that exits after 15 idle minutes; an explicit 'cubefs serve' replaces it. "
                       "With --listen HOST:PORT it also serves this node's disk "
                       "cache (--cache-dir) to other nodes over HTTP: mounts started with --peers ask the node "
                       "that owns a chunk before the store, and the owner fetches and keeps what it lacks. "
                       "GET /metrics there gives Prometheus text.")
    p.add_argument("--socket", default=None, help="unix socket path (default: $CUBEFS_SERVER or "
                   "/run/cubefs/serve.sock)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="serve chunks to peers on this address (a bare PORT: loopback only); requests must be "
                   "signed with the cluster secret (--peer-secret)")
    _peer_secret_arg(p)
    p.add_argument("--print-metrics-token", action="store_true",
                   help="print the bearer token that reads GET /metrics on --listen (for a Prometheus scraper, "
                   "which must not hold the secret) and exit")
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without a mount request (default: never)")
    p.add_argument("--upgrade", action="store_true",
                   help="make the running mount server run the installed code and replace every mount daemon "
                   "with one of it, one by one, without unmounting anything")
    _store_args(p)
    p.add_argument("--cache-dir", default=None, help="the node's disk cache (default: $CUBEFS_CACHE_DIR or "
                   "~/.cache/cubefs); give mounts the same one")
    p.add_argument("--cache-size", type=_size_arg, default="10G", help="disk cache limit (default 10G)")
    p.add_argument("--cache-reserve", type=_reserve_arg, default=None, metavar="SHARE|SIZE",
                   help="free space the disk cache leaves its filesystem: it stops caching (never "
                   "serving) there (default 5%%, or $CUBEFS_CACHE_RESERVE; e.g. 10%% or 2G)")
    p.add_argument("--memory-cache", type=_size_arg, default="256M", help="memory cache limit (default 256M)")

    p = sub.add_parser("umount", help="unmount a cubefs mount and stop its daemon")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", action="store_true", help="detach now even if the mount is busy")

    p = sub.add_parser("stats", help="what a mount served from memory, disk and the store")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prometheus", action="store_true", help="Prometheus text format")

    p = sub.add_parser("trace", help="store a mount's start-up trace with its image, for prefetching",
                       description="'cubefs trace push MOUNTPOINT' merges the chunks the mount read (in the order "
                       "it first read them) into the image's trace now. Every later mount of the image fetches "
                       "those chunks in the background, in that order, as soon as it is live. Mounts do this by "
                       "themselves once their start-up goes quiet and at unmount (not with --no-auto-trace).")
    p.add_argument("action", choices=("push",))
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache", help="inspect or shrink the node's disk cache",
                       description="The disk cache is shared by every mount that uses the same --cache-dir. "
                       "'stats' shows what it holds; 'trim --to SIZE' evicts (least recently used first, CLOCK) "
                       "down to SIZE; 'clear' empties it. All are safe while mounts are running.")
    p.add_argument("action", choices=("stats", "trim", "clear"))
    p.add_argument("--cache-dir", default=None, help="default: $CUBEFS_CACHE_DIR or ~/.cache/cubefs")
    p.add_argument("--to", type=_size_arg, default=None, metavar="SIZE", help="trim: the size to shrink to")
    p.add_argument("--json", action="store_true")
    return parser


def _peer_secret_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer-secret", default=None, metavar="FILE",
                   help="the cluster secret peers sign requests and answers with, the same file (mode 0600) on "
                   "every node (default: $CUBEFS_PEER_SECRET_FILE or ~/.config/cubefs/peer-secret, which "
                   "'cubefs serve --listen' creates if missing)")


def _build_args(p: argparse.ArgumentParser) -> None:
    """What build and convert share: how new chunks are stored, how the result is shown."""
    p.add_argument("--workers", type=int, default=0, help="hash/compress threads (default: one per core)")
    p.add_argument("--level", type=int, default=1, choices=range(-7, 20), metavar="N",
                   help="zstd level for new chunks, -7..19 (default 1; 3 stores ~2.5%% fewer bytes but compresses "
                   "~40%% slower, which on 2 cores is most of a build's time)")
    p.add_argument("--delta-from", default="auto", metavar="NAME:TAG|auto|none",
                   help="store new chunks as zstd deltas against the same files in this image where that is "
                   "much smaller, so nodes that have it fetch only the difference (default auto: the image the "
                   "tag names now, else the newest tag of the same name; none: never)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")


def _with_store(args: argparse.Namespace, fn: Any) -> Any:
    from cubefs.remote import store_session

    with store_session(args.store, args.s3_endpoint) as (loop, store):
        return loop.run(fn(store))


def cmd_build(args: argparse.Namespace) -> int:
    from cubefs.dedup.builder import build

    progress = Progress(f"building {args.tag}", enabled=None if not args.no_progress else False)
    try:
        result = build(args.src, args.tag, args.store, args.s3_endpoint, tick=progress.tick,
                       workers=args.workers, level=args.level, delta=args.delta_from)
    finally:
        progress.done()
    if args.trace_cmd:
        from cubefs.image.trace_build import record_build_trace

        traced = record_build_trace(args.tag, args.store, args.s3_endpoint, args.trace_cmd)
        print(f"published a start-up trace of {traced['chunks']} chunks ({size(traced['stored_bytes'])}) "
              f"for {args.tag}", file=sys.stderr)
    return _print_build(result, args)


def cmd_convert(args: argparse.Namespace) -> int:
    from cubefs.dedup.builder import build
    from cubefs.dedup.oci import open_image, scan_image
    from cubefs.format.manifest import parse_ref

    parse_ref(args.tag)
    image = open_image(args.src, args.platform, args.insecure)
    progress = Progress(f"converting {args.src}", enabled=None if not args.no_progress else False)
    try:
        result = build(args.src, args.tag, args.store, args.s3_endpoint, tick=progress.tick, workers=args.workers,
                       level=args.level, delta=args.delta_from,
                       scan=lambda _src, ingest, tick, _known: scan_image(image, ingest, tick, args.allow_devices),
                       config=image.runtime_config(),
                       source={"from": args.src, "layers": [[x.digest, x.size] for x in image.layers]})
    finally:
        progress.done()
    return _print_build(result, args)


def cmd_export(args: argparse.Namespace) -> int:
    from cubefs.image.export import export_oci

    out = export_oci(args.ref, os.path.abspath(args.oci), args.store, args.s3_endpoint,
                     os.path.abspath(args.cache_dir or default_cache_dir()), args.name)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"exported {out['ref']} to oci:{out['layout']}:{out['name']} (one layer, {size(out['layer_bytes'])})")
    return EXIT_OK


def cmd_du(args: argparse.Namespace) -> int:
    from cubefs.image.du import disk_usage

    out = _with_store(args, disk_usage)
    if args.json:
        print(json.dumps(out, indent=1))
        return EXIT_OK
    print(f"{'IMAGE':32} {'LOGICAL':>11} {'STORED':>11} {'ADDS':>11}")
    for i in out["images"]:
        print(f"{i['ref']:32} {size(i['logical_bytes']):>11} {size(i['stored_bytes']):>11} "
              f"{size(i['unique_bytes']):>11}")
    ratio = out["stored_over_layer_dedup"]
    print(f"{'total':32} {size(out['logical_bytes']):>11} {size(out['stored_bytes']):>11}   "
          f"(layer-level dedup: {size(out['layer_dedup_bytes'])}; cubefs stores "
          f"{ratio if ratio is not None else '-'} of that)")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    from cubefs.image.gc import remove_image

    async def go(store: Any) -> list[str]:
        return [await remove_image(store, ref) for ref in args.refs]

    for ref in _with_store(args, go):
        print(f"removed {ref}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from cubefs.image.gc import collect

    async def go(store: Any) -> Any:
        return await collect(store, dry_run=args.dry_run)

    r = _with_store(args, go)
    if args.json:
        print(json.dumps(r.as_dict()))
        return EXIT_OK
    what = "would delete" if args.dry_run else "deleted"
    print(f"{what} {r.packs_deleted} packs ({size(r.bytes_freed)}) and {r.images_deleted} images; "
          f"{r.packs_restored} packs in use again")
    print(f"hid {len(r.packs_marked)} unused packs ({size(r.bytes_marked)}) and marked {len(r.images_marked)} images "
          f"for the next run; {r.images_live} images and {r.packs_live} packs in use, "
          f"{size(r.dead_bytes_in_live_packs)} dead in packs partly in use")
    if r.waiting_for_leases:
        print(f"waiting for {r.waiting_for_leases} builds that started before the last run")
    return EXIT_OK


def _print_build(result: Any, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return EXIT_OK
    reused = result.unique_chunks - result.new_chunks
    print(f"built {result.ref} → sha256:{result.image[:16]} in {result.store}")
    print(f"  files        {result.files} ({result.inodes} inodes), {size(result.logical_bytes)}")
    print(f"  chunks       {result.unique_chunks} unique of {result.chunk_refs}; {result.new_chunks} new, "
          f"{reused} already stored")
    if result.delta_chunks:
        print(f"  deltas       {result.delta_chunks} new chunks stored as deltas against {result.delta_base}")
    print(f"  stored       {size(result.stored_bytes)} for this image; uploaded {size(result.bytes_uploaded)}")
    print(f"  time         {result.seconds:.1f} s, {result.mb_per_s:.0f} MB/s")
    return EXIT_OK


def cmd_images(args: argparse.Namespace) -> int:
    from cubefs.image.catalog import list_manifests

    manifests = _with_store(args, list_manifests)
    if args.json:
        print(json.dumps([{"ref": m.ref, "image": f"sha256:{m.image}", "created": m.created, **m.stats}
                          for m in manifests], indent=1))
        return EXIT_OK
    if not manifests:
        print("no images")
        return EXIT_OK
    print(f"{'IMAGE':32} {'DIGEST':14} {'FILES':>8} {'SIZE':>11} {'STORED':>11}  CREATED")
    for m in manifests:
        s = m.stats
        print(f"{m.ref:32} {m.image[:12]:14} {s.get('files', 0):>8} {size(s.get('logical_bytes', 0)):>11} "
              f"{size(s.get('stored_bytes', 0)):>11}  {m.created}")
    return EXIT_OK


def inspect_image(args: argparse.Namespace) -> dict[str, Any]:
    import stat as st

    from cubefs.format.image import F_MODE, F_SIZE
    from cubefs.image.catalog import load_image, load_manifest

    async def go(store: Any) -> Any:
        m = await load_manifest(store, args.ref)
        image, cmap = await load_image(store, m)
        return m, image, cmap

    m, image, cmap = _with_store(args, go)
    kinds = {"files": 0, "dirs": 0, "symlinks": 0, "other": 0}
    logical = 0
    for rec in image.inodes:
        mode = rec[F_MODE]
        if st.S_ISREG(mode):
            kinds["files"] += 1
            logical += rec[F_SIZE]
        elif st.S_ISDIR(mode):
            kinds["dirs"] += 1
        elif st.S_ISLNK(mode):
            kinds["symlinks"] += 1
        else:
            kinds["other"] += 1
    unique_plain = sum(image.chunk(i)[1] for i in range(image.nchunks))
    stored = cmap.stored_bytes()
    return {
        "ref": m.ref,
        "image": f"sha256:{image.digest}",
        "created": m.created,
        "inodes": len(image),
        **kinds,
        "logical_bytes": logical,
        "unique_chunks": image.nchunks,
        "unique_bytes": unique_plain,
        "stored_bytes": stored,
        "packs": len(cmap.packs),
        "dedup_ratio": round(logical / unique_plain, 3) if unique_plain else 1.0,
        "compression_ratio": round(unique_plain / stored, 3) if stored else 1.0,
        "chunker": image.chunker,
        "config": m.config,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_image(args)
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    print(f"{info['ref']}  {info['image']}  (created {info['created']})")
    print(f"  inodes       {info['inodes']}: {info['files']} files, {info['dirs']} dirs, "
          f"{info['symlinks']} symlinks, {info['other']} other")
    print(f"  logical      {size(info['logical_bytes'])}")
    print(f"  unique       {size(info['unique_bytes'])} in {info['unique_chunks']} chunks "
          f"(dedup {info['dedup_ratio']:.2f}x)")
    print(f"  stored       {size(info['stored_bytes'])} in {info['packs']} packs "
          f"(compression {info['compression_ratio']:.2f}x)")
    for key, value in (info.get("config") or {}).items():
        print(f"  {key:12} {json.dumps(value)}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from cubefs.errors import EXIT_BAD_INPUT
    from cubefs.image.verify import verify

    if bool(args.refs) == args.all:
        raise UsageError("usage: cubefs verify NAME:TAG..., or cubefs verify --all")
    results = verify(args.refs, args.all, args.store, args.s3_endpoint, args.quick)
    if args.json:
        print(json.dumps([r.as_dict() | {"lines": r.lines(paths)} for r, paths in results], indent=1))
    for report, paths in results:
        if not args.json:
            for line in report.lines(paths):
                print(line)
            what = "records" if args.quick else f"{report.chunks_read} chunks read ({size(report.bytes_read)})"
            print(f"{report.ref}: {'ok' if not report.problems else f'{len(report.problems)} problems'}: "
                  f"{report.chunks} chunks in {report.packs} packs, {what}, {report.seconds:.1f} s")
    return EXIT_BAD_INPUT if any(r.problems for r, _p in results) else EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    from cubefs.node import mount_server

    mp, cache_dir = _mount_target(args)
    if args.foreground:
        return mount_server.serve_mount(args, mp, cache_dir, None)
    return mount_server.start_mount(args, mp, cache_dir)


@functools.cache
def _mount_parser() -> argparse.ArgumentParser:
    """The parser, made once per process: ~8 ms a mount otherwise (mount_through_server)."""
    return make_parser(plugins=False)


def mount_through_server(argv: list[str]) -> bool:
    """``cubefs mount ARGV`` from this process, through the node's mount server (which forks
    the daemon), for a program that mounts often (the sandbox service: a VM's root per create
    and per restore): no interpreter to start, ~0.15 s less per mount than a ``cubefs mount``
    process.  False when no mount server of this code answers: the caller runs the command,
    which starts one.  A mount that fails raises CubefsError with the daemon's message."""
    from cubefs.errors import CubefsError
    from cubefs.node import mount_server

    args = _mount_parser().parse_args(["mount", *argv])
    mp, cache_dir = _mount_target(args)
    text = mount_server.mount_via_server(args, mp, cache_dir)
    if text is None:
        return False
    if text == "ready":
        return True
    if text.startswith("error "):
        _, code, message = text.split(" ", 2)
        err = CubefsError(message)
        err.exit_code = int(code)
        raise err
    raise CubefsError(f"mount daemon for {args.ref} exited before the mount was live; see "
                      f"{mount_server.log_path_for(cache_dir, mp)}")


def _mount_target(args: argparse.Namespace) -> tuple[str, str]:
    """Check a mount's arguments; its mountpoint (or socket) and cache directory, absolute."""
    want = 1 if args.volume else 2
    if len(args.targets) != want:
        raise UsageError("usage: cubefs mount NAME:TAG MOUNTPOINT, or cubefs mount --volume NAME MOUNTPOINT")
    args.ref = f"volume:{args.volume}" if args.volume else args.targets[0]
    args.mountpoint = args.targets[-1]
    args.volume_dir = os.path.abspath(args.volume_dir or volume_cli.default_volume_dir())
    mp = os.path.abspath(args.mountpoint)
    if getattr(args, "shared", False) and (not args.volume or args.transport != "virtiofs" or args.foreground
                                           or args.no_server or args.record_trace):
        raise UsageError("--shared mounts a volume (--volume) over --transport virtiofs through the node's mount "
                         "server (not with --foreground, --no-server or --record-trace)")
    if args.transport in ("virtiofs", "vhost-user-blk"):
        if os.path.isdir(mp) or not os.path.isdir(os.path.dirname(mp)):
            raise UsageError(f"with --transport {args.transport}, {args.mountpoint} must be a socket path in an "
                             "existing directory")
    elif not os.path.isdir(mp):
        raise UsageError(f"mountpoint {args.mountpoint} is not a directory")
    elif os.path.ismount(mp):
        raise UsageError(f"{args.mountpoint} is already a mount point")
    if args.volume and args.transport in ("kernel", "pyfuse3") and not getattr(args, "raw", False):
        from cubefs.volume.blk import refuse_host_view

        refuse_host_view(args.volume_dir, args.volume)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    if args.peers and args.peers_file:
        raise UsageError("give --peers or --peers-file, not both")
    if args.peers_file:
        args.peers_file = os.path.abspath(args.peers_file)  # the daemon's working directory is not ours
    if args.peers or args.peers_file:
        from cubefs.cache.peers import SECRET_ENV, load_secret

        if args.peer_secret:  # the daemon (forked here or by the mount server) reads it from there
            os.environ[SECRET_ENV] = os.path.abspath(args.peer_secret)
        load_secret()  # a missing or open secret is this command's one-line error
    return mp, cache_dir


def cmd_serve(args: argparse.Namespace) -> int:
    from cubefs.node import mount_server

    socket_path = args.socket or mount_server.default_server_socket()
    if args.upgrade:
        return mount_server.upgrade_server(socket_path)
    if args.print_metrics_token:
        from cubefs.cache.peers import load_secret, metrics_token

        print(metrics_token(load_secret(args.peer_secret)))
        return EXIT_OK
    if not args.listen:
        return mount_server.run_mount_server(socket_path, args.idle_exit)
    import socket

    from cubefs.cache.peers import load_secret
    from cubefs.node.peer_server import parse_listen, run_node

    secret = load_secret(args.peer_secret, create=True)

    try:
        host, port = parse_listen(args.listen)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:  # bound here, so a taken port is this command's one-line error, not a child's traceback
        listener = socket.create_server((host, port), backlog=128)
    except OSError as err:
        raise CubefsError(f"cannot listen on {args.listen}: {os.strerror(err.errno or 0)}") from None
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    # The peer server runs threads and an event loop; the mount server must fork
    # daemons from a process that has neither.  So they are two processes.
    pid = os.fork()
    if pid == 0:
        code = EXIT_ERROR
        try:
            code = run_node(listener, cache_dir, args.cache_size, args.memory_cache, args.store, args.s3_endpoint,
                            secret)
        except CubefsError as err:
            print(f"cubefs: {err}", file=sys.stderr)
            code = err.exit_code
        except BaseException:
            log.exception("peer server failed")
        finally:
            os._exit(code)
    listener.close()
    try:
        return mount_server.run_mount_server(socket_path, args.idle_exit)
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def cmd_umount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    try:
        info = control.read_registry(mp)
    except NotFoundError:
        info = {}
        if not os.path.ismount(mp):
            raise
    if info.get("shared"):  # one mount of a root host that serves other VMs too: only this one ends
        from cubefs.node.roots import end_shared_mount

        end_shared_mount(mp, info, drop_now=True)
        return EXIT_OK
    if info.get("transport") in ("virtiofs", "vhost-user-blk"):  # a daemon serving a VM: no mount to detach
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            control.remove_registry(mp)
        return EXIT_OK
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", *(["-z"] if args.lazy else []), mp] if tool else ["umount", *(["-l"] if args.lazy else []), mp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CubefsError(f"cannot unmount {mp}: {res.stderr.strip() or res.stdout.strip()}")
    pid = info.get("pid")
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    if args.prometheus:
        sys.stdout.write(control.query(args.mountpoint, "/metrics").decode())
        return EXIT_OK
    stats = json.loads(control.query(args.mountpoint, "/stats"))
    if args.json:
        print(json.dumps(stats, indent=1))
        return EXIT_OK
    print(f"{stats['image']} at {stats['mountpoint']} (pid {stats['pid']}, store {stats['store']})")
    if stats.get("restarts"):
        print(f"  restarts     {stats['restarts']} (daemons replaced under the live mount)")
    creds = stats.get("store_info", {}).get("credentials")
    if creds:
        info = stats["store_info"]
        print(f"  s3           {info['endpoint']} ({info['addressing']}-style, {info['region']}), credentials from "
              f"{creds['source']}" + (f", refreshed {creds['refreshes']} times" if creds["refreshes"] else ""))
    print(f"  reads        {stats['reads']} ({size(stats['read_bytes'])}), {stats['read_errors']} failed")
    fp = stats.get("fuse_path")
    if fp:
        print(f"  requests via {fp['path']}" + (f" ({fp['queues']} queues x {fp['entries_per_queue']} entries)"
                                              if "queues" in fp else f" ({fp['why']})" if fp.get("why") else ""))
    pt = stats.get("passthrough")
    if pt and pt["state"] == "passthrough":
        print(f"  passthrough  {pt['state']}: {pt['passthrough_opens']} of {pt['opens']} opens, "
              f"{pt['materialized_files']} files copied ({size(pt['materialized_bytes'])})")
    elif pt:
        print(f"  passthrough  {pt['state']}")
    print(f"  {'TIER':8} {'HITS':>8} {'MISSES':>8} {'BYTES':>11} {'REQUESTS':>9} {'ERRORS':>7}")
    for tier in ("memory", "disk", "peers", "store"):
        t = stats["tiers"].get(tier)
        if t is None:
            continue
        print(f"  {tier:8} {int(t['hits']):>8} {int(t['misses']):>8} {size(int(t['bytes'])):>11} "
              f"{int(t['requests']):>9} {int(t['errors']):>7}")
    disk = stats["tiers"].get("disk", {})
    if disk.get("quarantined") or disk.get("not_cached"):
        print(f"  disk cache: {int(disk.get('quarantined', 0))} damaged caches set aside, "
              f"{int(disk.get('not_cached', 0))} chunks not cached for lack of space")
    for address, p in sorted(stats.get("peers", {}).items()):
        state = "down" if p["down"] else "up"
        print(f"  peer {address}: {state}, {int(p['hits'])} chunks, {int(p['errors'])} errors "
              f"({int(p['timeouts'])} timeouts), {int(p['lies'])} bad chunks")
    prefetch = stats["tiers"].get("prefetch", {})
    if prefetch.get("chunks"):
        done = f"done in {prefetch['seconds']:.2f} s" if prefetch["done"] else "running"
        print(f"  trace prefetch: {int(prefetch['chunks'])} chunks, {done}")
        hot = stats["tiers"].get("hot")  # cubefs.cache.hot: the start-up chunks in one file on the node
        print(f"  hot file: {int(hot['chunks'])} start-up chunks ({size(int(hot['file_bytes']))}), "
              f"{int(hot['hits'])} read from it, {int(hot['errors'])} damaged" if hot else
              "  hot file: none kept yet (the trace's chunks come from the disk cache)")
    if stats.get("trace_recorded") is not None:
        pub = stats.get("trace_published") or {}
        print(f"  start-up trace: {stats['trace_recorded']} chunks recorded; "
              + (f"{int(pub.get('publishes', 0))} publishes, the image's trace names {int(pub['chunks'])} chunks"
                 if pub else "nothing published by this mount"))
    return EXIT_OK


def cmd_trace(args: argparse.Namespace) -> int:
    result = control.call(os.path.abspath(args.mountpoint), "/trace/push")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"the trace of {result['image']} names {result['chunks']} chunks ({size(result['stored_bytes'])}); "
              f"{result['added']} added by this mount")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    """Works on any cache, damaged or full: a damaged one is set aside as it is opened
    (see cubefs/cache/disk.py) and the action applies to the fresh one."""
    from cubefs.cache.disk import DiskCache

    directory = os.path.abspath(args.cache_dir or default_cache_dir())
    if not os.path.isdir(os.path.join(directory, "chunks.lmdb")):
        raise NotFoundError(f"no disk cache in {directory}")
    if args.action == "trim" and args.to is None:
        raise UsageError("cache trim needs --to SIZE, e.g. --to 5G")
    cache = DiskCache(directory, max_bytes=1 << 62)  # the limit is each mount's; trimming uses --to
    try:
        freed = 0
        if args.action == "trim":
            freed = cache.trim(args.to)
        elif args.action == "clear":
            freed = cache.clear()
        info = cache.info()
    finally:
        cache.close()
    info.pop("limit_bytes")
    if args.action != "stats":
        info["freed_bytes"] = freed
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    if info["quarantined"]:
        print(f"the disk cache was damaged: set aside and started afresh (see {directory}/quarantine.log)")
    if args.action != "stats":
        print(f"freed {size(freed)}")
    print(f"{info['path']}: {info['entries']} chunks, {size(int(info['used_bytes']))} "
          f"(file {size(int(info['file_bytes']))})")
    if info.get("hot_bytes"):
        print(f"  {size(int(info['hot_bytes']))} in images' start-up files (hot/: a remount reads them ahead)")
    if info["quarantined_bytes"]:
        print(f"  {size(int(info['quarantined_bytes']))} in damaged caches set aside ('cubefs cache clear' "
              "removes them)")
    if int(info["free_bytes"]) < int(info["reserve_bytes"]):
        print(f"  its filesystem has {size(int(info['free_bytes']))} free, under the reserve of "
              f"{size(int(info['reserve_bytes']))}: mounts are not caching more")
    return EXIT_OK


COMMANDS = {
    "cache": cmd_cache,
    "trace": cmd_trace,
    "serve": cmd_serve,
    "build": cmd_build,
    "convert": cmd_convert,
    "export": cmd_export,
    "rm": cmd_rm,
    "du": cmd_du,
    "gc": cmd_gc,
    "images": cmd_images,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "stats": cmd_stats,
    **volume_cli.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    # Everything cubefs writes (caches, volumes, a file:// store, traces, logs, sockets)
    # holds image data or names it: private to this user, whatever the caller's umask.
    os.umask(0o077)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is a command line for a VM (cubefs vm run/exec), never ours.
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None)
    words = [a for a in ours if not a.startswith("-")]
    # Plugins are looked up only for a command cubefs does not have itself: a mount
    # must not pay for scanning entry points.
    parser = make_parser(plugins=not words or words[0] not in COMMANDS)
    args = parser.parse_args(ours)
    if getattr(args, "cache_reserve", None):  # in the environment: a daemon the mount server forks gets it too
        os.environ["CUBEFS_CACHE_RESERVE"] = args.cache_reserve
    if getattr(args, "s3_addressing", None):  # likewise, and every store this command opens reads it there
        os.environ["AWS_S3_ADDRESSING_STYLE"] = args.s3_addressing
    if rest is not None and hasattr(args, "cmd"):
        args.cmd = rest
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose, daemon=(args.command == "mount" and args.foreground) or args.command == "serve")
    try:
        return int(COMMANDS[args.command](args) or 0)
    except CubefsError as err:
        print(f"cubefs: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("cubefs: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # an unexpected system error still gets one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"cubefs: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_ERROR
