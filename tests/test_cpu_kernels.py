"""The CPU kernels equal float64 references, and they are built wherever they can be."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention.merge import merge
from infinite_llm.kernels.cpu import (
    _has_avx2_fma,
    cpu_kernels,
    linear_packed,
    pack_weight,
    paged_decode_attention,
    paged_decode_attention_owners,
)

pytestmark = pytest.mark.skipif(not _has_avx2_fma(), reason="the kernels need x86 AVX2 + FMA")


def test_kernels_build_on_this_machine():
    # A machine with AVX2 that silently fell back to PyTorch ops would hide a build break.
    assert cpu_kernels() is not None


def reference_attention(q, k_cache, v_cache, table, kv_len, scale):
    """float64 attention of every query of b over its first kv_len[b] slots."""
    batch, num_q, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.zeros(batch, num_q, heads, dim, dtype=torch.float64)
    lse = torch.full((batch, num_q, heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        n = int(kv_len[b])
        if n == 0:
            continue
        keys = k_cache[table[b]].reshape(-1, kv_heads, dim)[:n].double()
        values = v_cache[table[b]].reshape(-1, kv_heads, dim)[:n].double()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,thd->qht", q[b].double(), keys) * scale
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("qht,thd->qhd", torch.softmax(scores, dim=-1), values)
    return out, lse


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    num_q=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    dim=st.sampled_from([8, 16, 24, 40, 64]),
    block_size=st.sampled_from([1, 3, 16, 64]),
    max_len=st.integers(0, 90),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_paged_decode_attention_equals_dense(
    batch, num_q, kv_heads, group, dim, block_size, max_len, dtype, seed
):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    width = max(1, -(-max_len // block_size))
    num_blocks = batch * width + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width)
    kv_len = torch.randint(0, max_len + 1, (batch,), generator=g)
    q = torch.randn(batch, num_q, heads, dim, generator=g).to(dtype)
    scale = dim**-0.5
    out, lse = paged_decode_attention(q, k_cache, v_cache, table, kv_len, scale)
    want_out, want_lse = reference_attention(q, k_cache, v_cache, table, kv_len, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_partials_over_split_blocks_merge_to_the_whole():
    # DistAttention's use: each owner attends over its own blocks, the home merges.
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(12, 16, 3, 64, generator=g)
    v_cache = torch.randn(12, 16, 3, 64, generator=g)
    q = torch.randn(2, 1, 9, 64, generator=g)
    table = torch.tensor([[4, 7, 1, 9, 2], [0, 3, 5, 6, 8]])
    kv_len = torch.tensor([70, 33])
    whole = paged_decode_attention(q, k_cache, v_cache, table, kv_len, 0.125)
    first = paged_decode_attention(q, k_cache, v_cache, table[:, :2], torch.tensor([32, 32]), 0.125)
    rest = paged_decode_attention(q, k_cache, v_cache, table[:, 2:], kv_len - 32, 0.125)
    merged, lse = merge([first, rest])
    torch.testing.assert_close(merged, whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole[1], rtol=1e-5, atol=1e-6)
    # In one process the owners' partials and their merge are one pass over both pools.
    k2, v2 = k_cache.clone(), v_cache.clone()  # a second owner: its own pool tensors
    fused = paged_decode_attention_owners(
        q,
        [(k_cache, v_cache, table[:, :2], torch.tensor([32, 32])), (k2, v2, table[:, 2:], kv_len - 32)],
        0.125,
    )
    torch.testing.assert_close(fused[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], whole[1], rtol=1e-5, atol=1e-6)


def _vector_bits():
    """The tile widths this CPU runs: AVX2 always, AVX-512 where it has it."""
    from infinite_llm.kernels.cpu import has_avx512

    return [256, pytest.param(512, marks=pytest.mark.skipif(
        not has_avx512(), reason="this CPU has no AVX-512"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 100])
@pytest.mark.parametrize("in_features", [96, 100, 576])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vector_bits", _vector_bits())
def test_linear_packed_equals_float64(dtype, rows, in_features, bias, vector_bits):
    g = torch.Generator().manual_seed(rows * in_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    weight = (torch.randn(200, in_features, generator=g) * 0.1).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    packed = pack_weight(weight)
    assert packed.shape == (13, in_features, 16) and packed.dtype == dtype  # 200 -> 13 panels
    y = linear_packed(x, packed, b, 200, vector_bits)
    assert y.dtype == dtype and y.shape == (rows, 200)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    else:  # one rounding to bfloat16 of a float32 sum
        torch.testing.assert_close(y.double(), exact.to(dtype).double(), rtol=8e-3, atol=1e-2)


def test_linear_packed_refuses_a_weight_of_another_shape():
    packed = pack_weight(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        linear_packed(torch.randn(2, 48), packed, None, 32)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        linear_packed(torch.randn(2, 64), packed, None, 64)
    with pytest.raises(RuntimeError, match="vector_bits is 0"):
        linear_packed(torch.randn(2, 64), packed, None, 32, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_avx512_tiles_equal_the_avx2_tiles_bit_for_bit(dtype):
    """Every output is the same sum in the same order whatever the tile width, so a model
    gives the same tokens and logits on a CPU with AVX-512 as on one without; at every row
    count of a tile (1-12 and past it), ragged widths, with and without bias."""
    from infinite_llm.kernels.cpu import has_avx512, linear_silu, pack_gate_up

    if not has_avx512():
        pytest.skip("this CPU has no AVX-512")
    g = torch.Generator().manual_seed(7)
    for out_features, in_features in [(200, 96), (40, 576), (16, 33)]:
        weight = torch.randn(out_features, in_features, generator=g).to(dtype)
        bias = torch.randn(out_features, generator=g)
        packed, gated = pack_weight(weight), pack_gate_up(weight, out_features // 2)
        for rows in [*range(1, 26), 100]:
            x = torch.randn(rows, in_features, generator=g).to(dtype)
            for b in (None, bias):
                assert torch.equal(linear_packed(x, packed, b, out_features, 256),
                                   linear_packed(x, packed, b, out_features, 512))
            assert torch.equal(linear_silu(x, gated, out_features // 2, 256),
                               linear_silu(x, gated, out_features // 2, 512))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 13, 100])
@pytest.mark.parametrize("intermediate", [160, 20])
@pytest.mark.parametrize("vector_bits", _vector_bits())
def test_linear_silu_equals_the_product_then_silu_and_mul(dtype, rows, intermediate, vector_bits):
    """The gated product (gate and up panels interleaved, SiLU-and-multiply in registers)
    gives bitwise what linear_packed then silu_and_mul give, and silu(gate) * up."""
    from infinite_llm.kernels.cpu import linear_silu, pack_gate_up, silu_and_mul

    g = torch.Generator().manual_seed(rows + intermediate)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    weight = (torch.randn(2 * intermediate, 96, generator=g) * 0.2).to(dtype)
    packed = pack_gate_up(weight, intermediate)
    panels = -(-intermediate // 16)
    assert packed.shape == (2 * panels, 96, 16)
    got = linear_silu(x, packed, intermediate, vector_bits)
    assert got.dtype == dtype and got.shape == (rows, intermediate)
    two_steps = silu_and_mul(
        linear_packed(x, pack_weight(weight), None, 2 * intermediate, vector_bits))
    if intermediate % 8 == 0:  # (a ragged tail takes libm's exp in silu_and_mul)
        assert torch.equal(got, two_steps)
    gate, up = (x.double() @ weight.double().T).chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        linear_silu(x, packed, intermediate + 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 96), (3, 5, 100)])
def test_rms_norm_equals_the_hugging_face_formula(dtype, shape):
    from infinite_llm.kernels.cpu import rms_norm

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    expected = weight * normed
    got = rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 96), (3, 5, 100)])
def test_add_rms_norm_is_the_add_then_the_norm_bitwise(dtype, shape):
    from infinite_llm.kernels.cpu import add_rms_norm_, rms_norm

    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    residual = torch.randn(*shape, generator=g).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    added = residual + x  # the model's add, in its dtype
    expected = rms_norm(added, weight, 1e-5)
    add_rms_norm_(x, residual, weight, 1e-5)
    assert torch.equal(residual, added) and torch.equal(x, expected)
    with pytest.raises(RuntimeError, match="one shape"):
        add_rms_norm_(x, residual[..., :-1].contiguous(), weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3072), (9, 2 * 160), (2, 3, 2 * 13)])
def test_silu_and_mul_equals_silu_times_up(dtype, shape):
    from infinite_llm.kernels.cpu import silu_and_mul

    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 4).to(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = silu_and_mul(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_equals_apply_rotary_and_leaves_v_alone(dtype):
    from infinite_llm.kernels.cpu import rotary_
    from infinite_llm.model.rope import apply_rotary

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 6 + 2 * 2, 16, generator=g).to(dtype)
    angles = torch.randn(5, 1, 16, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = apply_rotary(qkv[:, :8].double(), cos.double(), sin.double())
    v_before = qkv[:, 8:].clone()
    rotary_(qkv, cos, sin, 8)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(qkv[:, :8].double(), expected, rtol=tol, atol=tol)
    assert torch.equal(qkv[:, 8:], v_before)


def reference_causal(q, k, v, scale):
    """float64 causal attention of one sequence: q (L, H, D), k, v (L, KVH, D)."""
    length, heads, _ = q.shape
    group = heads // k.shape[1]
    qq = q.double().transpose(0, 1)
    kk = k.double().repeat_interleave(group, 1).transpose(0, 1)
    vv = v.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = qq @ kk.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
    out = torch.softmax(scores, -1) @ vv
    return out.transpose(0, 1), torch.logsumexp(scores, -1).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (6, 2, 16), (8, 1, 128), (2, 2, 48)])
def test_prefill_attention_equals_float64(dtype, heads, kv_heads, head_dim):
    from infinite_llm.kernels.cpu import prefill_attention

    # Lengths around the 32-token task and 64-key block edges, in one call, from the
    # strided views of a fused qkv as the model passes them.
    lengths = [1, 5, 31, 32, 33, 64, 65, 130]
    g = torch.Generator().manual_seed(heads * head_dim)
    qkv = torch.randn(sum(lengths) + 3, heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    starts = [3 + sum(lengths[:i]) for i in range(len(lengths))]  # rows 0-2 belong to no one
    seqs = torch.tensor([[s, n] for s, n in zip(starts, lengths)])
    out = torch.full((qkv.shape[0], heads, head_dim), 7.0, dtype=dtype)
    lse = torch.full((qkv.shape[0], heads), 7.0)
    scale = head_dim**-0.5
    prefill_attention(q, k, v, seqs, scale, out, lse)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for s, n in zip(starts, lengths):
        ref_out, ref_lse = reference_causal(q[s : s + n], k[s : s + n], v[s : s + n], scale)
        torch.testing.assert_close(out[s : s + n].double(), ref_out, rtol=tol, atol=tol)
        torch.testing.assert_close(lse[s : s + n].double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert (out[:3] == 7.0).all() and (lse[:3] == 7.0).all()  # rows of no sequence untouched


def test_prefill_attention_refuses_bad_sequences():
    from infinite_llm.kernels.cpu import prefill_attention

    q = torch.randn(10, 4, 32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="runs past the rows"):
        prefill_attention(q, q, q, torch.tensor([[4, 7]]), 0.1, out)
    with pytest.raises(RuntimeError, match="head_dim"):
        x = torch.randn(10, 4, 24)
        prefill_attention(x, x, x, torch.tensor([[0, 10]]), 0.1, torch.empty_like(x))


def test_a_kernel_lets_other_python_threads_run_while_it_computes():
    """The kernels release the GIL: a server's event loop keeps answering while a step's
    matrix products run (each one held every other thread before)."""
    import threading
    import time

    x = torch.randn(2048, 1024)
    packed = pack_weight(torch.randn(4096, 1024))
    linear_packed(x, packed, None, 4096)  # warm
    seen: list[float] = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            seen.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.01)
    start = time.perf_counter()
    linear_packed(x, packed, None, 4096)
    end = time.perf_counter()
    done.set()
    counter.join()
    assert end - start > 0.02, "too fast to tell on this machine"
    # The middle half of the call (a thread that held the GIL through it hands it over
    # only after it returns, and then only at the switch interval).
    quarter = (end - start) / 4
    inside = [t for t in seen if start + quarter < t < end - quarter]
    assert len(inside) > 100, (len(inside), end - start)
