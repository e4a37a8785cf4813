"""What this CPU does natively, for the choices that depend on it.

On a CPU without native bfloat16 arithmetic (no AVX-512 BF16, no AMX: e.g. AMD Zen 3 and
other AVX2-only machines) torch emulates bf16 GEMMs, so ``torch.autocast("cpu",
torch.bfloat16)`` makes a SmolLM2 training step about 35 times slower than float32 (103 s
against 3.0 s, measured on Zen 3). And on a CPU without AVX-512 (F, VL, VNNI) qalora's
bf16-activation route has no wide kernel: it runs the exact kernel on rounded inputs, so it
is slower than the exact route (0.80x torch's int4 kernel at g32 on Zen 3, where the int8
route is 1.75-2.85x). The training loop and :func:`qalora.set_activations` ask here and take
the fast route unless told to insist.
"""

from __future__ import annotations

import functools

import torch


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so that
    ``torch.autocast("cpu", torch.bfloat16)`` runs bf16 GEMMs rather than emulating them."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def no_bf16_reason() -> str:
    """Why bf16 autocast is slow here, for warnings."""
    return "this CPU has no native bfloat16 arithmetic (no AVX-512 BF16 or AMX), so bf16 products are emulated"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def wide_kernels() -> bool:
    """Whether the 512-bit small-batch kernels run here (AVX-512 F, VL and VNNI, as the
    extension's own dispatch asks): the bf16-activation route is fast only with them."""
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: torch's own dispatch level is the best guess
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return {"avx512f", "avx512vl", "avx512_vnni"} <= flags
