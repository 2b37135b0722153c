"""Facts about the compute devices."""

from __future__ import annotations


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matmul support (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
