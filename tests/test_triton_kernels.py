"""The Triton MicroAttention kernels against a float64 reference: random shapes, GQA
ratios, block sizes, split points, causal chunks over a history, queries that see
nothing, and the exact merge of partials. Without a GPU they run under Triton's
interpreter (CI); with one, on it (``pytest -m cuda`` runs them there too)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Without a GPU, under Triton's interpreter (conftest.py sets TRITON_INTERPRET).
triton_attention = pytest.importorskip("infinite_llm.kernels.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, table, kv_start, kv_len, q_pos, scale):
    """float64: query (b, i) over slots j < kv_len[b] with kv_start[b] + j <= q_pos[b, i]."""
    batch, num_q, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, num_q, heads, dim, dtype=torch.float64)
    lse = torch.full((batch, num_q, heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        n = int(kv_len[b])
        if n == 0:
            continue
        keys = k_cache[table[b]].reshape(-1, kv_heads, dim)[:n].double()
        values = v_cache[table[b]].reshape(-1, kv_heads, dim)[:n].double()
        positions = int(kv_start[b]) + torch.arange(n)
        for i in range(num_q):
            seen = positions <= int(q_pos[b, i])
            if not bool(seen.any()):
                continue
            for h in range(heads):
                s = keys[seen, h // group] @ q[b, i, h].double() * scale
                lse[b, i, h] = torch.logsumexp(s, 0)
                out[b, i, h] = torch.softmax(s, 0) @ values[seen, h // group]
    return out, lse


def case(seed, batch, num_q, kv_heads, group, dim, block_size, max_len, dtype):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    width = max(1, -(-max_len // block_size))
    num_blocks = batch * width + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width)
    kv_len = torch.randint(0, max_len + 1, (batch,), generator=g)
    kv_start = torch.randint(0, 50, (batch,), generator=g)
    # Queries somewhere around the history: some see all of it, some part, some none.
    q_pos = kv_start[:, None] + torch.randint(-3, max_len + 4, (batch, num_q), generator=g)
    q = torch.randn(batch, num_q, heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, table, kv_start, kv_len, q_pos


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), num_q=st.integers(1, 5), kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]), dim=st.sampled_from([8, 12, 16]),
    block_size=st.sampled_from([1, 4, 5, 16]), max_len=st.integers(0, 40),
    splits=st.integers(1, 4), tile_blocks=st.sampled_from([1, 2, 4]), use_dot=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_equals_float64(batch, num_q, kv_heads, group, dim, block_size,
                                        max_len, splits, tile_blocks, use_dot, seed):
    """Any shape, split, tile of blocks and product (tensor-core products with their
    rows padded to 16, or not): float64's answer."""
    q, k, v, table, start, length, pos = case(seed, batch, num_q, kv_heads, group, dim,
                                              block_size, max_len, torch.float32)
    scale = dim**-0.5
    out, lse = triton_attention.paged_attention(*on_device(q, k, v, table, start, length, pos),
                                                scale, num_splits=splits,
                                                tile_blocks=tile_blocks, use_dot=use_dot)
    want_out, want_lse = reference(q, k, v, table, start, length, pos, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("tile_blocks", [1, 4])
def test_decode_of_a_grouped_batch_equals_float64(block_size, splits, tile_blocks):
    """Decode: one query a sequence seeing its whole context, query heads of one KV head
    together, a tile of blocks a step, in float32 (tensor-core products too: rows padded
    to 16) and bfloat16 (its products only on a GPU: the interpreter's are wrong)."""
    cases = [(torch.float32, 1e-5, False), (torch.float32, 1e-5, True),
             (torch.bfloat16, 2e-2, DEVICE == "cuda")]
    for dtype, tol, use_dot in cases:
        q, k, v, table, _, length, _ = case(7, 4, 1, 2, 3, 16, block_size, 70, dtype)
        out, lse = triton_attention.paged_attention(
            *on_device(q, k, v, table), None, length.to(DEVICE), None, 0.25,
            num_splits=splits, tile_blocks=tile_blocks, use_dot=use_dot)
        pos = (length.clamp(min=1) - 1)[:, None]
        want_out, want_lse = reference(q, k, v, table, torch.zeros_like(length), length, pos,
                                       0.25)
        assert out.dtype == dtype
        torch.testing.assert_close(out.cpu().double(), want_out, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-4, atol=1e-4)


def test_a_prompt_chunk_is_causal_over_itself_after_its_history():
    """A chunk of 6 queries at positions 20..25 over slots holding positions 0..25 (the
    history and the chunk's own keys): query i sees positions 0..20 + i."""
    q, k, v, table, _, _, _ = case(3, 2, 6, 1, 4, 16, 4, 26, torch.float32)
    start = torch.zeros(2, dtype=torch.int64)
    length = torch.tensor([26, 26])
    pos = torch.arange(20, 26).expand(2, 6)
    out, lse = triton_attention.paged_attention(*on_device(q, k, v, table, start, length, pos),
                                                0.25, num_splits=2)
    want = reference(q, k, v, table, start, length, pos, 0.25)
    torch.testing.assert_close(out.cpu().double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want[1], rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_partials_over_owners_merge_exactly_to_the_whole(cut, seed):
    """DistAttention's use: two owners hold a sequence's blocks [0, cut) and [cut, 9);
    each attends over its own, the merge kernel gives the whole (empty partials too)."""
    q, k, v, table, _, _, _ = case(seed, 2, 1, 2, 2, 8, 4, 36, torch.float32)
    length = torch.tensor([36, 30])
    whole = triton_attention.paged_decode(*on_device(q, k, v, table, length), 0.3)
    first_len = torch.minimum(length, torch.tensor(cut * 4))
    first = triton_attention.paged_decode(
        *on_device(q, k, v, table[:, :max(cut, 1)], first_len), 0.3)
    rest = triton_attention.paged_decode(
        *on_device(q, k, v, table[:, cut:] if cut < 9 else table[:, :1], length - first_len),
        0.3)
    outs = torch.stack([first[0], rest[0]])
    lses = torch.stack([first[1], rest[1]])
    merged, lse = triton_attention.merge_partials(outs, lses)
    torch.testing.assert_close(merged.cpu(), whole[0].cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), whole[1].cpu(), rtol=1e-5, atol=1e-5)
    # An owner holding nothing of a sequence: -inf and zeros, the merge's identity.
    empty = triton_attention.paged_decode(*on_device(q, k, v, table, torch.zeros(2)), 0.3)
    assert bool((empty[1] == -math.inf).all()) and bool((empty[0] == 0).all())


def test_the_kernel_contract_matches_the_cpu_kernels():
    """Same (out, lse) as the CPU decode kernel on the same blocks."""
    from infinite_llm.kernels.cpu import cpu_kernels, paged_decode_attention

    if cpu_kernels() is None:
        pytest.skip("no CPU kernels here")
    q, k, v, table, _, length, _ = case(11, 3, 1, 2, 4, 64, 16, 100, torch.float32)
    ours = triton_attention.paged_decode(*on_device(q, k, v, table, length), 0.125,
                                         num_splits=2)
    cpu = paged_decode_attention(q, k, v, table, length, 0.125)
    torch.testing.assert_close(ours[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].cpu(), cpu[1], rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(0, 9), kv_heads=st.integers(1, 3), dim=st.sampled_from([8, 12, 16]),
       block_size=st.sampled_from([1, 4, 16]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_write_kv_puts_each_tokens_k_and_v_at_its_slot(tokens, kv_heads, dim, block_size,
                                                       dtype, seed):
    """k and v as the model hands them (views of the fused qkv rows, heads after the
    query's) into distinct random slots of a pool that is a view of a larger cache, both
    in one launch: exactly what ``index_copy_`` writes, and nothing else moves."""
    g = torch.Generator().manual_seed(seed)
    tokens = min(tokens, 4 * block_size)
    heads = 2 * kv_heads
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    whole_k = torch.randn(2, 7, block_size, kv_heads, dim, generator=g).to(dtype)
    whole_v = torch.randn(2, 7, block_size, kv_heads, dim, generator=g).to(dtype)
    slots = torch.randperm(4 * block_size, generator=g)[:tokens]
    want_k, want_v = whole_k.clone(), whole_v.clone()
    want_k[1, 2:6].view(-1, kv_heads, dim).index_copy_(0, slots, k)
    want_v[1, 2:6].view(-1, kv_heads, dim).index_copy_(0, slots, v)
    whole_k, whole_v, k, v, slots = on_device(whole_k, whole_v, k, v, slots)
    # The pool's layer 1 (blocks 2..5 of the cache): what KVCache.layer hands the kernel.
    triton_attention.write_kv(whole_k[1, 2:6], whole_v[1, 2:6], slots, k, v)
    assert torch.equal(whole_k.cpu(), want_k) and torch.equal(whole_v.cpu(), want_v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_llama_on_the_gpu_paths_kernels_gives_the_default_paths_outputs(
    tiny_llama_dir, monkeypatch, dtype
):
    """Every kernel a GPU step takes, together, on the CPU: attention (decodes, a chunk's
    history and its own keys, no CPU prefill kernel), the KV writes and the norms, rotary
    and activation in Triton, decode steps from the padded step a CUDA graph replays.
    Greedy tokens and log-probs equal the default path's, over pools joined as on one
    GPU, with a sequence spread over both of them."""
    from infinite_llm import SamplingParams
    from infinite_llm.attention import dist, micro, plan
    from infinite_llm.engine.decode_graphs import DecodeGraphs
    from infinite_llm.kernels import gpu, triton_elementwise
    from infinite_llm.model import llama

    from test_cluster import assert_all_pools_full, run_watching_owners, tiny_cluster
    from test_triton_elementwise import assert_same_outputs

    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (30, 5, 11)]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)

    def run():  # 2 instances of 8 blocks of 4 tokens: the 38 tokens of prompt 0 need both
        return tiny_cluster(tiny_llama_dir, 2, 8 if dtype == "float32" else 4,
                            max_lend_fraction=1.0, dtype=dtype, device="cpu")

    reference = run()
    want = reference.generate(prompts, params, use_tqdm=False)
    calls = {"attention": 0, "causal": 0, "write": 0, "elementwise": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    def elementwise(x):
        calls["elementwise"] += 1
        return triton_elementwise

    monkeypatch.setattr(micro, "paged_decode_attention", counted("attention", gpu.paged_decode))
    monkeypatch.setattr(plan, "prefill_attention_supported", lambda *args: False)  # as a GPU
    monkeypatch.setattr(dist, "causal_attention", counted("causal", gpu.causal_attention))
    monkeypatch.setattr(gpu, "triton_takes", lambda x: True)  # the KV write: CPU kernels
    # still take the elementwise passes first (kernels_for), llama's is patched below
    monkeypatch.setattr(gpu, "write_kv", counted("write", gpu.write_kv))
    monkeypatch.setattr(llama, "kernels_for", elementwise)
    llm = run()
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.pools, runner.scale, 4, capture=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    alone, most = run_watching_owners(llm.engine, prompts[:1], params)
    assert most == 2 and alone[0] == want[0].outputs[0].token_ids  # spread over both pools
    assert all(calls.values()) and runner.graphs.replays >= 7, (calls, runner.graphs.replays)
    assert_same_outputs(got, want, dtype)
    assert_all_pools_full(llm.engine)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), num_q=st.integers(1, 40), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 3]), block_size=st.sampled_from([4, 16]),
       seed=st.integers(0, 2**16))
def test_a_chunk_over_its_own_keys_is_causal(batch, num_q, kv_heads, group, block_size, seed):
    """``causal_attention`` (the GPU's for a prompt chunk's own keys): query i sees keys
    0..i, chunk lengths that fill no whole block included; float64's answer."""
    g = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * group, 16
    q = torch.randn(batch, num_q, heads, dim, generator=g)
    k = torch.randn(batch, num_q, kv_heads, dim, generator=g)
    v = torch.randn(batch, num_q, kv_heads, dim, generator=g)
    out, lse = triton_attention.causal_attention(*on_device(q, k, v), 0.3, block_size=block_size)
    keys = k.double().repeat_interleave(group, 2)
    values = v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), keys) * 0.3
    scores = scores.masked_fill(torch.ones(num_q, num_q, dtype=torch.bool).triu(1), -math.inf)
    want_lse = torch.logsumexp(scores, -1)
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), values)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), want_lse.transpose(1, 2), rtol=1e-5,
                               atol=1e-5)
