"""A small synchronous QMP client (QEMU Machine Protocol: JSON lines on a unix socket).

Events QEMU sends between replies are kept in ``events`` for whoever waits on
one (``wait_event``): migration completion, device removal.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cubefs.errors import CubefsError
from vmm.lines import LineSocket


class QmpError(CubefsError):
    """QEMU refused a command, or its monitor went away."""


class Qmp:
    def __init__(self, path: str, label: str = "") -> None:
        self.path = path
        self.label = label or path
        self.events: list[dict[str, Any]] = []
        self.chan = LineSocket(path, f"VM {self.label}: QEMU monitor", 30.0, QmpError)
        self._read(time.monotonic() + 30)  # the greeting
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.chan.close()

    def execute(self, command: str, timeout: float = 60.0, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.chan.send(json.dumps(msg).encode())
        deadline = time.monotonic() + timeout
        while True:
            doc = self._read(deadline)
            if "event" in doc:
                self.events.append(doc)
            elif "error" in doc:
                raise QmpError(f"VM {self.label}: QEMU refused {command}: {doc['error'].get('desc', doc['error'])}")
            elif "return" in doc:
                return doc["return"]

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                data = ev.get("data", {})
                if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    return self.events.pop(i)
            try:
                doc = self._read(deadline)
            except TimeoutError:
                raise QmpError(f"VM {self.label}: no {name} event from QEMU in {timeout:.0f} s") from None
            if "event" in doc:
                self.events.append(doc)

    def _read(self, deadline: float) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.chan.line(deadline))
        return doc
