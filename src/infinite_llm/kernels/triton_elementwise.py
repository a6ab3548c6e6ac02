"""The decoder's elementwise passes in Triton, for GPUs: RMSNorm (with the residual add
before it), SiLU-and-multiply and rotary, one launch each where PyTorch makes several
(a bfloat16 ``rms_norm`` is a dozen small ops). The contract and the rounding are the
CPU kernels' (``kernels/cpu.py``): float32 inside, rounded to the tensor's dtype where
Hugging Face's Llama rounds.

Runs on a GPU, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported), which is how CI tests it. ``triton`` is an optional
dependency (the ``gpu`` extra): only ``kernels/gpu.py`` imports this module, lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o,
                     size, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # residual += x, rounded to the dtype as the model's add is; the norm reads it.
        r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / size + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # Normalised in float32, rounded to the dtype, then scaled by the weight in it.
    y = (xf * inv).to(x.dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_o + cols, y.to(x.dtype), mask=ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (g / (1.0 + tl.exp(-g)) * up).to(gate.dtype),
             mask=ok)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_c,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    j = tl.arange(0, HALF_PAD)
    ok = j < HALF
    row = x_ptr + token * stride_xt + head * stride_xh
    a = tl.load(row + j, mask=ok, other=0.0)
    b = tl.load(row + HALF + j, mask=ok, other=0.0).to(tl.float32)
    angles = token * stride_c + j
    c0 = tl.load(cos_ptr + angles, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + angles + HALF, mask=ok, other=0.0).to(tl.float32)
    s0 = tl.load(sin_ptr + angles, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + angles + HALF, mask=ok, other=0.0).to(tl.float32)
    af = a.to(tl.float32)
    # Rotate-half: pairs (j, j + half) turn by the angle of pair j.
    tl.store(row + j, (af * c0 - b * s0).to(a.dtype), mask=ok)
    tl.store(row + HALF + j, (b * c1 + af * s1).to(a.dtype), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim) with unit stride along the last dim (a view where it can)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          out: torch.Tensor, eps: float) -> None:
    if weight.dtype != x.dtype or weight.numel() != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} does not fit "
                         f"x {tuple(x.shape)} {x.dtype}")
    size = x.shape[-1]
    rows = x.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            x, x if residual is None else residual, weight, out, x.stride(0),
            0 if residual is None else residual.stride(0), out.stride(0), size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm over the last dimension (normalised in float32, as Hugging Face)."""
    rows = _rows(x)
    out = torch.empty_like(rows)
    _norm(rows, None, weight, out, eps)
    return out.view(x.shape)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> None:
    """In place: residual += x, then x = rms_norm(residual) (contiguous, one shape)."""
    if not (x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
            and x.dtype == residual.dtype):
        raise ValueError("add_rms_norm_: x and residual must be contiguous, of one shape "
                         "and dtype")
    rows = x.view(-1, x.shape[-1])
    _norm(rows, residual.view(rows.shape), weight, rows, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2 * I) = [gate | up] -> silu(gate) * up (..., I)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: the last dimension ({x.shape[-1]}) must be even")
    rows = _rows(x)
    size = x.shape[-1] // 2
    out = torch.empty(rows.shape[0], size, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(max(size, 1)))
    if rows.shape[0] and size:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](
            rows, out, rows.stride(0), out.stride(0), size, BLOCK=block)
    return out.view(*x.shape[:-1], size)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate, in place, the first ``heads`` heads of x (N, all heads, D) by each token's
    cos, sin (N, 1, D), in the rotate-half layout."""
    tokens, all_heads, dim = x.shape
    if x.stride(2) != 1 or heads > all_heads or dim % 2:
        raise ValueError("rotary_: x must be (N, heads, head_dim) with unit-stride rows, "
                         f"head_dim even and heads <= {all_heads}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError("rotary_: dtypes differ")
    c, s = cos.reshape(tokens, dim).contiguous(), sin.reshape(tokens, dim).contiguous()
    if tokens and heads:
        half = dim // 2
        _rotary_kernel[(tokens, heads)](x, c, s, x.stride(0), x.stride(1), c.stride(0),
                                        HALF=half, HALF_PAD=triton.next_power_of_2(half))
