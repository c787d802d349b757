"""Human-readable sizes, a terminal progress line and the log format (no dependency, stderr only)."""

from __future__ import annotations

import logging
import sys
import threading
import time


def size(n: float) -> str:
    """1536 → '1.5 KiB'; binary units, as du -h and the kernel use."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'512M', '10G', '4096' → bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        return int(float(t) * mult)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 10G)") from None


class Progress:
    """A single self-rewriting status line, refreshed at most 5 times a second."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.files = 0
        self.bytes = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def tick(self, files: int, nbytes: int) -> None:
        self.files, self.bytes = files, nbytes
        now = time.monotonic()
        if self.enabled and now - self._last > 0.2:
            self._last = now
            rate = nbytes / max(now - self.t0, 1e-6)
            with self._lock:
                sys.stderr.write(f"\r{self.label}: {files} files, {size(nbytes)} read, {size(rate)}/s   ")
                sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


def setup_logging(verbose: int, daemon: bool = False) -> None:
    level = logging.WARNING - 10 * verbose if not daemon else (logging.DEBUG if verbose > 1 else logging.INFO)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "cubefs: %(message)s"
    logging.basicConfig(level=max(level, logging.DEBUG), format=fmt, stream=sys.stderr, force=True)
