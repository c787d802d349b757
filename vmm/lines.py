"""A line-oriented client on a unix socket QEMU serves: the guest agent's channel
and QMP are both one message per line."""

from __future__ import annotations

import socket
import time

from cubefs.errors import CubefsError


class LineSocket:
    def __init__(self, path: str, what: str, timeout: float, error: type[CubefsError]) -> None:
        """Connect to ``path``, retrying for ``timeout`` seconds (QEMU may not be
        listening yet); failures raise ``error`` naming ``what``."""
        self.what = what
        self.error = error
        self._buf = b""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise error(f"{what}: cannot connect to {path}: {err.strerror}") from None
                time.sleep(0.02)
        self.sock = sock

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def line(self, deadline: float | None) -> bytes:
        """The next line; TimeoutError once ``deadline`` (monotonic; None: never) passes."""
        while b"\n" not in self._buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise self.error(f"{self.what}: the channel closed (QEMU exited?)")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()
