"""nftables through libnftables (ctypes): one ruleset change in ~0.2 ms where an ``nft``
process takes ~5 ms, which a create would pay (the egress policy is set when a sandbox is
handed out).  A context talks to the network namespace of the thread that made it."""

from __future__ import annotations

import ctypes
import threading

from cubefs.errors import CubefsError


class NftError(CubefsError):
    pass


_lib: ctypes.CDLL | None = None


def _libnft() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            raise NftError("libnftables is not installed (Debian: apt-get install libnftables1 nftables)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _lib = lib
    return _lib


class Nft:
    """One libnftables context; ``run`` is one atomic transaction (all of it or none)."""

    def __init__(self) -> None:
        self._lib = _libnft()
        self._ctx = self._lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, commands: str) -> str:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(f"nft: {err.strip() or 'failed'}")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def run_once(commands: str) -> str:
    """``commands`` with a context of its own (in the calling thread's namespace)."""
    nft = Nft()
    try:
        return nft.run(commands)
    finally:
        nft.close()
