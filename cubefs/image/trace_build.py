"""``cubefs build --trace-cmd CMD``: record an image's start-up trace at build time.

Why: the first start of an image on any node is otherwise the one that has no
trace to prefetch (issue 18: a first start of py-pandas at +10 ms is ~1.1x a
full pull, a start with a trace ~0.4x).  Running the image's own command once
at build time, on a lazy mount with an empty cache of its own, publishes its
trace before any node starts it: the image's first real start is already a
"later" one.  The command runs as ``chroot MOUNTPOINT /bin/sh -c CMD`` (root
only, as ``chroot`` is); the mount is the ordinary ``cubefs mount``, so what it
publishes is exactly what an ordinary first start would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from cubefs.errors import UsageError

CMD_TIMEOUT = 600.0


def _cubefs(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cubefs", *args], capture_output=True, text=True, timeout=timeout)


def record_build_trace(ref: str, store: str | None, s3_endpoint: str | None, cmd: str) -> dict[str, Any]:
    """Mount ``ref`` on an empty cache, run ``cmd`` in it, publish its trace; what was published."""
    if os.geteuid() != 0:
        raise UsageError("--trace-cmd runs the command with chroot: run cubefs build as root")
    work = tempfile.mkdtemp(prefix="cubefs-trace-cmd-")
    mnt = os.path.join(work, "root")
    os.mkdir(mnt, 0o700)
    where = (["--store", store] if store else []) + (["--s3-endpoint", s3_endpoint] if s3_endpoint else [])
    try:
        res = _cubefs("mount", ref, mnt, *where, "--cache-dir", os.path.join(work, "cache"),
                      "--no-server")
        if res.returncode != 0:
            raise UsageError(f"--trace-cmd: mounting {ref} failed: {res.stderr.strip()}")
        try:
            run = subprocess.run(["chroot", mnt, "/bin/sh", "-c", cmd], capture_output=True, text=True,
                                 timeout=CMD_TIMEOUT, env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                                           "/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"})
            if run.returncode != 0:
                raise UsageError(f"--trace-cmd: {cmd!r} exited {run.returncode} in {ref}: "
                                 f"{run.stderr.strip()[-300:]}")
            pushed = _cubefs("trace", "push", mnt, "--json")
            if pushed.returncode != 0:
                raise UsageError(f"--trace-cmd: publishing the trace failed: {pushed.stderr.strip()}")
            return dict(json.loads(pushed.stdout))
        finally:
            _cubefs("umount", mnt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
