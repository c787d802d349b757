"""Sandbox templates: what ``templateID`` names in ``Sandbox.create(template=...)``.

A sandbox template is three things made once, so that a create only assembles:

* **a template volume** ``sbxtpl-NAME`` over the image, snapshotted at ``ready``,
  holding what E2B templates have and a plain image may lack (user ``user``
  with home ``/home/user`` and passwordless sudo, the code interpreter's
  server); every sandbox's root is an O(1) clone of that snapshot;
* **a VM template** (``vmm``), a guest booted once and saved at "agent ready"
  with no root attached, shared by every sandbox template of the same machine
  size (a boot costs ~8 s under TCG; a restore ~0.5 s);
* a description, ``STATE/templates/NAME.json``: image, sizes, the start
  command and the port it must be listening on before a create returns.

**On a disk** (``--disk SIZE``): the prepared volume is committed as an image
``sbxtpl-NAME:ready`` (the sandboxes' read-only lower layer, over virtio-fs),
and ``sbxtpl-NAME`` becomes a block volume holding an empty ext4 (vmm/disk.py),
snapshotted at ``ready``: each sandbox's root is that image under an overlay on
its own O(1) clone of the disk, so what agents write (``pip install``, ``git
clone``, SQLite) goes to a block device at ~1.2x QEMU's own virtio-blk instead
of ~6x over virtio-fs (docs/benchmarks.md, "A VM's root on its disk").  The
service's snapshots, forks and rollbacks clone ``sbxtpl-NAME``'s kind of volume
either way; only the root handed to the VM differs (``root_for``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from cubefs.errors import CubefsError, NotFoundError, UsageError
from sandbox.config import private_dir, state_dir, write_private
from vmm import vm as vmm
from vmm.machine import MachineSpec
from vmm.vm import cubefs

log = logging.getLogger("cubefs.sandbox")

READY = "ready"  # the template volume's snapshot every sandbox clones
CODE_INTERPRETER_PORT = 49999
CODE_INTERPRETER_DIR = "/opt/cubefs/code_interpreter"  # server.py and worker.py, side by side
TOKEN_PATH = "/run/e2b/access-token"


# The cubefs options every root of a template shares (store, endpoint, cache and volume dirs):
# a vmm Root that names no image or volume yet; a sandbox's root is it with its volume.
StoreOptions = vmm.Root


@dataclass
class SandboxTemplate:
    name: str
    image: str
    cpus: int = 1
    memory_mb: int = 512
    start_cmd: str | None = None
    ready_port: int | None = None  # a create waits until something listens here (start_cmd's server)
    vm_template: str = ""
    volume: str = ""
    created: str = ""
    seconds: float = 0.0
    store: dict[str, str | None] = field(default_factory=dict)
    disk_mb: int = 0  # a disk root of this size (0: the root is a volume over virtio-fs)
    root_image: str = ""  # a disk template's lower layer: the prepared tree, committed
    # The token file holds the envd token and, on a second line, the traffic token: its code
    # interpreter accepts either.  Templates made before it have a server that reads one token;
    # their sandboxes keep one token for both (an old server would refuse a two-line file).
    traffic_token: bool = False

    @property
    def store_options(self) -> StoreOptions:
        return StoreOptions(**{k: v for k, v in self.store.items() if k in StoreOptions.__dataclass_fields__})

    @staticmethod
    def path(name: str) -> Path:
        return state_dir() / "templates" / f"{vmm.check_name(name, 'template')}.json"

    @classmethod
    def load(cls, name: str) -> SandboxTemplate:
        try:
            doc = json.loads(cls.path(name).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no sandbox template {name!r} ('cubefs sandbox template ls')") from None
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    @classmethod
    def list(cls) -> list[SandboxTemplate]:
        root = state_dir() / "templates"
        out = []
        for p in sorted(root.glob("*.json")) if root.is_dir() else []:
            try:
                out.append(cls.load(p.stem))
            except (CubefsError, ValueError, TypeError):
                continue
        return out

    def root_for(self, volume: str, peers_file: str | None) -> vmm.Root:
        """The root of a sandbox whose volume (a clone of ``self.volume``'s ``ready``) is ``volume``."""
        return root_for(self.store_options, volume, self.root_image, peers_file)

    def save(self) -> None:
        write_private(private_dir(state_dir() / "templates") / f"{self.name}.json",
                      json.dumps(asdict(self), indent=1) + "\n")


_vm_templates = threading.Lock()


def vm_template_for(cpus: int, memory_mb: int, kernel: Path | None = None) -> vmm.Template:
    """The VM template of this machine size, booted and saved the first time it is asked for,
    and again when the one saved cannot be restored any more (QEMU options, guest kernel or
    agent changed: an upgrade).  Sandboxes still running on the old one keep their private
    mappings of its RAM; only new ones need the new template."""
    name = f"sandbox-c{cpus}-m{memory_mb}"
    with _vm_templates:
        try:
            return vmm.Template.load(name)
        except NotFoundError:
            pass
        except vmm.StaleTemplateError as err:
            log.warning("%s: making it again", err)
            shutil.rmtree(vmm.template_root() / name, ignore_errors=True)
        return vmm.Template.create(name, MachineSpec(kernel or vmm.default_kernel(), memory_mb, cpus, "auto"))


def root_for(opts: StoreOptions, volume: str, root_image: str, peers_file: str | None) -> vmm.Root:
    """A volume over virtio-fs (served by the node's root host for the image), or with a
    ``root_image``, that image with ``volume`` as its disk."""
    if root_image:
        return replace(opts, image=root_image, volume=None, disk=volume, peers_file=peers_file)
    return replace(opts, volume=volume, shared=True, peers_file=peers_file)


def _disk_template(volume: str, opts: StoreOptions, disk_mb: int) -> str:
    """Turn the prepared volume into a disk template (the module's docstring); the image's ref."""
    from cubefs.cow.index import VolumeIndex
    from cubefs.volume.blk import resolve_image
    from cubefs.volume.cli import default_volume_dir
    from vmm.disk import clone_formatted

    ref = f"{volume}:{READY}"
    cubefs("commit", f"{volume}@{READY}", "--tag", ref,
           *opts.args("--store", "--s3-endpoint", "--cache-dir", "--volume-dir"))
    cubefs("volume", "rm", volume, *opts.args("--volume-dir"))
    lower = resolve_image(ref, opts.store, opts.s3_endpoint)  # recorded: 'cubefs commit' of a sandbox's disk
    index = VolumeIndex(os.path.abspath(opts.volume_dir or default_volume_dir()))
    try:
        clone_formatted(index, volume, disk_mb << 20, lower)
        index.snapshot(volume, READY)
        index.sync()
    finally:
        index.close()
    return ref


def _prepare_root(mnt: Path, code_interpreter: bool) -> None:
    """Make an image's tree what E2B templates are: user ``user`` (home /home/user, bash
    when present, passwordless sudo when sudo is installed); the code interpreter's server."""
    passwd = (mnt / "etc/passwd").read_text() if (mnt / "etc/passwd").exists() else ""
    if not any(line.split(":", 1)[0] == "user" for line in passwd.splitlines()):
        shell = "/bin/bash" if (mnt / "bin/bash").exists() or (mnt / "usr/bin/bash").exists() else "/bin/sh"
        res = subprocess.run(["chroot", str(mnt), "useradd", "--create-home", "--shell", shell, "user"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise CubefsError(f"cannot add user 'user' to the image (useradd: {res.stderr.strip()}); "
                              "an image for sandboxes needs useradd (Debian: package passwd)")
    home = mnt / "home/user"
    if not home.exists():
        home.mkdir(parents=True)
        subprocess.run(["chroot", str(mnt), "chown", "user:", "/home/user"], check=True)
    if (mnt / "etc/sudoers.d").is_dir():
        (mnt / "etc/sudoers.d/90-e2b-user").write_text("user ALL=(ALL:ALL) NOPASSWD: ALL\n")
        (mnt / "etc/sudoers.d/90-e2b-user").chmod(0o440)
    if code_interpreter:
        dst = mnt / CODE_INTERPRETER_DIR.lstrip("/")
        dst.mkdir(parents=True, exist_ok=True)
        for d in (dst, dst.parent):  # readable by the user the interpreter runs as (our umask is 077)
            d.chmod(0o755)
        for name in ("server.py", "worker.py"):
            shutil.copyfile(Path(__file__).resolve().parent / "code_interpreter" / name, dst / name)
            (dst / name).chmod(0o644)


def create(name: str, image: str, opts: StoreOptions, *, cpus: int = 1, memory_mb: int = 512,
           start_cmd: str | None = None, ready_port: int | None = None, code_interpreter: bool = False,
           kernel: Path | None = None, disk_mb: int = 0) -> SandboxTemplate:
    """Make sandbox template ``name`` from ``image`` (see the module's docstring); with
    ``disk_mb``, its sandboxes' roots are on disks of that many MiB."""
    vmm.check_name(name, "template")
    if disk_mb:
        from vmm.disk import check_size

        check_size(disk_mb << 20)
    if name.startswith("snap-"):
        raise UsageError(f"a sandbox template's name cannot start with 'snap-' ({name}): snapshots are named so")
    if SandboxTemplate.path(name).exists():
        raise UsageError(f"sandbox template {name} exists ('cubefs sandbox template rm {name}' first)")
    if code_interpreter:
        # loopback is enough: the proxy reaches guest ports through the agent's TCP streams
        start_cmd = start_cmd or (f"python3 {CODE_INTERPRETER_DIR}/server.py --host 127.0.0.1 --port "
                                  f"{CODE_INTERPRETER_PORT} --token-file {TOKEN_PATH} --user user")
        ready_port = ready_port or CODE_INTERPRETER_PORT
    t0 = time.monotonic()
    volume = f"sbxtpl-{name}"
    cubefs("volume", "create", volume, "--from", image, *opts.args("--store", "--s3-endpoint", "--volume-dir"))
    try:
        with tempfile.TemporaryDirectory(prefix="cubefs-sbxtpl-") as tmp:
            cubefs("mount", "--volume", volume, tmp, *opts.args("--store", "--s3-endpoint", "--cache-dir",
                                                                "--volume-dir"))
            try:
                _prepare_root(Path(tmp), code_interpreter)
            finally:
                cubefs("umount", tmp)
        cubefs("snapshot", volume, "--name", READY, "--sync", *opts.args("--volume-dir"))
        root_image = _disk_template(volume, opts, disk_mb) if disk_mb else ""
        vm_template = vm_template_for(cpus, memory_mb, kernel).name
    except BaseException:
        with contextlib.suppress(CubefsError):
            cubefs("volume", "rm", volume, *opts.args("--volume-dir"))
        raise
    t = SandboxTemplate(name, image, cpus, memory_mb, start_cmd, ready_port, vm_template, volume,
                        datetime.now(UTC).isoformat(timespec="seconds"), round(time.monotonic() - t0, 3),
                        asdict(opts), disk_mb, root_image, traffic_token=True)
    t.save()
    return t


def remove(name: str, in_use: list[str]) -> None:
    t = SandboxTemplate.load(name)
    if in_use:
        raise UsageError(f"sandbox template {name} is in use by {len(in_use)} sandbox(es): {', '.join(in_use[:5])}")
    with contextlib.suppress(CubefsError):
        cubefs("volume", "rm", t.volume, *t.store_options.args("--volume-dir"))
    if t.root_image:  # a disk template's prepared tree, committed as an image: its name goes too,
        # unless a snapshot's disk still lies over it (the image is that disk's lower layer)
        from sandbox.snapshots import SnapshotRecord

        over = [s.snapshot_id for s in SnapshotRecord.list(include_hidden=True) if s.template == name]
        if over:
            log.warning("sandbox template %s: image %s kept: snapshots %s have disks over it (remove them, then "
                        "'cubefs rm %s')", name, t.root_image, ", ".join(over[:5]), t.root_image)
        else:
            try:
                cubefs("rm", t.root_image, *t.store_options.args("--store", "--s3-endpoint"))
            except CubefsError as err:  # the template goes anyway: say what is left behind
                log.warning("sandbox template %s: its image %s was not removed (%s): 'cubefs rm %s' later", name,
                            t.root_image, err, t.root_image)
    SandboxTemplate.path(name).unlink(missing_ok=True)


def start_script(t: SandboxTemplate) -> list[str] | None:
    """The start command as an argv for the guest agent (run by the root's shell)."""
    return ["/bin/sh", "-c", f"exec {t.start_cmd}"] if t.start_cmd else None

