"""Linear layers on CPU through the packed-weight GEMM kernel.

PyTorch's CPU linear is slow at the shapes serving makes. Decoding a few sequences is a
matrix-vector product, bandwidth-bound, and PyTorch reads weights at ~11-13 GB/s of the
~27 GB/s the memory gives; decoding a batch is a GEMM of 16-128 rows, where MKL repacks
the whole weight on every call and reaches ~70 GFLOP/s here against ~130 for a weight
packed once at load (``kernels/cpu.py``); and on CPUs without bfloat16 arithmetic
(AVX2, no AVX512-BF16/AMX) PyTorch's bfloat16 GEMM runs at ~18 GFLOP/s. The kernel reads
float32 or bfloat16 weights and computes in float32, rounding once, as a bfloat16 GEMM
does. Only the packed copy is kept; a weight tied to the embedding stays there too.
The MLP's [gate | up] product is packed gate and up panels side by side and returns
silu(gate) * up straight from registers (``gated``): its 2x-wide output, 100 MB per
layer in an 8192-token prefill step, is never written or read back.
On CPUs with bfloat16 matrix units, PyTorch's own bfloat16 GEMM wins from
``NATIVE_BF16_MIN_ROWS`` rows on, and those layers keep their weight for it.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn

from infinite_llm.kernels.cpu import (
    linear_packed,
    linear_packed_supported,
    linear_silu,
    pack_gate_up,
    pack_weight,
    silu_and_mul,
)

# With native bfloat16 arithmetic (AMX), PyTorch's bf16 GEMM beats float32 arithmetic from
# about this many rows on.
NATIVE_BF16_MIN_ROWS = 64


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
    """An ``nn.Linear`` whose weight is packed once for the GEMM kernel (same bias tensor).

    ``native_min_rows``: from this many rows on, use PyTorch's GEMM on the kept weight
    (bfloat16 on CPUs with bfloat16 matrix units); None packs and drops the weight.
    ``gated``: the linear is an MLP's [gate | up] product (no bias); this module returns
    silu(gate) * up, ``out_features`` wide (half the linear's), and says so with
    ``applies_silu_and_mul``.
    """

    def __init__(
        self, linear: nn.Linear, native_min_rows: int | None = None, gated: bool = False
    ) -> None:
        super().__init__()
        if gated and (linear.bias is not None or linear.out_features % 2):
            raise ValueError("a gated linear is [gate | up] of equal halves, without bias")
        self.in_features = linear.in_features
        self.out_features = linear.out_features // 2 if gated else linear.out_features
        self.applies_silu_and_mul = gated
        weight = linear.weight.detach()
        packed = pack_gate_up(weight, self.out_features) if gated else pack_weight(weight)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias
        self.native_min_rows = native_min_rows
        self.weight = linear.weight if native_min_rows is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.native_min_rows is not None and rows >= self.native_min_rows:
            y = nn.functional.linear(x, self.weight, self.bias)
            return silu_and_mul(y) if self.applies_silu_and_mul else y
        flat = x.reshape(rows, self.in_features)
        if self.applies_silu_and_mul:
            y = linear_silu(flat, self.packed, self.out_features)
        else:
            y = linear_packed(flat, self.packed, self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gated = ", silu(gate) * up" if self.applies_silu_and_mul else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed{gated}"


def use_cpu_linears(model: nn.Module, gated: tuple[str, ...] = ("gate_up_proj",)) -> int:
    """Swap every CPU ``nn.Linear`` of ``model`` that the kernel takes for a ``CpuLinear``;
    returns how many. Each packs its own copy, so a weight tied to another module (the
    LM head to the embedding) stays where it is and the copy serves the product. Linears
    named in ``gated`` ([gate | up] products without bias) also apply SiLU-and-multiply."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            if not linear_packed_supported(dtype):
                continue
            native = dtype == torch.bfloat16 and has_native_bf16()
            fuse = name in gated and child.bias is None
            setattr(parent, name, CpuLinear(child, NATIVE_BF16_MIN_ROWS if native else None, fuse))
            swapped += 1
    return swapped
