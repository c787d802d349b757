#!/usr/bin/env python3
"""One context of the code interpreter: a Python process that runs cells in one namespace.

Started by ``server.py`` (which sits beside this file) as ``python3 -u worker.py CMD_FD EVENT_FD
LIFELINE_FD`` in a session of its own. It reads one JSON line per cell from CMD_FD (``{"code",
"env_vars"}``) and writes JSON lines to EVENT_FD: ``number_of_executions`` when a cell starts,
then ``result`` or ``error`` if there is one, then ``done``. Everything the cell prints goes to
file descriptors 1 and 2 as it is printed (``-u``), which the server reads; an event is written
only after the output before it, so the server can keep them in order. It is a separate file
from the server so that starting a context imports only what a cell needs (the HTTP server's
imports would double a worker's start: 25 of 50 ms on the host, more under TCG).

SIGINT interrupts a running cell (KeyboardInterrupt) and is ignored between cells. When the
server is gone (its lifeline pipe or the command pipe reads EOF, even after ``kill -9``) the
worker kills its whole session, so nothing it started outlives the server.
"""

from __future__ import annotations

import ast
import base64
import json
import linecache
import os
import signal
import sys
import threading
import traceback
import types
from typing import Any

CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
RICH_FORMATS = ("html", "markdown", "svg", "png", "jpeg", "latex", "json", "javascript")

_cell_running = False
_loop: Any = None


def _on_sigint(signum: int, frame: Any) -> None:
    # Only a running cell is interrupted; a SIGINT between cells must not kill the worker.
    if _cell_running:
        raise KeyboardInterrupt


def _watch_lifeline(fd: int) -> None:
    # The server holds the only write end: EOF means it is gone (even after kill -9), and the
    # worker takes its session (itself and whatever it started) with it.
    while os.read(fd, 1):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(cmd_fd: int, event_fd: int, lifeline_fd: int) -> None:
    """Runs cells read as JSON lines from `cmd_fd` in one namespace, reporting on `event_fd`."""
    for fd in (cmd_fd, event_fd, lifeline_fd):
        os.set_inheritable(fd, False)  # for us alone, not for what the cells start
    threading.Thread(target=_watch_lifeline, args=(lifeline_fd,), daemon=True).start()
    signal.signal(signal.SIGINT, _on_sigint)
    sys.path[0] = ""  # modules in the context's cwd are importable, as in Jupyter; not ours
    sys.argv = [""]
    events = os.fdopen(event_fd, "w", encoding="utf-8")

    def send(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    module = types.ModuleType("__main__")  # the user's namespace is __main__, so pickle finds
    sys.modules["__main__"] = module  # classes and functions defined in cells (multiprocessing)
    namespace = module.__dict__
    count = 0
    with os.fdopen(cmd_fd, encoding="utf-8") as commands:
        for line in commands:
            request = json.loads(line)
            count += 1
            send({"type": "number_of_executions", "execution_count": count})
            try:
                event = _run_cell(request["code"], request.get("env_vars") or {}, namespace, count)
            except KeyboardInterrupt as exc:  # landed between the cell and its report
                event = _error_event(exc)
            if event is not None:
                send(event)
            send({"type": "done"})
    os.killpg(os.getpgrp(), signal.SIGKILL)  # EOF: the server is gone (see _watch_lifeline)


def _run_cell(code: str, env: dict[str, str], namespace: dict[str, Any], count: int) -> dict | None:
    """Runs one cell; returns its result or error event (None: no value to show)."""
    global _cell_running
    filename = f"<cell {count}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    saved = {name: os.environ.get(name) for name in env}
    try:
        os.environ.update(env)
        _cell_running = True
        value = _execute(code, filename, namespace)
        event = None if value is None else _result_event(value, namespace)
        _cell_running = False
        return event
    except BaseException as exc:  # the cell's error, SystemExit and KeyboardInterrupt included
        _cell_running = False
        return _error_event(exc)
    finally:
        _cell_running = False
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _execute(code: str, filename: str, namespace: dict[str, Any]) -> Any:
    """Runs `code` and returns the value of its last statement if that is an expression."""
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    _evaluate(compile(tree, filename, "exec", flags=flags), namespace)
    if last is None:
        return None
    return _evaluate(compile(ast.Expression(last.value), filename, "eval", flags=flags), namespace)


def _evaluate(code: Any, namespace: dict[str, Any]) -> Any:
    global _loop
    value = eval(code, namespace)  # running the user's code is the point
    if code.co_flags & CO_COROUTINE:  # top-level await: one event loop per context
        if _loop is None:
            import asyncio

            _loop = asyncio.new_event_loop()
        value = _loop.run_until_complete(value)
    return value


def _result_event(value: Any, namespace: dict[str, Any]) -> dict[str, Any]:
    namespace["_"] = value
    event: dict[str, Any] = {"type": "result", "text": repr(value), "is_main_result": True}
    for fmt in RICH_FORMATS:
        try:
            data = getattr(value, f"_repr_{fmt}_")()
            if isinstance(data, tuple):  # IPython's (data, metadata)
                data = data[0]
            if isinstance(data, bytes):
                data = base64.b64encode(data).decode("ascii")
            if data is not None:
                json.dumps(data)
                event[fmt] = data
        except Exception:  # no such method, or it failed: that format is simply absent
            continue
    return event


def _error_event(exc: BaseException) -> dict[str, Any]:
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
        tb = tb.tb_next  # the worker's own frames are not the user's business
    try:
        value = str(exc)
    except Exception:
        value = "<unprintable>"
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"type": "error", "name": type(exc).__name__, "value": value, "traceback": text}


if __name__ == "__main__":
    if len(sys.argv) != 4 or not all(arg.isdigit() for arg in sys.argv[1:]):
        sys.exit("usage: worker.py CMD_FD EVENT_FD LIFELINE_FD (server.py starts it)")
    main(*(int(fd) for fd in sys.argv[1:]))
