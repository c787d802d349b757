#!/usr/bin/env python3
"""The code interpreter of the ``code-interpreter-v1`` template: what ``e2b_code_interpreter``'s
``Sandbox.run_code`` and its context calls talk to on port 49999 of a sandbox.

Why it is built this way:

- **No Jupyter.** E2B's own template runs a Jupyter server plus ipykernel per context behind a
  FastAPI app (about 100 MB of packages and a second server process). A sandbox image here is
  Debian plus ``python3``; this file and ``worker.py`` beside it need nothing but the image's
  own Python 3.11 standard library, so they run in any image that has ``python3``, copied in as
  they are (both files, in one directory).
- **One Python process per context, not threads.** A context's globals live in its own worker
  process (``worker.py``), so a cell that crashes the interpreter (``os._exit``, a segfault in a C module) or
  refuses to stop loses only that context, SIGINT interrupts exactly that cell (the SDK's
  timeout and a client disconnect both end up there), and ``restart`` is a kill and a fresh
  process. The worker's stdout and stderr are its file descriptors 1 and 2, pipes this server
  reads, so output of child processes (``subprocess.run``, ``os.system``) streams too, and
  Python runs with ``-u`` so a ``print`` reaches the pipe when it is called, not when a buffer
  fills. The server sends whole lines as they arrive, a partial line at most 50 ms late.
- **One ordered event pipe.** The worker reports results, errors and the end of a cell on a
  pipe of its own, always after its output was written; the server reads every output pipe
  dry before it forwards such an event, so output never arrives after the cell's result.
- **Streaming over plain HTTP/1.1.** ``/execute`` answers with chunked NDJSON, one event per
  chunk, written as it happens; the SDK uses HTTP/1.1 for exactly this so a disconnect closes
  the TCP connection, which the server notices (the socket reads EOF) and turns into SIGINT.
  Backpressure is the pipes': a client that does not read stops the server reading, which
  stops the worker writing; nothing is buffered without bound.

What it does not do, compared with a Jupyter kernel: the result of a cell is the value of its
last expression, as ``text`` (its ``repr``) plus whatever ``_repr_html_``/``_repr_png_``/...
methods the value itself has (so a pandas DataFrame gives ``html``); there is no ``display()``,
no matplotlib capture, no charts, no ``%magics`` or ``!shell`` lines, no rich tracebacks, no
stdin (``input()`` reads EOF) and Python is the only language. Top-level ``await`` works.
Output that a background thread prints while no cell runs is delivered with the next cell.

Authentication: with ``--token-file``, every route but ``GET /health`` needs a token of the
file (one per line: the sandbox's envd token, then its traffic token) in ``X-Access-Token``
(what the SDK sends on ``/execute``) or ``E2B-Traffic-Access-Token`` (the only token header
e2b-code-interpreter 2.11.5 sends on its context calls); the file is read on every request, so
the tokens can be replaced (a forked sandbox) without a restart, and a missing or empty file
refuses everything (503). With ``--user``, the workers run as that
user, so code run in a context cannot read a token file that only root can.

Usage: ``python3 server.py [--host 0.0.0.0] [--port 49999] [--token-file F] [--cwd /home/user]
[--user NAME]``.
"""

from __future__ import annotations

import argparse
import codecs
import hmac
import json
import os
import pwd
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import urlsplit

DEFAULT_PORT = 49999
DEFAULT_CWD = "/home/user"
MAX_BODY = 16 << 20
INTERRUPT_GRACE = 5.0  # seconds an interrupted cell gets to stop before its worker is killed
PARTIAL_QUIET = 0.05  # a line without its newline waits at most this long to be sent
PIPE_READ = 65536  # bytes read from a worker's output at once; also the longest partial line kept
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


# ---------------------------------------------------------------------------------------------
# The server side of a worker.


class Client:
    """The /execute response: one chunk per event; `gone` once the client cannot be reached."""

    def __init__(self, sock: socket.socket, wfile: BinaryIO) -> None:
        self.sock = sock
        self.wfile = wfile
        self.gone = False

    def send(self, event: dict[str, Any]) -> None:
        if self.gone:
            return
        data = (json.dumps(event) + "\n").encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.gone = True

    def end(self) -> None:
        if self.gone:
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.gone = True

    def check_closed(self) -> bool:
        """True when the socket reads EOF (the client went away), False if it sent more."""
        # Poll first: a socket with a timeout waits for readability inside recv(), flags or not.
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        if self.gone or not poll.poll(0):
            return self.gone
        try:
            self.gone = self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            self.gone = True
        return self.gone


