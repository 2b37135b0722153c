"""Facts about the compute devices, and how a training process uses host memory."""

from __future__ import annotations

import threading
from typing import Any


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


def available_memory() -> int:
    """Bytes of host memory available to a new allocation without swapping (Linux: MemAvailable, which counts the
    page cache the kernel can drop; elsewhere the free pages)."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def heap_retained() -> bool:
    """Whether retain_freed_memory is in force in this process."""
    return _RETAINED


class HeapWarmer:
    """Page in `nbytes` of the C heap on a background thread, for a training loop about to start to reuse.

    The first steps of a run put their activations in memory the process has never touched, and every new page
    costs a fault and zeroing; on a VM also the host backing it with memory (measured: ~1.9 s of kernel time per
    GiB on a 2-core VM, and ~2.5 GB of new pages in the first steps of the LoRA benchmark, where later steps fault
    none). Started while the main thread still loads the model, one block of the main heap is allocated there and
    written by a thread of its own (memset releases the GIL) on the core the loading leaves idle; `finish` stops
    it and frees the block before the loop, whose allocations then take the pages already there. Only useful with
    retain_freed_memory in force (otherwise glibc would hand the block back to the kernel on free). The thread
    holds the block while it writes, so nothing frees it underneath (a run that fails before its loop leaves the
    thread to end on its own, or with the process); `finish` is idempotent.
    """

    PIECE = 64 << 20  # written per call; a stop request waits for at most one piece

    def __init__(self, nbytes: int):
        import torch

        self._buffer = torch.empty(nbytes, dtype=torch.uint8)  # main thread: the main heap (glibc arenas by thread)
        self.touched = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._touch, args=(self._buffer,), name="tuneforge-heap-warmer",
                                        daemon=True)
        self._thread.start()

    def _touch(self, buffer: Any) -> None:
        import ctypes

        address, size = buffer.data_ptr(), buffer.numel()  # (its reference keeps the block alive while it writes)
        for start in range(0, size, self.PIECE):
            if self._stop.is_set():
                return
            length = min(self.PIECE, size - start)
            ctypes.memset(address + start, 0, length)
            self.touched = start + length

    def finish(self) -> int:
        """Stop the thread and free the block; the bytes paged in."""
        self._stop.set()
        self._thread.join()
        self._buffer = None
        return self.touched
