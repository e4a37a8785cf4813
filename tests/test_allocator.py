"""qalora.limit_heap_retention: glibc's mmap threshold fixed, so freed large blocks go back."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import qalora

_GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")

# In a fresh process: free an 8 MiB block (glibc then raises its threshold to 8 MiB), then
# ask for 1 MiB and see whether it was mapped (mallinfo2().hblkhd: bytes in mapped blocks).
_PROBE = r"""
import ctypes, sys
import qalora.allocator as allocator
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc.mallinfo2.restype = Info
if sys.argv[1] == "1":
    print("set", allocator.limit_heap_retention())
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print("mapped", libc.mallinfo2().hblkhd - before >= 1 << 20)
"""


def _probe(fixed: bool, **env) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE, str(int(fixed))], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not _GLIBC, reason="needs glibc (mallinfo2)")
def test_fixed_threshold_maps_large_blocks_after_a_larger_one_was_freed():
    assert "mapped False" in _probe(False)  # glibc's rising threshold keeps 1 MiB in the heap
    assert _probe(True).split() == ["set", "True", "mapped", "True"]
    # The user's own setting stands: nothing is changed.
    assert "set False" in _probe(True, MALLOC_MMAP_THRESHOLD_="4194304")


@pytest.mark.parametrize("bad", [0, 100, 1 << 30, 1.5, True, "131072"])
def test_refuses_thresholds_outside_glibcs_range(bad):
    with pytest.raises(qalora.ConfigError, match="threshold"):
        qalora.limit_heap_retention(bad)
