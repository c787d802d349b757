"""``cubefs vm ...``: micro-VMs whose root is a cubefs image or volume.

Registered with the cubefs CLI through the ``cubefs.commands`` entry point
(pyproject.toml), so cubefs itself never imports this package.  Heavy imports
wait until a command runs: building the parser must stay cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from cubefs.errors import EXIT_OK, NotFoundError, UsageError
from cubefs.humanize import size
from cubefs.volume.cli import volume_dir_arg

EPILOG = """\
examples:
  cubefs vm run debian:12 -- python3 -c 'print(42)'     # boot, run, print, exit with its code
  cubefs vm template create base                         # boot once, save at "agent ready"
  cubefs vm run --template base debian:12 -- uname -a    # restore instead of booting
  cubefs volume create box --from debian:12
  cubefs vm start box1 --volume box --template base      # a VM that stays up
  cubefs vm start box2 debian:12 --disk 4G --template base  # writes to a block disk (overlay root)
  cubefs vm exec box1 -- sh -c 'echo hi > /root/x'
  cubefs vm snapshot box1 --name s1                      # memory and disk: its processes are kept
  cubefs vm rollback box1 s1                             # they go on from s1, open files and all
  cubefs vm fork box1 --count 3                          # three running copies, memory and disk
  cubefs vm ls; cubefs vm rm box1

