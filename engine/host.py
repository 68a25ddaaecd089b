"""Host-allocator tuning (glibc's ``mallopt``): start-up memory back to the system, step memory kept warm.

``fix_mmap_threshold`` (start-up, every rank): see its docstring. ``keep_heap_warm`` (the training loop, CPU ranks):
every training step frees and re-allocates the same few hundred MB of activations. glibc's malloc gives freed memory
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
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3  # glibc's mallopt parameter numbers (malloc.h)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where malloc is not glibc's (other C libraries' differ or lack it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1


def fix_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Keep glibc's mmap threshold fixed (a no-op elsewhere), for the whole process.

    Start-up allocates and frees many large blocks: ``zero.Init`` creates each parameter whole, then keeps only its
    partition; the text phase encodes shard after shard. glibc raises its mmap threshold each time a large mmapped
    block is freed, so later blocks come from the heap, and the freed ones stay in the process: measured +92 MiB
    of host RSS per rank on a 466 MiB model (2 ranks), none of it in use. A fixed threshold sends every large block
    back to the system when it is freed.
    """
    _mallopt(_M_MMAP_THRESHOLD, threshold)  # setting it also disables the dynamic adjustment


def keep_heap_warm(device, pad: int = HEAP_PAD) -> bool:
    """Pads glibc's heap growth by ``pad`` bytes when ``device`` is the CPU; returns whether it applied.

    A no-op on other devices, where malloc is not glibc's, or where the user set ``MALLOC_TOP_PAD_`` (their choice
    wins).
    """
    if getattr(device, "type", device) != "cpu" or "MALLOC_TOP_PAD_" in os.environ:
        return False
    applied = _mallopt(_M_TOP_PAD, pad)
    if applied:
        log.debug("glibc heap growth padded by %d MB", pad >> 20)
    return applied
