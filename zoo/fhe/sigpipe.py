"""Keep SIGPIPE ignored after concrete's runtime starts.

Python ignores SIGPIPE, so writing to a closed socket or pipe raises ``BrokenPipeError``.
concrete's runtime (HPX) installs its own handler for it the first time a circuit runs or is
simulated, and that handler aborts the process: afterwards, one HTTP client that disconnects
mid-download kills the whole process (seen as a segfault of the test suite). Every zoo code
path that runs a circuit calls :func:`restore` afterwards.
"""

from __future__ import annotations

import ctypes
import signal


def restore() -> None:
    """Put back Python's ``SIG_IGN`` for SIGPIPE, from any thread: through libc's ``signal``,
    as Python's ``signal.signal`` works on the main thread only (a web app's worker threads
    run circuits too)."""
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGPIPE, int(signal.SIG_IGN))


def ignored() -> bool:
    """Whether this process really ignores SIGPIPE (read from the kernel, not Python's cache)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split(":")[1], 16) >> (signal.SIGPIPE - 1) & 1)
    return False