VMs live in $CUBEFS_VM_DIR (default /run/cubefs/vm), templates in $CUBEFS_TEMPLATE_DIR
(default /var/lib/cubefs/templates); the guest kernel is made by tools/make_vm_kernel.py
into $CUBEFS_VM_KERNEL (default /var/tmp/cubefs-vm/kernel). --accel auto uses KVM only
where hardware virtualization backs it (kvm_intel/kvm_amd), else TCG. Needs root: QEMU's
memory is reached through its address space when a clone maps a template privately.
"""


def _machine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=int, default=512, metavar="MB", help="guest RAM in MiB (default 512)")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                   help="auto (default): KVM where hardware-backed, else TCG")
    p.add_argument("--kernel", default=None, metavar="DIR",
                   help="guest kernel and initramfs (default $CUBEFS_VM_KERNEL or /var/tmp/cubefs-vm/kernel)")


def _root_args(p: argparse.ArgumentParser, store_args: Any) -> None:
    p.add_argument("--volume", default=None, help="a volume as the root, read-write (else the image, read-only)")
    p.add_argument("--writable", action="store_true",
                   help="with an image: give the VM a volume of its own over it (vm-NAME, a copy-on-write clone "
                   "made in O(1)), read-write, removed with the VM")
    p.add_argument("--disk", type=_disk_size, default=None, metavar="SIZE",
                   help="with an image (--writable or not): give the VM a disk of SIZE (e.g. 4G) for its writes, "
                   "a block volume vm-NAME holding an empty ext4 (an O(1) clone of one formatted once per size), "
                   "removed with the VM; the root is the image under an overlay whose upper layer is on that disk "
                   "(writes at disk speed; the image stays read-only)")
    p.add_argument("--disk-volume", default=None, metavar="VOLUME",
                   help="with an image: this block volume (another VM's disk, a clone of one of its snapshots) as "
                   "the disk under the overlay root, kept when the VM goes")
    p.add_argument("--template", default=None, help="restore this template instead of booting")
    p.add_argument("--cache-dir", default=None, help="the root daemon's disk cache (default: cubefs mount's)")
    store_args(p)
    volume_dir_arg(p)


def _exec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE", help="environment (repeat)")
    p.add_argument("--workdir", "-w", default=None, help="directory the command starts in")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the command")
    p.add_argument("--json", action="store_true", help="print exit code, output and timings as JSON")


def add_parsers(sub: Any, store_args: Any) -> None:
    p = sub.add_parser("vm", help="micro-VMs with a cubefs root: run, start, exec, fork, templates",
                       description="Micro-VMs under QEMU whose root filesystem a cubefs daemon serves over "
                       "virtio-fs (no host mount in between): an image read-only or a volume read-write. "
                       "A small agent in the guest's initramfs runs commands and returns their exit code, "
                       "stdout and stderr.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)

    q = vsub.add_parser("run", help="run one command in a new VM, then remove it",
                        description="Boot (or restore --template) a VM on NAME:TAG or --volume, run CMD through "
                        "the agent, print its stdout and stderr, exit with its exit code.")
    q.add_argument("image", nargs="?", metavar="NAME:TAG")
    _root_args(q, store_args)
    _machine_args(q)
    _exec_args(q)
    q.add_argument("cmd", nargs="*", metavar="-- CMD ARGS", help="the command, after \"--\"")

    q = vsub.add_parser("start", help="start a VM that stays up ('vm exec', 'vm rm')")
    q.add_argument("name")
    q.add_argument("image", nargs="?", metavar="NAME:TAG")
    _root_args(q, store_args)
    _machine_args(q)
    q.add_argument("--json", action="store_true")

    q = vsub.add_parser("exec", help="run a command in a running VM")
    q.add_argument("name")
    _exec_args(q)
    q.add_argument("cmd", nargs="*", metavar="-- CMD ARGS", help="the command, after \"--\"")

    q = vsub.add_parser("cp", help="copy a file into or out of a running VM",
                        description="'cubefs vm cp LOCAL NAME:/PATH' writes a file into the VM's root; 'cubefs vm "
                        "cp NAME:/PATH LOCAL' reads one out ('-' as LOCAL: stdin or stdout). Regular files, through "
                        "the guest agent; meant for inputs and results of a few MiB.")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--mode", default=None, help="the file's mode in the VM, octal (default: the local file's)")

    q = vsub.add_parser("ls", help="list VMs")
    q.add_argument("--json", action="store_true")

    q = vsub.add_parser("rm", help="stop and remove VMs")
    q.add_argument("names", nargs="*")
    q.add_argument("--all", action="store_true")

    q = vsub.add_parser("snapshot", help="snapshot a running VM: memory and disk at one instant (or --disk-only)",
                        description="Save the running VM's memory and devices (its root still mounted, open files "
                        "and all) and snapshot its volume at the same instant: the guest runs on, paused only for "
                        "the switch-over. The checkpoint is kept in the VM's directory (checkpoints/SNAPSHOT/, only "
                        "the RAM pages that differ from its template) until 'vm rm'; the volume snapshot of the same "
                        "name stays with the volume ('cubefs snapshots VOLUME'). --disk-only: the volume alone, the "
                        "guest's caches synced first.")
    q.add_argument("name")
    q.add_argument("--name", dest="snapshot", default=None,
                   help="the snapshot's name: 1-64 of a-z 0-9 - _ . (default: the UTC time)")
    q.add_argument("--disk-only", action="store_true",
                   help="snapshot the volume alone (a rollback to it unmounts the root: it fails while the root "
                   "is in use)")
    q.add_argument("--json", action="store_true")

    q = vsub.add_parser("rollback", help="put a VM back to a snapshot: its processes too, if it kept memory",
                        description="To a memory snapshot: the VM's QEMU is stopped, its volume rolled back and the "
                        "snapshot restored under the same name, hostname and machine-id, so the processes that ran "
                        "then go on, files open in the root included (nothing is unmounted; the VM need not be "
                        "running). To a --disk-only snapshot: the root is unmounted, rolled back and mounted again, "
                        "which fails while a process uses the root.")
    q.add_argument("name")
    q.add_argument("snapshot")
    q.add_argument("--json", action="store_true")

    q = vsub.add_parser("fork", help="copy a running VM on a volume N times, memory and disk",
                        description="Checkpoint the VM (it runs on, paused only for the switch-over; its root "
                        "stays mounted, so processes holding files open are no obstacle), clone its volume COUNT "
                        "times and restore the checkpoint into PREFIX-0.., each on its own clone with its own "
                        "hostname (its name) and machine-id. The copies own their volumes: 'vm rm' removes them. "
                        "All or nothing: if one copy fails to start, none is left.")
    q.add_argument("name")
    q.add_argument("--count", type=int, default=1, help="how many copies (1-64, default 1)")
    q.add_argument("--prefix", default=None, help="names of the copies: PREFIX-0.. (default NAME-fork)")
    q.add_argument("--json", action="store_true")

    q = vsub.add_parser("template", help="VM templates: create, ls, rm",
                        description="A template is a VM booted once and saved at 'agent ready', with no root "
                        "attached: any image or volume can be the root of its clones, which map its memory "
                        "copy-on-write.")
    q.add_argument("action", choices=("create", "ls", "rm"))
    q.add_argument("template", nargs="?")
    _machine_args(q)
    q.add_argument("--json", action="store_true")


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if not cmd:
        raise UsageError(f"usage: cubefs vm {args.vm_command} ... -- CMD [ARGS...]")
    return cmd


def key_values(items: list[str], what: str) -> dict[str, str]:
    """KEY=VALUE arguments (``--env``, ``--metadata``) as a dict; a clear error for anything else."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"{what} {item!r}: use KEY=VALUE")
        out[key] = value
    return out


