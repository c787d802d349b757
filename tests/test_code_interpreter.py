"""The code-interpreter-v1 server (sandbox/code_interpreter/server.py) driven by the stock
e2b_code_interpreter SDK, as a user's program drives it.

The server runs as the guest would run it: a subprocess of the system ``/usr/bin/python3`` (the
same Debian 12 Python 3.11 the images have, not our venv), on a free loopback port. The SDK is
pointed at it with its own ``sandbox_url`` setting (what ``E2B_SANDBOX_URL`` sets), which sends
every port's traffic to that URL; one test uses the SDK's debug mode, which is fixed to
localhost:49999.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_ports, kept_fds
from e2b import ConnectionConfig, NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox
from packaging.version import Version

# The SDK's HTTP client blocks in native code, where pytest-timeout's signal cannot reach it.
pytestmark = pytest.mark.timeout(120, method="thread")

SERVER = Path(__file__).resolve().parent.parent / "sandbox" / "code_interpreter" / "server.py"
PYTHON = "/usr/bin/python3"
INTERRUPT_GRACE = 5.0  # server.py's, in seconds


class Interp:
    """One running server: its process, port and workdir."""

    def __init__(self, tmp: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_ports(1)[0]
        self.home = tmp / "home"
        self.home.mkdir(exist_ok=True)
        self.log = tmp / f"server-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PYTHON, str(SERVER), "--host", "127.0.0.1", "--port", str(self.port),
                 "--cwd", str(self.home), *extra],
                stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert "listening" in line, self.log.read_text()

    def sdk(self, token: str | None = None, traffic: str | None = None) -> Sandbox:
        """The stock SDK's Sandbox, as Sandbox.create() returns it, aimed at this server."""
        config = ConnectionConfig(sandbox_url=f"http://127.0.0.1:{self.port}", api_key="unused")
        return Sandbox(sandbox_id="test-sbx", sandbox_domain=None, envd_version=Version("0.5.7"),
                       envd_access_token=token, traffic_access_token=traffic,
                       connection_config=config)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def workers(self) -> list[int]:
        """Pids of this server's context processes (its children)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaping orphans is init's job, and this
    machine's init does it about once a second)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def interp(tmp_path: Path) -> Iterator[Interp]:
    server = Interp(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_state_kept_between_run_code(interp: Interp) -> None:
    sbx = interp.sdk()
    first = sbx.run_code("x = 1\nprint('hello')")
    assert first.error is None and first.results == []
    assert first.logs.stdout == ["hello\n"]
    second = sbx.run_code("x + 1")
    assert second.text == "2"
    assert second.results[0].is_main_result
    assert second.execution_count == first.execution_count + 1
    # the value is shown as Python shows it, and None is not a result
    assert sbx.run_code("'a' * 3").text == "'aaa'"
    assert sbx.run_code("None").results == []
    # functions, imports and classes defined in one call are there in the next; pickle finds them
    sbx.run_code("import pickle\nclass P:\n    pass")
    assert sbx.run_code("type(pickle.loads(pickle.dumps(P()))).__name__").text == "'P'"


def test_async_sdk(interp: Interp) -> None:
    config = ConnectionConfig(sandbox_url=f"http://127.0.0.1:{interp.port}", api_key="unused")
    sbx = AsyncSandbox(sandbox_id="test-sbx", sandbox_domain=None, envd_version=Version("0.5.7"),
                       envd_access_token=None, traffic_access_token=None, connection_config=config)

    async def drive() -> tuple[str | None, list[str], str | None]:
        ctx = await sbx.create_code_context()
        await sbx.run_code("a = 6", context=ctx)
        lines: list[str] = []
        execution = await sbx.run_code("print('p')\na * 7", context=ctx,
                                       on_stdout=lambda m: lines.append(m.line))
        await sbx.remove_code_context(ctx)
        return execution.text, lines, (await sbx.run_code("a")).error.name

    assert asyncio.run(drive()) == ("42", ["p\n"], "NameError")


def test_stdout_streams_while_the_code_runs(interp: Interp) -> None:
    sbx = interp.sdk()
    seen: list[tuple[float, str, str]] = []
    code = ("import sys, time\n"
            "for i in range(3):\n"
            "    print(i)\n"
            "    print('err', i, file=sys.stderr)\n"
            "    time.sleep(0.4)\n"
            "'done'")
    execution = sbx.run_code(
        code,
        on_stdout=lambda m: seen.append((time.monotonic(), "out", m.line)),
        on_stderr=lambda m: seen.append((time.monotonic(), "err", m.line)))
    finished = time.monotonic()
    assert [line for _, kind, line in seen if kind == "out"] == ["0\n", "1\n", "2\n"]
    assert [line for _, kind, line in seen if kind == "err"] == ["err 0\n", "err 1\n", "err 2\n"]
    # the first line arrived while the loop still had ~0.8 s to go, not all at the end
    assert finished - seen[0][0] > 0.6
    assert execution.text == "'done'"
    assert execution.logs.stdout == ["0\n", "1\n", "2\n"]
    # output of child processes streams too, and a partial line is not lost
    execution = sbx.run_code("import subprocess\nsubprocess.run(['echo', 'from a child'])\n"
                             "print('no newline', end='')")
    assert "".join(execution.logs.stdout) == "from a child\nno newline"


def test_output_without_newlines_streams_too(interp: Interp) -> None:
    """A progress bar (carriage returns, never a newline) and one 1 MiB line."""
    sbx = interp.sdk()
    seen: list[float] = []
    code = ("import sys, time\n"
            "for i in range(100):\n"
            "    sys.stderr.write(f'\\r{i}%')\n"
            "    time.sleep(0.01)\n"
            "sys.stdout.write('y' * (1 << 20))")
    execution = sbx.run_code(code, on_stderr=lambda m: seen.append(time.monotonic()))
    finished = time.monotonic()
    assert "".join(execution.logs.stderr) == "".join(f"\r{i}%" for i in range(100))
    assert len(seen) >= 5 and finished - seen[0] > 0.5  # it came while the loop ran
    assert "".join(execution.logs.stdout) == "y" * (1 << 20)
    assert len(execution.logs.stdout) >= 8  # in pieces of at most 128 KiB, not held whole


def test_an_exception_gives_execution_error(interp: Interp) -> None:
    sbx = interp.sdk()
    errors = []
    execution = sbx.run_code("def f():\n    raise ValueError('bad value')\ny = 2\nf()",
                             on_error=errors.append)
    assert execution.error is not None
    assert execution.error.name == "ValueError"
    assert execution.error.value == "bad value"
    tb = execution.error.traceback
    assert "Traceback (most recent call last)" in tb
    assert "raise ValueError('bad value')" in tb and "line 2, in f" in tb
    assert "server.py" not in tb  # the interpreter's own frames are not shown
    assert errors == [execution.error]
    # what ran before the exception stays, and the context is still usable
    assert sbx.run_code("y").text == "2"
    syntax = sbx.run_code("x = = 1")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    exited = sbx.run_code("raise SystemExit(3)")
    assert exited.error is not None and exited.error.name == "SystemExit"
    assert sbx.run_code("y").text == "2"


def test_contexts_create_list_remove_restart(interp: Interp, tmp_path: Path) -> None:
    sbx = interp.sdk()
    sbx.run_code("shared = 'default'")
    workdir = tmp_path / "work"
    workdir.mkdir()
    ctx = sbx.create_code_context(cwd=str(workdir), language="python")
    assert ctx.language == "python" and ctx.cwd == str(workdir)
    assert sbx.run_code("import os\nmine = 5\nos.getcwd()", context=ctx).text == repr(str(workdir))
    # contexts do not share globals
    assert sbx.run_code("mine", context=ctx).text == "5"
    assert sbx.run_code("mine").error.name == "NameError"
    assert sbx.run_code("shared", context=ctx).error.name == "NameError"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    # restart: a fresh process in the same cwd, the state is gone
    pid = sbx.run_code("os.getpid()", context=ctx).text
    sbx.restart_code_context(ctx)
    assert sbx.run_code("mine", context=ctx).error.name == "NameError"
    assert sbx.run_code("import os\nos.getpid()", context=ctx).text != pid
    assert sbx.run_code("os.getcwd()", context=ctx).text == repr(str(workdir))
    assert sbx.run_code("shared").text == "'default'"  # the others are untouched
    # remove: gone from the list, its process ended, running in it is a NotFound
    ctx_pid = int(sbx.run_code("os.getpid()", context=ctx).text)
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    assert _gone([ctx_pid])
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)
    with pytest.raises(NotFoundException):
        sbx.remove_code_context(ctx.id)


def test_env_vars_per_call(interp: Interp) -> None:
    sbx = interp.sdk()
    code = "import os\nos.environ.get('CI_TEST_VAR')"
    assert sbx.run_code(code, envs={"CI_TEST_VAR": "per-call"}).text == "'per-call'"
    assert sbx.run_code(code).text is None  # restored after the call: no result for None
    assert "from-env" in sbx.run_code("import subprocess\nsubprocess.run('echo $V', shell=True)",
                                      envs={"V": "from-env"}).logs.stdout[0]


def test_client_disconnect_interrupts_the_code(interp: Interp) -> None:
    sbx = interp.sdk()
    sbx.run_code("kept = 'yes'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\nwhile True:\n    time.sleep(0.05)", timeout=1)
    assert time.monotonic() - started < 5
    # the loop was interrupted (SIGINT), not the context killed: the next call runs at once
    # and the state is still there
    started = time.monotonic()
    assert sbx.run_code("kept").text == "'yes'"
    assert time.monotonic() - started < 2


def test_code_that_ignores_the_interrupt_loses_its_context(interp: Interp) -> None:
    """A cell that survives SIGINT is killed after the grace period, so a context never stays
    stuck; the next call gets a fresh process."""
    sbx = interp.sdk()
    sbx.run_code("state = 1")
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)"
    with pytest.raises(TimeoutException):
        sbx.run_code(stubborn, timeout=0.5)
    started = time.monotonic()
    assert sbx.run_code("state").error.name == "NameError"  # waited for the kill, then fresh
    assert time.monotonic() - started < INTERRUPT_GRACE + 3


def test_one_cell_at_a_time_per_context_and_restart_ends_a_running_cell(interp: Interp) -> None:
    sbx = interp.sdk()
    other = sbx.create_code_context()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(sbx.run_code, "import time\ntime.sleep(0.8)\nfirst = time.monotonic()")
        time.sleep(0.3)
        # another context is not held up by it
        started = time.monotonic()
        assert sbx.run_code("1", context=other).text == "1"
        assert time.monotonic() - started < 0.5
        # the same context queues the second cell behind the first, like a Jupyter kernel
        assert sbx.run_code("time.monotonic() >= first").text == "True"
        assert slow.result().error is None
        running = pool.submit(sbx.run_code, "import time\ntime.sleep(60)", context=other)
        time.sleep(0.5)
        sbx.restart_code_context(other)
        ended = running.result(timeout=10)
    assert ended.error is not None and ended.error.name == "ContextDied"
    assert sbx.run_code("1 + 1", context=other).text == "2"


def test_a_dead_context_says_so_and_comes_back_fresh(interp: Interp) -> None:
    sbx = interp.sdk()
    sbx.run_code("lost = 1")
    orphan = int(sbx.run_code("import subprocess\nsubprocess.Popen(['sleep', '600']).pid").text)
    died = sbx.run_code("import os\nos._exit(7)")
    assert died.error is not None and died.error.name == "ContextDied"
    assert "exited with status 7" in died.error.value
    assert _gone([orphan])  # what it started went with it
    # a forked child holding the worker's pipes does not keep the call waiting
    forked = sbx.run_code("import os, time\nif os.fork() == 0:\n    time.sleep(600)\nos._exit(3)")
    assert forked.error is not None and "exited with status 3" in forked.error.value
    assert sbx.run_code("lost").error.name == "NameError"
    assert sbx.run_code("1 + 1").text == "2"


def test_access_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    server = Interp(tmp_path, "--token-file", str(token_file))
    try:
        with pytest.raises(SandboxException, match="401"):
            server.sdk(token="wrong").run_code("1")
        with pytest.raises(SandboxException, match="401"):
            server.sdk().run_code("1")
        assert server.sdk(token="s3cret-token").run_code("1 + 1").text == "2"
        # the stock SDK sends no X-Access-Token on context calls, only the traffic token
        with pytest.raises(SandboxException, match="401"):
            server.sdk(token="s3cret-token").list_code_contexts()
        sbx = server.sdk(token="s3cret-token", traffic="s3cret-token")
        ctx = sbx.create_code_context()
        assert sbx.run_code("2 + 2", context=ctx).text == "4"
        # the token is read per request: a replaced file (a forked sandbox) takes effect at once
        token_file.write_text("new-token")
        with pytest.raises(SandboxException, match="401"):
            sbx.run_code("1")
        assert server.sdk(token="new-token").run_code("3").text == "3"
        token_file.unlink()  # no token at all: everything is refused, nothing is open
        with pytest.raises(SandboxException, match="503"):
            server.sdk(token="new-token").run_code("3")
        status, _ = server.post("/execute", b"{}")
        assert status == 503
        # health stays open (readiness probes) and says nothing
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as res:
            assert res.status == 204
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_contexts_run_as_the_given_user(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("root-only")
    token_file.chmod(0o600)
    tmp_path.chmod(0o755)
    server = Interp(tmp_path, "--token-file", str(token_file), "--user", "nobody")
    try:
        sbx = server.sdk(token="root-only")
        nobody = pwd.getpwnam("nobody")
        assert sbx.run_code("import os\nos.getuid(), os.environ['HOME']").text == repr((nobody.pw_uid, nobody.pw_dir))
        stolen = sbx.run_code(f"open({str(token_file)!r}).read()")
        assert stolen.error is not None and stolen.error.name == "PermissionError"
    finally:
        server.stop()


def test_bad_input_gets_a_json_error(interp: Interp, tmp_path: Path) -> None:
    status, body = interp.post("/execute", b"{not json")
    assert status == 400 and body["code"] == 400 and "not JSON" in body["message"]
    status, body = interp.post("/execute", json.dumps({"code": 5}).encode())
    assert status == 400 and "'code' must be a string" in body["message"]
    status, body = interp.post("/execute", json.dumps({"code": "1", "env_vars": {"A": 1}}).encode())
    assert status == 400 and "env_vars" in body["message"]
    status, body = interp.post("/contexts", json.dumps({"cwd": str(tmp_path / "missing")}).encode())
    assert status == 400 and "not a directory" in body["message"]
    status, body = interp.post("/nowhere", b"")
    assert status == 404 and body["code"] == 404
    sbx = interp.sdk()
    with pytest.raises(SandboxException, match="not supported"):
        sbx.run_code("echo hi", language="bash")
    with pytest.raises(SandboxException, match="not supported"):
        sbx.create_code_context(language="r")
    # none of that disturbed the server
    assert sbx.run_code("40 + 2", language="python").text == "42"


def test_contexts_come_and_go_without_leaking(interp: Interp) -> None:
    """Descriptors and processes of the server stay flat over context churn, crashes included."""
    sbx = interp.sdk()
    sbx.run_code("1")
    fds = kept_fds(interp.proc.pid)
    workers = len(interp.workers())
    for _ in range(10):
        ctx = sbx.create_code_context()
        sbx.run_code("v = 1", context=ctx)
        sbx.restart_code_context(ctx)
        sbx.run_code("import os\nos._exit(1)", context=ctx)
        sbx.run_code("v = 2", context=ctx)
        sbx.remove_code_context(ctx)
    # A keep-alive connection the SDK's pool opened is the client's, not a leak: TCP
    # connections still ESTABLISHED are allowed to differ; every other descriptor (pipes,
    # files, the worker's sockets, a connection whose client has gone) must be as before.
    deadline = time.monotonic() + 5
    while (now := kept_fds(interp.proc.pid)) != fds and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now == fds, (now, fds)
    assert len([p for p in interp.workers() if _running(p)]) == workers


def test_nothing_is_left_behind(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        server = Interp(tmp_path)
        sbx = server.sdk()
        sbx.run_code("import subprocess\nchild = subprocess.Popen(['sleep', '600'])")
        grandchild = int(sbx.run_code("child.pid").text)
        sbx.create_code_context()
        pids = [*server.workers(), grandchild]
        assert len(pids) == 3
        server.stop(sig)
        assert _gone(pids), f"left running after {sig.name}: {pids}"


def test_output_throughput(interp: Interp) -> None:
    """A cell printing 64 MiB: every byte arrives, in order, through the SDK."""
    sbx = interp.sdk()
    line = "x" * 1023 + "\n"
    code = f"import sys\nfor i in range(64 * 1024):\n    sys.stdout.write({line!r})"
    started = time.monotonic()
    execution = sbx.run_code(code, timeout=120)
    elapsed = time.monotonic() - started
    assert execution.error is None
    assert "".join(execution.logs.stdout) == line * 64 * 1024
    print(f"64 MiB of stdout through the SDK in {elapsed:.2f} s: {64 / elapsed:.0f} MiB/s")


def test_debug_mode_reaches_localhost_49999(tmp_path: Path) -> None:
    """E2B_DEBUG=true: Sandbox.create() makes no API call and talks to localhost:49999."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(("127.0.0.1", 49999))
        except OSError:
            pytest.skip("127.0.0.1:49999 is taken")
    server = Interp(tmp_path, port=49999)
    try:
        sbx = Sandbox.create(debug=True, api_key="unused")
        sbx.run_code("x = 20")
        assert sbx.run_code("x + 1").text == "21"
    finally:
        server.stop()
