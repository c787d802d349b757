#!/usr/bin/env bash
# The main job, end to end, on the embedded default store (a local directory):
# build a Debian root filesystem into a cubefs image, mount it lazily, run
# python3 inside it, show what was fetched, unmount; then run python3 in a
# micro-VM whose root cubefs serves over virtio-fs.  Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ROOTFS=$(.venv/bin/python tools/make_rootfs.py)
MNT=$(mktemp -d /tmp/cubefs-demo.XXXXXX)
trap 'cubefs umount "$MNT" 2>/dev/null || true; rmdir "$MNT" 2>/dev/null || true' EXIT

echo "== cubefs build $ROOTFS --tag debian:bookworm"
cubefs build "$ROOTFS" --tag debian:bookworm
echo "== cubefs images"
cubefs images
echo "== cubefs mount debian:bookworm $MNT"
cubefs mount debian:bookworm "$MNT"
echo "== chroot $MNT python3 -c ..."
chroot "$MNT" python3 -c 'import json, platform; print(json.dumps({"hello": "from a lazily mounted cubefs image", "python": platform.python_version()}))'
echo "== cubefs stats $MNT"
cubefs stats "$MNT"
echo "== cubefs umount $MNT"
cubefs umount "$MNT"
echo "== python3 tools/make_vm_kernel.py   (a guest kernel + initramfs from Debian's packages, made once)"
.venv/bin/python tools/make_vm_kernel.py
echo "== cubefs vm run debian:bookworm -- python3 -c ...   (a micro-VM; its root served by cubefs over virtio-fs)"
cubefs vm run debian:bookworm -- python3 -c 'import platform; print("hello from a micro-VM, kernel", platform.release())'

echo "== cubefs sandbox template create base --from debian:bookworm   (an image prepared for sandboxes, made once)"
cubefs sandbox template ls --json | grep -q '"name": "base"' || cubefs sandbox template create base --from debian:bookworm
export CUBEFS_SANDBOX_API_KEY="e2b_demo_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
read -r API PROXY < <(.venv/bin/python -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
echo "== cubefs sandbox serve --api-listen 127.0.0.1:$API --proxy-listen 127.0.0.1:$PROXY   (E2B-compatible)"
SERVE_LOG=$(mktemp /tmp/cubefs-sandbox-serve.XXXXXX)
cubefs sandbox serve --api-listen "127.0.0.1:$API" --proxy-listen "127.0.0.1:$PROXY" >"$SERVE_LOG" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; cubefs umount "$MNT" 2>/dev/null || true; rmdir "$MNT" 2>/dev/null || true' EXIT
.venv/bin/python -c 'import sys, time, urllib.request
for _ in range(300):
    try: urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1); break
    except OSError: time.sleep(0.2)' "$API"
echo "== the stock E2B SDK (pip install e2b), pointed at it with E2B_API_URL and E2B_SANDBOX_URL"
E2B_API_KEY=$CUBEFS_SANDBOX_API_KEY E2B_API_URL="http://127.0.0.1:$API" E2B_SANDBOX_URL="http://127.0.0.1:$PROXY" \
.venv/bin/python - <<'PY'
import time
from e2b import Sandbox

t0 = time.monotonic()
sbx = Sandbox.create(envs={"GREETING": "hello"})           # a micro-VM restored from the template
print(f"sandbox {sbx.sandbox_id} created in {time.monotonic() - t0:.2f} s")
sbx.files.write("hello.py", "import platform\nprint('python', platform.python_version(), 'in', platform.node())\n")
run = sbx.commands.run("echo $GREETING from $(whoami); python3 hello.py", on_stdout=lambda s: print("  |", s, end=""))
print("exit code", run.exit_code)
t0 = time.monotonic()
snap = sbx.create_snapshot()                              # memory and disk at one instant
child = Sandbox.create(snap.snapshot_id)                   # a sandbox that goes on from it
print(f"snapshot {snap.snapshot_id} and a sandbox from it in {time.monotonic() - t0:.2f} s:",
      child.commands.run("python3 hello.py").stdout.strip())
child.kill()
Sandbox.delete_snapshot(snap.snapshot_id)
sbx.kill()
print("killed; running:", sbx.is_running())
PY
kill $SERVE; wait $SERVE 2>/dev/null || true
