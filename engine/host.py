"""Host-allocator tuning for processes that compute on the CPU.

Every training step frees and re-allocates the same few hundred MB of activations. glibc's malloc gives freed memory
at the top of the heap back to the kernel (``M_TRIM_THRESHOLD``) and grows it again by the bare request
(``M_TOP_PAD`` = 128 KiB), so each step pays the kernel to zero fresh pages: on the embedded world's LeapAlign step
(2 CPU cores) that is ~4.8M minor page faults per 40 steps and half of the gradient pass's time. Padding every heap
growth by ``HEAP_PAD`` keeps those pages mapped; it changes no value (allocation only), and the extra resident memory
is bounded by the pad (about +0.1 GB measured). ``Trainer.train`` applies it on CPU ranks just before the first
step, not at start-up: start-up's transients (the text phase, zero.Init) still go back to the system, so host memory
after start-up stays flat in the number of prompts (``tests/distributed/test_partitioned_loading.py``). GPU ranks skip
it (their activations live on the device).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

HEAP_PAD = 512 << 20  # bytes added to every growth of the heap, and kept when it shrinks
_M_TOP_PAD = -2  # glibc's mallopt parameter number (malloc.h)


def keep_heap_warm(pad: int = HEAP_PAD) -> bool:
    """Pads glibc's heap growth by ``pad`` bytes; returns whether it applied.

    A no-op where malloc is not glibc's, or where the user set ``MALLOC_TOP_PAD_`` (their choice wins).
    """
    if "MALLOC_TOP_PAD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: other C libraries' mallopt differ or lack it
            return False
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_TOP_PAD, pad) == 1
    if applied:
        log.debug("glibc heap growth padded by %d MB", pad >> 20)
    return applied