class OutputPipe:
    """A worker's stdout or stderr: whole lines are sent as they come; the rest of a line when
    it is PARTIAL_QUIET old or PIPE_READ long (a progress bar without newlines, one huge line),
    or when asked."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.partial = ""
        self.partial_since = 0.0
        self.eof = False

    def read(self, client: Client) -> bool:
        """Reads once; False when there was nothing (or EOF)."""
        try:
            data = os.read(self.fd, PIPE_READ)
        except BlockingIOError:
            return False
        self.eof = not data
        text = self.partial + self.decoder.decode(data, final=not data)
        cut = text.rfind("\n") + 1
        if cut:
            client.send({"type": self.name, "text": text[:cut], "timestamp": time.time_ns()})
        if cut or not self.partial:  # the partial line (if any) starts in this read
            self.partial_since = time.monotonic()
        self.partial = text[cut:]
        if len(self.partial) >= PIPE_READ or (
                self.partial and time.monotonic() - self.partial_since >= PARTIAL_QUIET):
            self.flush(client)
        return bool(data)

    def flush(self, client: Client) -> None:
        if self.partial:
            client.send({"type": self.name, "text": self.partial, "timestamp": time.time_ns()})
            self.partial = ""

    def drain(self, client: Client) -> None:
        while self.read(client):
            pass
        self.flush(client)


class Worker:
    """One context's Python process and the pipes to it."""

    def __init__(self, cwd: str, user: str | None) -> None:
        cmd_r, cmd_w = os.pipe()
        event_r, event_w = os.pipe()
        life_r, self._lifeline = os.pipe()
        env = dict(os.environ)
        ids: dict[str, Any] = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)
            ids = dict(user=entry.pw_uid, group=entry.pw_gid,
                       extra_groups=os.getgrouplist(user, entry.pw_gid))
        argv = [sys.executable, "-u", WORKER, str(cmd_r), str(event_w), str(life_r)]
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=env, pass_fds=(cmd_r, event_w, life_r), start_new_session=True, **ids)
        except BaseException:
            for fd in (cmd_w, event_r, self._lifeline):
                os.close(fd)
            raise
        finally:
            for fd in (cmd_r, event_w, life_r):
                os.close(fd)
        self._commands = os.fdopen(cmd_w, "wb")
        self._events = event_r
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._outputs = [OutputPipe(self.proc.stdout.fileno(), "stdout"),
                         OutputPipe(self.proc.stderr.fileno(), "stderr")]
        for fd in (event_r, *(o.fd for o in self._outputs)):
            os.set_blocking(fd, False)
        # Readable when the worker exits, even if a process it forked still holds its event pipe
        # (multiprocessing), which then never reads EOF. Linux 5.3+; without it, EOF must do.
        try:
            self._pidfd: int | None = os.pidfd_open(self.proc.pid)
        except OSError:
            self._pidfd = None
        self.dead = False
        self._lock = threading.Lock()
        self._executing = False
        self._closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def kill(self) -> None:
        """Ends the worker and everything it started (its session), and frees its pipes (at
        once, or when the cell that is reading them has ended)."""
        self._kill_session()
        with self._lock:
            if not self._executing:
                self._close()

    def _kill_session(self) -> None:
        self.dead = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # also after the worker itself is gone
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f in (self._commands, self.proc.stdout, self.proc.stderr):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass
        for fd in (self._events, self._lifeline, self._pidfd):
            if fd is not None:
                os.close(fd)

    def execute(self, request: dict[str, Any], client: Client) -> None:
        """Runs one cell, sending its events to `client` as they happen; returns when it ended.

        A client that goes away interrupts the cell (SIGINT); a cell that has not stopped
        INTERRUPT_GRACE seconds later loses its worker (killed; the next cell gets a new one)."""
        with self._lock:
            if self.dead:  # killed (a restart) after the context handed it out
                return self._died(client)
            self._executing = True
        selector = selectors.DefaultSelector()
        deadline: float | None = None
        pending = b""
        try:
            for output in self._outputs:
                selector.register(output.fd, selectors.EVENT_READ, output)
            selector.register(self._events, selectors.EVENT_READ, None)
            selector.register(client.sock, selectors.EVENT_READ, client)
            if self._pidfd is not None:
                selector.register(self._pidfd, selectors.EVENT_READ, self)
            try:
                self._commands.write(json.dumps(request).encode() + b"\n")
                self._commands.flush()
            except BrokenPipeError:
                return self._died(client)
            while True:
                if client.gone and deadline is None:
                    self.proc.send_signal(signal.SIGINT)
                    deadline = time.monotonic() + INTERRUPT_GRACE
                timeout = PARTIAL_QUIET if any(o.partial for o in self._outputs) else None
                if deadline is not None:
                    timeout = max(0.0, min(timeout or INTERRUPT_GRACE, deadline - time.monotonic()))
                ready = selector.select(timeout)
                if not ready:
                    for output in self._outputs:
                        output.flush(client)
                    if deadline is not None and time.monotonic() >= deadline:
                        self.kill()
                        return
                for key, _ in ready:
                    if isinstance(key.data, OutputPipe):
                        key.data.read(client)
                        if key.data.eof:  # the worker closed it: do not spin on it
                            selector.unregister(key.fd)
                    elif isinstance(key.data, Client):
                        client.check_closed()  # EOF: gone; bytes: later writes will tell
                        selector.unregister(client.sock)
                    elif key.data is self:  # the worker exited in the middle of the cell
                        return self._died(client)
                    else:
                        try:
                            data = os.read(self._events, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            return self._died(client)
                        pending += data
                        while b"\n" in pending:
                            line, pending = pending.split(b"\n", 1)
                            for output in self._outputs:
                                output.drain(client)  # what was printed before this event
                            event = json.loads(line)
                            if event["type"] == "done":
                                return None
                            client.send(event)
        finally:
            selector.close()
            with self._lock:
                self._executing = False
                if self.dead:
                    self._close()

    def _died(self, client: Client) -> None:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # it closed its event pipe but lives on
            code = -signal.SIGKILL
        self._kill_session()  # and whatever it left running
        if not self._closed:
            for output in self._outputs:
                output.drain(client)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        client.send({"type": "error", "name": "ContextDied",
                     "value": f"the context's Python process {how}; its state is lost",
                     "traceback": ""})


# ---------------------------------------------------------------------------------------------
# Contexts and the HTTP API.


class Context:
    """A named Python namespace: the worker holding it, started now and again after a restart."""

    def __init__(self, language: str, cwd: str, user: str | None) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.user = user
        self.busy = threading.Lock()  # one cell at a time, as in a Jupyter kernel
        self._guard = threading.Lock()
        self._worker = Worker(cwd, user)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def worker(self) -> Worker:
        """The live worker, a new one if the last one died (call with `busy` held)."""
        with self._guard:
            if not self._worker.alive():
                self._worker.kill()
                self._worker = Worker(self.cwd, self.user)
            return self._worker

    def restart(self) -> None:
        with self._guard:
            old, self._worker = self._worker, Worker(self.cwd, self.user)
        old.kill()  # a cell running on it ends with a ContextDied error

    def close(self) -> None:
        with self._guard:
            self._worker.kill()


class Interpreter:
    """All contexts of this sandbox; the default one is made on first use."""

    def __init__(self, cwd: str, user: str | None) -> None:
        self.cwd = cwd
        self.user = user
        self._lock = threading.Lock()
        self._contexts: dict[str, Context] = {}
        self._default: Context | None = None

    def create(self, language: str, cwd: str | None) -> Context:
        context = Context(language, cwd or self.cwd, self.user)
        with self._lock:
            self._contexts[context.id] = context
        return context

    def default(self) -> Context:
        with self._lock:
            if self._default is None or self._default.id not in self._contexts:
                self._default = Context("python", self.cwd, self.user)
                self._contexts[self._default.id] = self._default
            return self._default

    def get(self, context_id: str) -> Context | None:
        with self._lock:
            return self._contexts.get(context_id)

    def list(self) -> list[Context]:
        with self._lock:
            return list(self._contexts.values())

    def remove(self, context_id: str) -> bool:
        with self._lock:
            context = self._contexts.pop(context_id, None)
        if context is None:
            return False
        context.close()
        return True

    def close(self) -> None:
        for context in self.list():
            self.remove(context.id)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], interpreter: Interpreter,
                 token_file: str | None) -> None:
        super().__init__(address, Handler)
        self.interpreter = interpreter
        self.token_file = token_file


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # an idle keep-alive connection is closed after this many seconds
    server: Server

    def setup(self) -> None:
        super().setup()
        # Each event is its own small write and must leave at once: without this, Nagle holds
        # the second write until the client's delayed ACK (40 ms on every SDK call, measured).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no line per request: nobody may be reading our stderr in the guest

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        try:
            self._route(method, urlsplit(self.path).path.rstrip("/") or "/")
        except HttpError as exc:
            self._reply(exc.status, {"code": exc.status, "message": exc.message})
        except (OSError, subprocess.SubprocessError, KeyError) as exc:  # e.g. a worker not started
            self._reply(500, {"code": 500, "message": f"{type(exc).__name__}: {exc}"})

    def _route(self, method: str, path: str) -> None:
        interpreter = self.server.interpreter
        if (method, path) == ("GET", "/health"):
            return self._reply(204)
        self._authenticate()
        body = self._body()
        parts = path.strip("/").split("/")
        if (method, path) == ("POST", "/execute"):
            return self._execute(body)
        if (method, path) == ("POST", "/contexts"):
            language = _language(body.get("language"))
            cwd = body.get("cwd")
            if cwd is not None and not (isinstance(cwd, str) and os.path.isdir(cwd)):
                raise HttpError(400, f"cwd {cwd!r} is not a directory")
            return self._reply(200, interpreter.create(language, cwd).describe())
        if (method, path) == ("GET", "/contexts"):
            return self._reply(200, [c.describe() for c in interpreter.list()])
        if len(parts) in (2, 3) and parts[0] == "contexts":
            if (method, len(parts)) == ("DELETE", 2):
                if not interpreter.remove(parts[1]):
                    raise HttpError(404, f"context {parts[1]!r} not found")
                return self._reply(204)
            if (method, len(parts), parts[-1]) == ("POST", 3, "restart"):
                context = interpreter.get(parts[1])
                if context is None:
                    raise HttpError(404, f"context {parts[1]!r} not found")
                context.restart()
                return self._reply(204)
        raise HttpError(404, f"no route {method} {path}")

    def _authenticate(self) -> None:
        path = self.server.token_file
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as f:
                tokens = [t.strip().encode() for t in f.read().splitlines() if t.strip()]
        except OSError as exc:
            raise HttpError(503, f"access token unavailable: {exc.strerror}") from None
        if not tokens:
            raise HttpError(503, "access token unavailable: the token file is empty")
        given = [g.encode() for h in ("X-Access-Token", "E2B-Traffic-Access-Token")
                 if (g := self.headers.get(h)) is not None]
        if not any(hmac.compare_digest(g, t) for g in given for t in tokens):
            raise HttpError(401, "missing or wrong X-Access-Token")

    def _body(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise HttpError(413, f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return body

    def _execute(self, body: dict[str, Any]) -> None:
        code, context_id, env = body.get("code"), body.get("context_id"), body.get("env_vars")
        if not isinstance(code, str):
            raise HttpError(400, "'code' must be a string")
        if env is not None and not (isinstance(env, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise HttpError(400, "'env_vars' must map strings to strings")
        if context_id is not None:
            context = self.server.interpreter.get(str(context_id))
            if context is None:
                raise HttpError(404, f"context {context_id!r} not found")
        else:
            _language(body.get("language"))
            context = self.server.interpreter.default()
        client = Client(self.connection, self.wfile)
        while not context.busy.acquire(timeout=0.2):  # another cell runs in this context
            if client.check_closed():
                self.close_connection = True
                return
        try:
            worker = context.worker()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                worker.execute({"code": code, "env_vars": env}, client)
            except Exception as exc:  # the headers are out: report it in the stream
                client.send({"type": "error", "name": type(exc).__name__, "value": str(exc),
                             "traceback": traceback.format_exc()})
            client.send({"type": "end_of_execution"})
            client.end()
        finally:
            context.busy.release()
        if client.gone:
            self.close_connection = True

    def _reply(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _language(language: Any) -> str:
    if language in (None, "python"):
        return "python"
    raise HttpError(400, f"language {language!r} is not supported; this interpreter runs python")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The e2b code interpreter protocol on one port.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token-file", help="file holding the access token (read per request)")
    parser.add_argument("--cwd", default=DEFAULT_CWD, help="working directory of new contexts")
    parser.add_argument("--user", help="run the contexts' Python as this user")
    opts = parser.parse_args(argv)
    if not os.path.isdir(opts.cwd):
        parser.exit(2, f"server.py: --cwd {opts.cwd}: not a directory\n")
    if opts.user is not None:
        try:
            pwd.getpwnam(opts.user)
        except KeyError:
            parser.exit(2, f"server.py: --user {opts.user}: no such user\n")
    if opts.token_file is not None:
        try:
            with open(opts.token_file, encoding="utf-8") as f:
                if not f.read().strip():
                    parser.exit(2, f"server.py: --token-file {opts.token_file}: empty\n")
        except OSError as exc:
            parser.exit(2, f"server.py: --token-file {opts.token_file}: {exc.strerror}\n")
    interpreter = Interpreter(opts.cwd, opts.user)
    try:
        server = Server((opts.host, opts.port), interpreter, opts.token_file)
    except OSError as exc:
        parser.exit(2, f"server.py: cannot listen on {opts.host}:{opts.port}: {exc.strerror}\n")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"code interpreter listening on {opts.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        interpreter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
