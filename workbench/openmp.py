"""Give a thread's idle OpenMP workers back, so the thread that computes has the cores to itself.

libgomp, torch's OpenMP runtime on Linux, gives every thread that runs a parallel
region its own pool of workers, and keeps them. Once it manages more threads than
there are CPUs (the notebook's thread has run torch ops, and the engine's loop
thread runs the model) it stops letting idle workers spin: they sleep, and every
parallel region pays a wake-up. On a 2-core machine that made a decode step ~1.5x
longer (bench/NOTES.md, CPU entry 17). So on a CPU engine, a thread that hands its
work to the loop releases its pool, and the loop releases its own while idle; the
next region either thread runs builds a pool again (~0.1 ms).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing the next region needs


@functools.cache
def _pause() -> Callable[[int], int] | None:
    """libgomp's `omp_pause_resource_all`, where torch loaded libgomp; None with another runtime."""
    import torch  # noqa: F401 - loads torch's libgomp, which is the one to find

    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # only an already loaded libgomp
    except (OSError, AttributeError):  # not loaded (Intel or LLVM OpenMP, macOS), or no RTLD_NOLOAD
        return None
    fn = getattr(lib, "omp_pause_resource_all", None)  # OpenMP 5.0: GCC 9 and later
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def release_idle_workers() -> bool:
    """Free the calling thread's OpenMP worker pool; False where libgomp is not torch's runtime.

    Call it only between parallel regions (libgomp refuses inside one). Cheap when the
    thread holds no pool.
    """
    pause = _pause()
    if pause is None:
        return False
    if pause(OMP_PAUSE_SOFT) != 0:
        log.debug("omp_pause_resource_all refused (inside a parallel region?)")
        return False
    return True
