"""Backend that calls cuCheckpointProcess* in libcuda.so.1 through ctypes: no external binary.

Never calls cuInit: the calls work without it, and with it this process would keep a few MiB
on every GPU while the server is suspended (measured on driver 580: docs/facts.md).
"""

from __future__ import annotations

import ctypes

from ..base.config import Config
from ..base.processes import describe
from .backend import STATES, BackendError
from .owned_calls import OwnedOperation

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3  # the answer for a PID without a CUDA context
SYMBOLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)
ERROR_NAMES = {
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    600: "CUDA_ERROR_NOT_READY",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    999: "CUDA_ERROR_UNKNOWN",
}


class DriverUnavailable(Exception):
    pass


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class DriverBackend:
    name = "driver"

    def __init__(self, config: Config):
        try:
            self.lib = ctypes.CDLL(config.libcuda)
        except OSError as error:
            raise DriverUnavailable(f"cannot load {config.libcuda}: {error}")
        missing = [symbol for symbol in SYMBOLS if not hasattr(self.lib, symbol)]
        if missing:
            raise DriverUnavailable(f"{config.libcuda} lacks {', '.join(missing)} (driver older than 570?)")
        self.lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        self.lib.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointLockArgs)]
        for symbol in (
            "cuCheckpointProcessCheckpoint",
            "cuCheckpointProcessRestore",
            "cuCheckpointProcessUnlock",
        ):
            getattr(self.lib, symbol).argtypes = [ctypes.c_int, ctypes.c_void_p]
        for symbol in SYMBOLS:
            getattr(self.lib, symbol).restype = ctypes.c_int
        self.run_dir = config.run_dir

    def _owned(self, op: str, pid: int, call) -> None:
        """Journal the call for as long as it runs (cuda/owned_calls.py): it cannot be cancelled."""
        try:
            operation = OwnedOperation(self.run_dir, op, pid)
            with operation:
                code = call()
        except OSError as error:
            raise BackendError(op, pid, f"not started: cannot journal it in {self.run_dir}: {error}")
        self._check(op, pid, code)

    def driver_version(self) -> int | None:
        """cuDriverGetVersion (e.g. 13000), which needs no cuInit; None if unavailable."""
        version = ctypes.c_int(0)
        try:
            if self.lib.cuDriverGetVersion(ctypes.byref(version)) == CUDA_SUCCESS:
                return version.value
        except AttributeError:
            pass
        return None

    def _describe_error(self, code: int) -> str:
        text = ctypes.c_char_p()
        try:
            self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            if self.lib.cuGetErrorString(code, ctypes.byref(text)) == CUDA_SUCCESS and text.value:
                return f"{ERROR_NAMES.get(code, f'CUresult {code}')}: {text.value.decode(errors='replace')}"
        except AttributeError:
            pass
        return ERROR_NAMES.get(code, f"CUresult {code}")

    def _check(self, op: str, pid: int, code: int) -> None:
        if code != CUDA_SUCCESS:
            raise BackendError(op, pid, self._describe_error(code), timed_out=code == 600)

    def get_state(self, pid: int, timeout_s: float | None = None) -> str | None:
        """The driver call cannot be bounded: the caller's thread (run_parallel) bounds the wait."""
        state = ctypes.c_int(-1)
        code = self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(state))
        if code == CUDA_ERROR_NOT_INITIALIZED or (code != CUDA_SUCCESS and describe(pid) is None):
            return None
        self._check("get-state", pid, code)
        if not 0 <= state.value < len(STATES):
            raise BackendError("get-state", pid, f"unknown CUprocessState {state.value}")
        return STATES[state.value]

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self._owned("lock", pid, lambda: self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)))

    def checkpoint(self, pid: int) -> None:
        self._owned("checkpoint", pid, lambda: self.lib.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int) -> None:
        self._owned("restore", pid, lambda: self.lib.cuCheckpointProcessRestore(pid, None))

    def unlock(self, pid: int) -> None:
        self._owned("unlock", pid, lambda: self.lib.cuCheckpointProcessUnlock(pid, None))