def _env(args: argparse.Namespace) -> dict[str, str]:
    return key_values(args.env, "--env")


def _disk_size(text: str) -> int:
    from cubefs.humanize import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _root(args: argparse.Namespace) -> Any:
    from vmm.vm import Root

    if bool(args.image) == bool(args.volume):
        raise UsageError("give the root: NAME:TAG (an image, read-only) or --volume NAME (read-write)")
    if args.disk_volume and (args.volume or args.disk is not None or args.writable):
        raise UsageError("--disk-volume is the disk under an image's root: not with --volume, --disk or --writable")
    return Root(args.image, args.volume, args.store, args.s3_endpoint, args.cache_dir, args.volume_dir,
                disk=args.disk_volume)


def _spec(args: argparse.Namespace) -> Any:
    from vmm.machine import MachineSpec
    from vmm.vm import default_kernel

    return MachineSpec(Path(args.kernel) if args.kernel else default_kernel(), args.memory, 1, args.accel)


def _print_result(res: Any, args: argparse.Namespace, extra: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"exit_code": res.exit_code, "stdout": res.stdout.decode(errors="replace"),
                          "stderr": res.stderr.decode(errors="replace"), "seconds": round(res.seconds, 3),
                          **extra}, indent=1))
    else:
        sys.stdout.buffer.write(res.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(res.stderr)
        sys.stderr.flush()
    return int(res.exit_code)


def cmd_vm(args: argparse.Namespace) -> int:
    from vmm import vm

    action = args.vm_command
    if action == "run":
        res, machine = vm.run(_root(args), _command(args), _spec(args), args.template, timeout=args.timeout,
                              env=_env(args), workdir=args.workdir, writable=args.writable, disk=args.disk)
        return _print_result(res, args, {"start_seconds": machine.info.get("start_seconds")})
    if action == "start":
        v = vm.Vm.start(args.name, _root(args), _spec(args), args.template, args.writable, disk=args.disk)
        if args.json:
            print(json.dumps(v.info, indent=1))
        else:
            print(f"started VM {v.name} ({v.root.label}) in {v.info['start_seconds']:.2f} s"
                  + (f" from template {args.template}" if args.template else ""))
        return EXIT_OK
    if action == "exec":
        res = vm.Vm(args.name).exec(_command(args), env=_env(args), workdir=args.workdir, timeout=args.timeout)
        return _print_result(res, args, {})
    if action == "cp":
        return _copy(vm, args)
    if action == "ls":
        vms = vm.Vm.list()
        if args.json:
            print(json.dumps([v.info | {"running": v.alive} for v in vms], indent=1))
        elif not vms:
            print("no VMs")
        for v in vms if not args.json else []:
            state = "running" if v.alive else "stopped"
            print(f"{v.name:24} {state:8} {v.root.label:32} {v.info['memory_mb']} MiB  "
                  f"{'template ' + v.info['template'] if v.info.get('template') else 'booted'}")
        return EXIT_OK
    if action == "rm":
        if args.all and args.names:
            raise UsageError("cubefs vm rm: give names or --all, not both")
        names = [v.name for v in vm.Vm.list()] if args.all else args.names
        if not names and not args.all:  # --all with no VM removes nothing, and that is not an error
            raise UsageError("usage: cubefs vm rm NAME... | --all")
        for name in names:
            v = vm.Vm(name)
            if not v.dir.exists():
                raise NotFoundError(f"no VM {name} (in {vm.vm_root()}; 'cubefs vm ls')")
            v.destroy()
            shutil.rmtree(vm.vm_root() / f".{name}.checkpoints", ignore_errors=True)  # a killed rollback's
        return EXIT_OK
    if action in ("snapshot", "rollback", "fork"):
        return _snapshots(vm.Vm(args.name), args)
    return _template(args)


def _snapshots(v: Any, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vmm import vmsnap

    if args.vm_command == "snapshot":
        r = vmsnap.snapshot(v, args.snapshot, args.disk_only)
        if args.json:
            print(json.dumps(asdict(r)))
        elif r.memory:
            print(f"{r.vm}: snapshot {r.snapshot}, memory and disk (guest paused {r.paused_seconds * 1000:.0f} ms, "
                  f"{r.seconds:.2f} s in all, {size(r.ram_bytes)} of RAM kept)")
        else:
            print(f"{r.vm}: snapshot {r.snapshot}, disk only ({r.seconds:.2f} s)")
        return EXIT_OK
    if args.vm_command == "rollback":
        res = vmsnap.rollback(v, args.snapshot)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{res['vm']}: rolled back to {res['snapshot']} in {res['seconds']:.2f} s"
                  + (" (memory and disk: its processes go on from then)" if res["memory"] else " (disk only)"))
        return EXIT_OK
    forks = vmsnap.fork(v, args.count, args.prefix)
    if args.json:
        print(json.dumps([f.info for f in forks], indent=1))
    for f in forks if not args.json else []:
        print(f"started VM {f.name} ({f.root.label}) in {f.info['start_seconds']:.2f} s")
    return EXIT_OK


def _copy(vm: Any, args: argparse.Namespace) -> int:
    def remote(spec: str) -> tuple[str, str] | None:
        name, colon, path = spec.partition(":")
        return (name, path) if colon and path.startswith("/") and "/" not in name else None

    src, dst = remote(args.src), remote(args.dst)
    if (src is None) == (dst is None):
        raise UsageError("usage: cubefs vm cp LOCAL NAME:/PATH | cubefs vm cp NAME:/PATH LOCAL")
    if dst is not None:
        data = sys.stdin.buffer.read() if args.src == "-" else Path(args.src).read_bytes()
        mode = int(args.mode, 8) if args.mode else (
            0o644 if args.src == "-" else stat.S_IMODE(os.stat(args.src).st_mode))
        vm.Vm(dst[0]).put(dst[1], data, mode)
        return EXIT_OK
    assert src is not None
    data = vm.Vm(src[0]).get(src[1])
    if args.dst == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(args.dst).write_bytes(data)
    return EXIT_OK


def _template(args: argparse.Namespace) -> int:
    from vmm.vm import Template

    if args.action == "ls":
        ts = Template.list()
        if args.json:
            print(json.dumps([t.__dict__ for t in ts], indent=1))
        elif not ts:
            print("no VM templates")
        for t in ts if not args.json else []:
            ram = (t.dir / "ram").stat().st_blocks * 512
            print(f"{t.name:24} {t.memory_mb} MiB ({size(ram)} on disk)  {t.source}  {t.created}")
        return EXIT_OK
    if not args.template:
        raise UsageError(f"usage: cubefs vm template {args.action} NAME")
    if args.action == "create":
        t = Template.create(args.template, _spec(args))
        print(json.dumps(t.__dict__) if args.json else f"template {t.name} made in {t.seconds:.1f} s")
        return EXIT_OK
    Template.load(args.template, check=False).remove()
    return EXIT_OK


COMMANDS = {"vm": cmd_vm}
