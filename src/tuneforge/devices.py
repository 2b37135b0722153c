"""Facts about the compute devices."""

from __future__ import annotations


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matmul support (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_RETAINED = False


def retain_freed_memory() -> bool:
    """Have the C allocator keep the memory a training process frees for its own reuse; whether it applies.

    A training step allocates and frees the same large activation buffers every forward and backward pass. glibc
    serves blocks above its mmap threshold with fresh mappings and hands freed heap tops back to the kernel, so every
    pass page-faults its activations in again (~280k faults, half a CPU-second of kernel time per 4 x 512-token step
    of the embedded model). With mmap off and up to 2 GiB of free heap kept untrimmed (mallopt takes an int),
    freed blocks are reused instead; the peak memory is the same, it is just not returned before the process ends.
    glibc on Linux only (elsewhere: no-op). Memory already mapped stays as it is; later allocations follow the rule.
    Idempotent.
    """
    global _RETAINED
    import ctypes
    import ctypes.util
    import platform

    if _RETAINED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        _RETAINED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    return _RETAINED
