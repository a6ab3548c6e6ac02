"""MicroAttention and merge equal dense softmax attention computed in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention.merge import merge
from infinite_llm.attention.micro import MaskedRun, causal_attention, micro_attention


def dense_reference(q, keys, values, q_pos, key_pos):
    """Causal softmax attention in float64. q (Q, H, D); keys, values (T, KVH, D)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(heads // kv_heads, dim=1)
    v = values.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,thd->hqt", q.double(), k) / math.sqrt(q.shape[-1])
    visible = key_pos[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible[None], -math.inf)
    return torch.einsum("hqt,thd->qhd", torch.softmax(scores, dim=-1), v)


def make_run(table, kv_start, kv_len, q_pos, block_size, heads, kv_heads):
    return MaskedRun.build(
        table, torch.tensor(kv_start), torch.tensor(kv_len), q_pos,
        block_size, heads, kv_heads, torch.float32,
    )


def scatter_into_blocks(keys, values, block_size, generator):
    """Store a sequence's K/V in randomly chosen physical blocks of a fresh pool."""
    tokens, kv_heads, dim = keys.shape
    used = -(-tokens // block_size)
    num_blocks = used + 5
    block_ids = torch.randperm(num_blocks, generator=generator)[:used]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    for t in range(tokens):
        k_cache[block_ids[t // block_size], t % block_size] = keys[t]
        v_cache[block_ids[t // block_size], t % block_size] = values[t]
    return k_cache, v_cache, block_ids


shapes = st.fixed_dictionaries(
    {
        "kv_heads": st.integers(1, 3),
        "group": st.sampled_from([1, 2, 3, 4]),
        "dim": st.sampled_from([4, 8, 16]),
        "block_size": st.sampled_from([1, 2, 4, 16]),
        "context": st.integers(1, 70),
        "num_q": st.integers(1, 9),
        "splits": st.lists(st.floats(0, 1), max_size=4),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=120, deadline=None)
@given(shapes)
def test_split_micro_attentions_merge_to_dense_attention(s):
    """Keys split at random points into runs (some empty), each a MicroAttention over its
    own blocks; the merge equals dense attention, for prefill chunks and decode."""
    g = torch.Generator().manual_seed(s["seed"])
    heads = s["kv_heads"] * s["group"]
    context, num_q = s["context"], min(s["num_q"], s["context"])
    keys = torch.randn(context, s["kv_heads"], s["dim"], generator=g)
    values = torch.randn(context, s["kv_heads"], s["dim"], generator=g)
    q = torch.randn(num_q, heads, s["dim"], generator=g)
    q_pos = torch.arange(context - num_q, context)  # the last num_q tokens are the queries

    cuts = sorted({0, context, *(int(f * context) for f in s["splits"])})
    if s["splits"]:
        cuts.insert(1, cuts[0])  # an empty run: its partial must be the merge's identity
    parts = []
    for start, end in zip(cuts, cuts[1:]):
        k_cache, v_cache, block_ids = scatter_into_blocks(
            keys[start:end], values[start:end], s["block_size"], g
        )
        table = torch.zeros(1, max(1, len(block_ids)), dtype=torch.int64)
        table[0, : len(block_ids)] = block_ids
        run = make_run(table, [start], [end - start], q_pos[None], s["block_size"], heads, s["kv_heads"])
        out, lse = micro_attention(q[None], k_cache, v_cache, run, s["dim"] ** -0.5)
        parts.append((out[0], lse[0]))
    out, lse = merge(parts)
    expected = dense_reference(q, keys, values, q_pos, torch.arange(context))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lse).all()


def test_batch_of_sequences_with_padding_equals_each_alone():
    """One call over sequences of different lengths and query counts equals per-sequence calls."""
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, dim, block_size = 2, 6, 8, 4
    k_cache = torch.randn(40, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(40, block_size, kv_heads, dim, generator=g)
    tables = [[3, 7, 1], [9], [12, 13, 14, 15, 30]]
    contexts = [11, 2, 19]
    num_q = [3, 1, 5]
    width = max(num_q)
    q = torch.randn(3, width, heads, dim, generator=g)
    table = torch.tensor([t + [0] * (5 - len(t)) for t in tables])
    q_pos = torch.tensor([[c - n + i for i in range(width)] for c, n in zip(contexts, num_q)])
    run = make_run(table, [0, 0, 0], contexts, q_pos, block_size, heads, kv_heads)
    out, lse = micro_attention(q, k_cache, v_cache, run, dim**-0.5)
    for b in range(3):
        ids = torch.tensor(tables[b])
        keys = k_cache[ids].reshape(-1, kv_heads, dim)[: contexts[b]]
        values = v_cache[ids].reshape(-1, kv_heads, dim)[: contexts[b]]
        n = num_q[b]
        expected = dense_reference(q[b, :n], keys, values, q_pos[b, :n], torch.arange(contexts[b]))
        torch.testing.assert_close(out[b, :n].double(), expected, rtol=1e-5, atol=1e-5)


def test_query_that_sees_nothing_is_the_merge_identity():
    k_cache = torch.randn(2, 4, 1, 8)
    run = make_run(torch.tensor([[0]]), [10], [4], torch.tensor([[5]]), 4, 2, 1)
    out, lse = micro_attention(torch.randn(1, 1, 2, 8), k_cache, k_cache, run, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    other = (torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2))
    merged_out, merged_lse = merge([(out, lse), other])
    torch.testing.assert_close(merged_out, other[0])
    torch.testing.assert_close(merged_lse, other[1])


def test_merge_of_only_empty_partials_is_zero_not_nan():
    empty = (torch.zeros(3, 2, 4), torch.full((3, 2), -math.inf))
    out, lse = merge([empty, empty])
    assert torch.equal(out, torch.zeros(3, 2, 4))
    assert torch.isneginf(lse).all()


def test_merge_needs_a_partial():
    with pytest.raises(ValueError):
        merge([])


def test_causal_attention_over_padded_prompts_equals_dense_attention():
    """Fresh prompts of different lengths padded into one batch (padding repeats the first
    token): every real query equals dense causal attention over its own prompt."""
    g = torch.Generator().manual_seed(1)
    kv_heads, heads, dim = 3, 9, 8
    lengths = [10, 3, 18]
    keys = torch.randn(3, 18, kv_heads, dim, generator=g)
    values = torch.randn(3, 18, kv_heads, dim, generator=g)
    q = torch.randn(3, 18, heads, dim, generator=g)
    for b, n in enumerate(lengths):
        keys[b, n:], values[b, n:], q[b, n:] = keys[b, 0], values[b, 0], q[b, 0]
    out, lse = causal_attention(q, keys, values, dim**-0.5)
    for b, n in enumerate(lengths):
        expected = dense_reference(q[b, :n], keys[b, :n], values[b, :n], torch.arange(n), torch.arange(n))
        torch.testing.assert_close(out[b, :n].double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(lse[b, :n]).all()


def test_prefix_run_with_an_empty_sequence_is_the_merge_identity():
    """An owner holding none of a sequence's blocks: out 0, lse -inf for that sequence."""
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(6, 4, 1, 8, generator=g)
    v_cache = torch.randn(6, 4, 1, 8, generator=g)
    run = MaskedRun.prefix(torch.tensor([[1, 2], [0, 0]]), torch.tensor([6, 0]), 4, torch.float32)
    out, lse = micro_attention(torch.randn(2, 3, 2, 8, generator=g), k_cache, v_cache, run, 1.0)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
