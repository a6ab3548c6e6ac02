"""bfloat16 matrix products on CPUs without bfloat16 arithmetic (AVX2, no AVX512-BF16/AMX).

There, PyTorch's bfloat16 GEMM falls back to a slow path (measured here: ~18 GFLOP/s
against ~140 for float32). A bfloat16 GEMM is float32 arithmetic on bfloat16 inputs
rounded back to bfloat16, so doing exactly that — upcast, float32 GEMM, round —
keeps the numerics and restores the speed. Weights stay bfloat16 in memory; the
upcast is paid per call, which only pays off for enough rows, so small batches keep
the native path (which is bandwidth-bound there anyway).
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn

# Rows from which upcasting beats the native bfloat16 GEMM (measured on the AVX2 host).
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


class UpcastLinear(nn.Module):
    """A bfloat16 ``nn.Linear`` whose large products run in float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < UPCAST_MIN_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def upcast_bf16_linears(model: nn.Module) -> int:
    """Swap every bfloat16 ``nn.Linear`` of ``model`` for an ``UpcastLinear``; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, UpcastLinear(child))
                swapped += 1
    return swapped
