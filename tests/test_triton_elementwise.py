"""The Triton elementwise passes (RMSNorm with and without the residual add, SiLU-and-
multiply, rotary) against Hugging Face Llama's formulas and the CPU kernels' contract:
random shapes, float32 and bfloat16, strided rows, nothing to do; then a tiny Llama
whose every elementwise pass runs in Triton gives the CPU path's logits. Without a GPU
they run under Triton's interpreter (CI); with one, on it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Without a GPU, under Triton's interpreter (conftest.py sets TRITON_INTERPRET).
elementwise = pytest.importorskip("infinite_llm.kernels.triton_elementwise")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def hf_rms_norm(x, weight, eps):
    """Hugging Face's LlamaRMSNorm: float32 inside, rounded, then scaled in the dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# bfloat16's relative ulp is 2**-7. On a GPU, within two of them (a sum's order); under
# Triton's interpreter within four, since it rounds to bfloat16 toward zero where PyTorch
# rounds to nearest, and the residual add, the normalisation and the scaling each round
# (a hypothesis example once stacked them to 2.8 ulps).
BF16_RTOL = 1.6e-2 if DEVICE == "cuda" else 3.2e-2


def close(got, want):
    """float32 to float32's rounding; bfloat16 within ``BF16_RTOL``."""
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_RTOL, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(0, 5), size=st.sampled_from([1, 7, 64, 100, 576]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000))
def test_rms_norm_and_the_residual_add_before_it(rows, size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, size, generator=g) * 3).to(dtype).to(DEVICE)
    residual = torch.randn(rows, size, generator=g).to(dtype).to(DEVICE)
    weight = torch.rand(size, generator=g).add(0.5).to(dtype).to(DEVICE)
    close(elementwise.rms_norm(x, weight, 1e-5), hf_rms_norm(x, weight, 1e-5))
    # In place: residual += x (rounded as the model's add), then x = norm(residual).
    summed = residual + x
    x2, r2 = x.clone(), residual.clone()
    elementwise.add_rms_norm_(x2, r2, weight, 1e-5)
    close(r2, summed)
    close(x2, hf_rms_norm(summed, weight, 1e-5))


def test_rms_norm_takes_any_leading_shape_and_strided_rows():
    x = torch.randn(3, 4, 96, device=DEVICE)
    weight = torch.rand(96, device=DEVICE)
    close(elementwise.rms_norm(x, weight, 1e-6), hf_rms_norm(x, weight, 1e-6))
    wide = torch.randn(5, 200, device=DEVICE)[:, :96]  # rows 200 apart
    close(elementwise.rms_norm(wide, weight, 1e-6), hf_rms_norm(wide, weight, 1e-6))
    with pytest.raises(ValueError, match="weight"):
        elementwise.rms_norm(x, weight[:10], 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        elementwise.add_rms_norm_(wide, torch.randn(5, 96, device=DEVICE), weight, 1e-6)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(0, 5), size=st.sampled_from([1, 5, 64, 1536, 2100]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000))
def test_silu_and_mul(rows, size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * size, generator=g) * 4).to(dtype).to(DEVICE)
    gate, up = x.float().split(size, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).to(dtype)  # float32 inside, rounded once
    got = elementwise.silu_and_mul(x)
    assert got.shape == (rows, size) and got.dtype == dtype
    close(got, want)
    with pytest.raises(ValueError, match="even"):
        elementwise.silu_and_mul(x[:, :1] if size == 1 else torch.randn(2, 3, device=DEVICE))


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(0, 6), heads=st.integers(1, 4), extra=st.integers(0, 3),
       dim=st.sampled_from([2, 8, 64, 96]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 1000))
def test_rotary_turns_only_the_first_heads_in_place(tokens, heads, extra, dim, dtype, seed):
    """As the model calls it: q and k heads of the fused qkv rotate, v's stay."""
    from infinite_llm.model.rope import apply_rotary

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads + extra, dim, generator=g).to(dtype).to(DEVICE)
    angles = torch.rand(tokens, 1, dim // 2, generator=g) * 50
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    # The rotation in float32 from the dtype's cos and sin, rounded once (the CPU kernel's).
    want = apply_rotary(x[:, :heads].float(), cos.float(), sin.float()).to(dtype)
    got = x.clone()
    elementwise.rotary_(got, cos, sin, heads)
    close(got[:, :heads], want)
    assert torch.equal(got[:, heads:], x[:, heads:])


def test_rotary_refuses_what_it_cannot_turn():
    x = torch.randn(2, 3, 8, device=DEVICE)
    cos = sin = torch.ones(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        elementwise.rotary_(x, cos, sin, 4)
    with pytest.raises(ValueError, match="dtypes"):
        elementwise.rotary_(x, cos.double(), sin, 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_llama_with_every_elementwise_pass_in_triton_gives_the_same_logits(
    tiny_llama_dir, monkeypatch, dtype
):
    """The model's norms, rotary and MLP activation through the Triton kernels (what
    ``kernels_for`` picks on a GPU) against the default path, on one step of prompts and
    a decode step after it."""
    from infinite_llm import LLM, SamplingParams
    from infinite_llm.model import llama

    prompts = [[5, 9, 13, 2, 7, 11, 3], [4, 8, 15, 16, 23, 42]]
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=0, ignore_eos=True)

    def run():
        llm = LLM(str(tiny_llama_dir), dtype=dtype, device=DEVICE, kv_cache_memory="4MiB")
        return llm.generate(prompts, params, use_tqdm=False)

    want = run()
    used = []

    def triton_kernels(x):
        used.append(x.shape)
        return elementwise

    monkeypatch.setattr(llama, "kernels_for", triton_kernels)
    got = run()
    assert used  # every pass went through the Triton kernels
    assert_same_outputs(got, want, dtype)


def assert_same_outputs(got, want, dtype: str) -> None:
    """The same greedy tokens, and log-probs within what ``dtype`` allows. In bfloat16
    the runner-up tokens may swap places in a near tie (the interpreter rounds to
    bfloat16 toward zero, PyTorch to nearest); the chosen token's log-prob may not move."""
    tol = 5e-2 if dtype == "bfloat16" else 1e-4
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for token, x, y in zip(a.outputs[0].token_ids, a.outputs[0].logprobs,
                               b.outputs[0].logprobs):
            assert abs(x[token] - y[token]) < tol
            assert dtype == "bfloat16" or (x.keys() == y.keys()
                                           and all(abs(x[t] - y[t]) < tol for t in x))
