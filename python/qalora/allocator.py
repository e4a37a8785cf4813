"""How much freed memory the process keeps: glibc's malloc and large temporaries.

torch's CPU tensors come from the C library's ``malloc``. glibc serves a block of at least
its *mmap threshold* with a private mapping that ``free`` returns to the system at once, and
smaller ones from heaps that keep freed memory for reuse. The threshold starts at 128 KiB
and rises to the size of any mapped block freed since (up to 32 MiB), so after the first
large temporary is freed, later ones of that size stay in the heaps, and the process's
resident memory grows by what they fragment. A training step of an 8 B model makes
temporaries of 1 to 130 MiB (activations, logits, expanded group parameters): on the 8 B
Q4_K_M run the fixed threshold took about 2 GiB off the step's peak, at the same step time
(benches/RESULTS.md, "An 8 B model on this machine").
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
#: glibc's initial threshold; fixing it there stops the rise.
DEFAULT_THRESHOLD = 128 * 1024


def limit_heap_retention(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process, so that freed
    temporaries of that size and above go back to the system instead of staying in the
    heap (what ``MALLOC_MMAP_THRESHOLD_=131072`` does at start-up). The ``qalora`` command
    line calls it; call it before training a large model on CPU from Python.

    Process-wide and harmless elsewhere: a no-op that returns False where the C library is
    not glibc, and where ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice stands).

    Returns:
        Whether the threshold was set.

    Raises:
        ConfigError: ``threshold`` is not an integer in [4096, 32 MiB].
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 4096 <= threshold <= 32 << 20:
        from .errors import ConfigError

        raise ConfigError(f"threshold: got {threshold!r}, allowed: an integer number of bytes in [4096, 33554432]")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):  # glibc only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
