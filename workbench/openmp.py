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
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing the next region needs


@functools.cache
def _pausers() -> tuple[Callable[[int], int], ...]:
    """`omp_pause_resource_all` of every libgomp loaded (torch's, and a system one a C extension may have pulled in)."""
    import torch  # noqa: F401 - loads torch's libgomp first

    pausers = []
    for path in _loaded_libgomp_paths():  # wheels bundle it as libgomp.so.1 or libgomp-<hash>.so.1
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # the loaded library itself, never a second copy
        except (OSError, AttributeError):  # no RTLD_NOLOAD here
            continue
        fn = getattr(lib, "omp_pause_resource_all", None)  # OpenMP 5.0: GCC 9 and later
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            pausers.append(fn)
    return tuple(pausers)


def _loaded_libgomp_paths() -> list[str]:
    """Where /proc/self/maps has a libgomp mapped (none off Linux: Intel and LLVM OpenMP are left alone)."""
    try:
        maps = Path("/proc/self/maps").read_text().split()
    except OSError:
        return []
    return sorted({p for p in maps if p.startswith("/") and os.path.basename(p).startswith("libgomp")})


def release_idle_workers() -> bool:
    """Free the calling thread's OpenMP worker pools; False where no libgomp is loaded (or one refused).

    Call it only between parallel regions (libgomp refuses inside one). Cheap when the
    thread holds no pool.
    """
    pausers = _pausers()
    refused = [pause for pause in pausers if pause(OMP_PAUSE_SOFT) != 0]
    if refused:
        log.debug("omp_pause_resource_all refused (inside a parallel region?)")
    return bool(pausers) and not refused
