"""The host allocator of the processes that run models on CPU: freed activations stay in the heap.

torch's CPU tensors come from glibc's ``malloc``, which serves blocks above its mmap threshold with
``mmap`` and unmaps them on ``free``, and gives the heap's free top back to the kernel above its trim
threshold. Both thresholds adapt as a process runs, but not to a training step's mix of activation
sizes: each pass of the IRM teacher (``fr_tiny``, batch 32) faulted in about 35,000 zeroed pages again,
and the elementwise ops on its ``[32, 8, 112, 112]`` activations ran 3-4x slower in the step than alone.
:func:`retain_freed_memory` keeps blocks up to 32 MiB (glibc's ceiling) in the heap and never trims it,
so a step reuses the previous step's pages (no faults after the first step; the main job's step went
from about 280 to 240 ms). Peak RSS stays what it was; RSS just no longer falls between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, <malloc.h>
_M_MMAP_THRESHOLD = -3
_done = False


def _glibc() -> ctypes.CDLL | None:
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None  # not glibc (macOS, musl): its allocator has its own policy
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def retain_freed_memory() -> bool:
    """Keeps this process's freed blocks up to 32 MiB in its heap (glibc ``mallopt``); once per process.

    Call it in a process that is about to run a model on CPU (a training worker, an actor of a pool):
    it changes how this process allocates from now on and leaves other processes alone.

    Returns:
        Whether the allocator was changed (``False`` where the C library is not glibc).
    """
    global _done
    if _done:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _done
