"""The CPU kernels against the PyTorch ops they replace, at SmolLM2-135M's shapes.

Prints one table: for each case the kernel's time, PyTorch's time in the same run and
their ratio (timings on this 2-core machine are noisy: compare ratios, and run twice).

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/kernels.py

- linear: the packed-weight GEMM (``CpuLinear``) against ``F.linear`` on the same weight
  (float32), and against ``F.linear`` in bfloat16 (what PyTorch runs for a bf16 model);
- prefill attention: the flat-row causal kernel against PyTorch's fused CPU flash
  attention on padded (B, H, L, D) tensors with the KV heads repeated (what the engine
  ran before);
- decode attention: one layer of the paged kernel over 64 sequences (no PyTorch
  counterpart reads paged blocks in place; the bytes it reads per second are shown);
- tile width (on CPUs with AVX-512): the packed GEMM's 512-bit tiles against its AVX2
  tiles (equal results), float32, at SmolLM2's qkv and down shapes;
- fused: the gated MLP product (SiLU-and-multiply in the GEMM's epilogue) against the
  packed product then ``silu_and_mul``, and the residual add fused into RMSNorm against
  the add then the ``rms_norm`` kernel (float32; the "torch ms" column is the two-step
  path with our own kernels).

Needs: the base install (`pip install -e .`); no model.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from infinite_llm.kernels.cpu import (
    add_rms_norm_,
    cpu_kernels,
    has_avx512,
    linear_packed,
    linear_silu,
    pack_gate_up,
    pack_weight,
    paged_decode_attention,
    prefill_attention,
    rms_norm,
    silu_and_mul,
)
from infinite_llm.model.cpu_linear import CpuLinear

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 9, 3, 64, 576
LINEARS = {"qkv 576->960": (960, 576), "gate_up 576->3072": (3072, 576),
           "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def linear_rows(repeats: int) -> list[tuple[str, str, float, float, str]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (n_out, k_in) in LINEARS.items():
            linear = nn.Linear(k_in, n_out, bias=False).to(dtype)
            packed = CpuLinear(linear)
            for m in (1, 16, 64, 512, 2048):
                if n_out > 10000 and m > 64:
                    continue  # the LM head only sees the sampled rows
                x = torch.randn(m, k_in).to(dtype)
                ours = timed(lambda: packed(x), repeats)
                theirs = timed(lambda: nn.functional.linear(x, linear.weight), repeats)
                gflops = 2 * m * n_out * k_in / ours / 1e9
                label = f"linear {name} M={m} {str(dtype)[6:]}"
                rows.append((label, "F.linear", ours, theirs, f"{gflops:.0f} GFLOP/s"))
    return rows


def prefill_rows(repeats: int) -> list[tuple[str, str, float, float, str]]:
    rows = []
    for batch, length in ((1, 300), (28, 300), (16, 512), (2, 4096)):
        n = batch * length
        qkv = torch.randn(n, HEADS + 2 * KV_HEADS, HEAD_DIM)
        q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        seqs = torch.tensor([[i * length, length] for i in range(batch)])
        out = torch.empty(n, HEADS, HEAD_DIM)
        ours = timed(lambda: prefill_attention(q, k, v, seqs, HEAD_DIM**-0.5, out), repeats)

        def padded():
            group = HEADS // KV_HEADS
            qb = q.reshape(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
            kb = k.reshape(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, 1)
            vb = v.reshape(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, 1)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb, kb, vb, 0.0, True, scale=HEAD_DIM**-0.5
            )

        theirs = timed(padded, repeats)
        gflops = batch * 2 * length * length * HEAD_DIM * HEADS / ours / 1e9  # causal half
        rows.append((f"prefill attention {batch} x {length} float32", "flash SDPA", ours, theirs,
                     f"{gflops:.0f} GFLOP/s"))
    return rows


def decode_rows(repeats: int) -> list[tuple[str, str, float, float, str]]:
    rows = []
    batch, context, block = 64, 400, 16
    width = context // block
    for dtype in (torch.float32, torch.bfloat16):
        k_cache = torch.randn(batch * width, block, KV_HEADS, HEAD_DIM).to(dtype)
        v_cache = torch.randn(batch * width, block, KV_HEADS, HEAD_DIM).to(dtype)
        table = torch.randperm(batch * width).view(batch, width)  # blocks anywhere in the pool
        kv_len = torch.full((batch,), context)
        q = torch.randn(batch, 1, HEADS, HEAD_DIM).to(dtype)
        ours = timed(lambda: paged_decode_attention(q, k_cache, v_cache, table, kv_len, 0.125), repeats)
        gbs = 2 * k_cache.numel() * k_cache.element_size() / ours / 1e9
        rows.append((f"decode attention 64 x {context} {str(dtype)[6:]}", "-", ours, float("nan"),
                     f"{gbs:.1f} GB/s"))
    return rows


def width_rows(repeats: int) -> list[tuple[str, str, float, float, str]]:
    rows = []
    if not has_avx512():
        return rows
    for name in ("qkv 576->960", "down 1536->576"):
        n_out, k_in = LINEARS[name]
        packed = pack_weight(torch.randn(n_out, k_in))
        for m in (1, 16, 64, 512, 2048):
            x = torch.randn(m, k_in)
            ours = timed(lambda: linear_packed(x, packed, None, n_out, 512), repeats)
            theirs = timed(lambda: linear_packed(x, packed, None, n_out, 256), repeats)
            gflops = 2 * m * n_out * k_in / ours / 1e9
            rows.append((f"linear {name} M={m} AVX-512 tiles", "AVX2 tiles", ours, theirs,
                         f"{gflops:.0f} GFLOP/s"))
    return rows


def fused_rows(repeats: int) -> list[tuple[str, str, float, float, str]]:
    rows = []
    weight = torch.randn(3072, HIDDEN)
    gated, plain = pack_gate_up(weight, 1536), pack_weight(weight)
    norm = torch.randn(HIDDEN)
    for m in (1, 64, 8192):
        x = torch.randn(m, HIDDEN)
        ours = timed(lambda: linear_silu(x, gated, 1536), repeats)
        theirs = timed(lambda: silu_and_mul(linear_packed(x, plain, None, 3072)), repeats)
        rows.append((f"gate_up + SiLU-and-multiply {m} rows", "two steps", ours, theirs, ""))
    for m in (1, 64, 8192):
        x, residual = torch.randn(m, HIDDEN), torch.randn(m, HIDDEN)
        ours = timed(lambda: add_rms_norm_(x, residual, norm, 1e-5), repeats)
        theirs = timed(lambda: rms_norm(residual + x, norm, 1e-5), repeats)
        rows.append((f"residual add + RMSNorm {m} rows", "two steps", ours, theirs, ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels() is None:
        raise SystemExit("the CPU kernels are not available on this machine")
    rows = linear_rows(args.repeats) + width_rows(args.repeats) + prefill_rows(args.repeats)
    rows += decode_rows(args.repeats) + fused_rows(args.repeats)
    print(f"{'case':<44} {'kernel ms':>10} {'vs':<11} {'torch ms':>9} {'speedup':>8}  rate")
    for label, other, ours, theirs, rate in rows:
        speedup = theirs / ours if theirs == theirs else float("nan")
        theirs_ms = f"{theirs * 1e3:9.3f}" if theirs == theirs else f"{'-':>9}"
        print(f"{label:<44} {ours * 1e3:10.3f} {other:<11} {theirs_ms} {speedup:8.2f}  {rate}")


if __name__ == "__main__":
    main()
