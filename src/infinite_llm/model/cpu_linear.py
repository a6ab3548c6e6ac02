"""Linear layers on CPU: each product on the fastest path for its shape.

Two PyTorch paths are slow here. Matrix-vector products (decode of a few sequences)
are bandwidth-bound and PyTorch reads weights at ~11-13 GB/s of the ~27 GB/s the memory
gives; the GEMV kernel (``kernels/cpu.py``) streams each weight row once for all rows.
And on CPUs without bfloat16 arithmetic (AVX2, no AVX512-BF16/AMX) PyTorch's bfloat16
GEMM falls back to ~18 GFLOP/s against ~140 for float32; a bfloat16 GEMM is float32
arithmetic on bfloat16 inputs rounded once at the end, so upcasting, multiplying in
float32 and rounding keeps the numerics and restores the speed. Weights stay in their
dtype in memory.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn

from infinite_llm.kernels.cpu import linear_small, linear_small_supported

# Up to this many rows the GEMV kernel beats a GEMM (measured on the AVX2 host).
KERNEL_MAX_ROWS = 8
# From this many rows upcasting bfloat16 beats the native bfloat16 GEMM.
UPCAST_MIN_ROWS = 12


@functools.cache
def has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return True
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return True
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


class CpuLinear(nn.Module):
    """An ``nn.Linear`` (same weight and bias tensors) that picks its path per call."""

    def __init__(self, linear: nn.Linear, use_kernel: bool, upcast: bool) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.use_kernel = use_kernel
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.use_kernel and x.dim() == 2 and rows <= KERNEL_MAX_ROWS:
            return linear_small(x, self.weight, self.bias)
        if self.upcast and rows >= UPCAST_MIN_ROWS:
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return nn.functional.linear(x, self.weight, self.bias)


def use_cpu_linears(model: nn.Module) -> int:
    """Swap every CPU ``nn.Linear`` of ``model`` that a faster path serves for a
    ``CpuLinear``; returns how many. Tied weights stay tied (the tensors are shared)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            use_kernel = linear_small_supported(dtype)
            upcast = dtype == torch.bfloat16 and not has_native_bf16()
            if use_kernel or upcast:
                setattr(parent, name, CpuLinear(child, use_kernel, upcast))
                swapped += 1
    return swapped
