"""CPU allocator settings for training on CPU.

A dense gradient of the item table is one large block (49,689 x 128 floats is
25 MB) allocated by every backward pass and freed by ``zero_grad``. glibc's
malloc serves blocks of that size with fresh ``mmap`` pages and returns them to
the system when freed, so every step pays for faulting in and zeroing 25 MB of
new pages: on a 2-core machine up to a quarter of the step at
``configs/dream_paper.toml``. ``keep_freed_blocks`` tells malloc to serve blocks
up to its largest ``mmap`` threshold (32 MB on 64-bit) from the heap and to keep
freed memory for reuse. Peak memory is unchanged; memory freed after the peak is
not given back until the process ends.

Larger tables (above 32 MB) are always mapped afresh; ``--train.sparse=true``
avoids the dense table gradient altogether.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's upper bound for M_MMAP_THRESHOLD on 64-bit systems."""
_TRIM_THRESHOLD = 2**30


def keep_freed_blocks() -> bool:
    """Makes glibc malloc reuse large freed blocks; returns True when it applied.

    A no-op (False) off Linux or with another C library.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    log.debug("malloc keeps freed blocks up to 32 MB: %s", applied)
    return applied
