"""One step's attention over one instance's paged KV cache: the model's ``attend`` call.

The runner describes each scheduled sequence once per step (``SeqSpan``); this module
turns the spans into at most two padded batches (decodes, whose one query needs no
padding, and prefill chunks) so that every layer makes one MicroAttention call per
batch and no Python loop runs over sequences inside a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinite_llm.attention.merge import merge
from infinite_llm.attention.micro import KVRun, causal_attention, micro_attention
from infinite_llm.memory.kv_cache import KVCache


@dataclass(frozen=True)
class KVLayout:
    """What the step's masks need to know of the model and the cache."""

    block_size: int
    num_heads: int
    num_kv_heads: int
    dtype: torch.dtype


@dataclass(frozen=True)
class SeqSpan:
    """A sequence's tokens in this step: flat[flat_start : flat_start + num_tokens] sit at
    positions first_pos.. and attend to every earlier token, stored in ``block_ids``."""

    flat_start: int
    num_tokens: int
    first_pos: int
    block_ids: list[int]


@dataclass(frozen=True)
class AttentionBatch:
    """Sequences attended in one MicroAttention call, padded to ``Q`` queries each."""

    token_index: torch.Tensor  # (B, Q) flat index of each query; padding repeats a real one
    keep: torch.Tensor | None  # (K,) which of the B*Q results are real; None: all of them
    run: KVRun
    in_order: bool  # the batch is every flat token, in order: no gather or scatter needed
    # The run holds only the history before each chunk; the chunk's own keys are
    # attended causally from this step's k, v and merged in.
    own_chunk: bool = False


def _pad(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int64)


def build_batch(spans: list[SeqSpan], layout: KVLayout) -> AttentionBatch:
    width = max(s.num_tokens for s in spans)
    offsets = torch.arange(width)
    starts = torch.tensor([s.flat_start for s in spans])
    counts = torch.tensor([s.num_tokens for s in spans])
    first = torch.tensor([s.first_pos for s in spans])
    real = offsets[None, :] < counts[:, None]
    # Padding queries repeat the sequence's first token: harmless work, results dropped.
    token_index = starts[:, None] + torch.where(real, offsets[None, :], 0)
    keep = None if bool(real.all()) else real.reshape(-1).nonzero().squeeze(1)
    table = _pad([s.block_ids for s in spans])
    in_order = _in_order(spans, keep)
    if width > 1 and all(s.first_pos == 0 for s in spans):
        return AttentionBatch(token_index, keep, KVRun.causal(table), in_order)
    if width > 1 and all(s.first_pos > 0 for s in spans):
        # A (chunk x context) mask would grow with both; history + own chunk needs none.
        run = KVRun.prefix(table, first, layout.block_size, layout.dtype)
        return AttentionBatch(token_index, keep, run, in_order, own_chunk=True)
    run = KVRun.build(
        block_table=table,
        kv_start=torch.zeros(len(spans), dtype=torch.int64),
        kv_len=first + counts,
        q_pos=first[:, None] + offsets[None, :],
        block_size=layout.block_size,
        num_heads=layout.num_heads,
        num_kv_heads=layout.num_kv_heads,
        dtype=layout.dtype,
    )
    return AttentionBatch(token_index, keep, run, in_order)


def _in_order(spans: list[SeqSpan], keep: torch.Tensor | None) -> bool:
    return keep is None and spans[0].flat_start == 0 and all(
        a.flat_start + a.num_tokens == b.flat_start for a, b in zip(spans, spans[1:])
    )


def slot_mapping(spans: list[SeqSpan], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of every flat token: its block's id * block_size + its offset in the block."""
    counts = torch.tensor([s.num_tokens for s in spans])
    seq = torch.repeat_interleave(torch.arange(len(spans)), counts)  # (N,) span of each token
    table = _pad([s.block_ids for s in spans])
    return table[seq, positions // block_size] * block_size + positions % block_size


# Below this many decodes one padded batch is cheaper than several calls per layer.
_BUCKET_MIN_DECODES = 16


def build_batches(spans: list[SeqSpan], layout: KVLayout) -> list[AttentionBatch]:
    """Decodes apart from prompt chunks (padding a decode to a chunk's length would
    multiply its work), prompts that start at token 0 apart from later chunks (plain
    causal attention needs no mask). Many decodes are further split by context length
    in powers of two, since decode attention costs what the padded contexts hold."""
    decodes = [s for s in spans if s.num_tokens == 1]
    fresh = [s for s in spans if s.num_tokens > 1 and s.first_pos == 0]
    later = [s for s in spans if s.num_tokens > 1 and s.first_pos > 0]
    groups = [fresh, later]
    if len(decodes) >= _BUCKET_MIN_DECODES:
        buckets: dict[int, list[SeqSpan]] = {}
        for span in decodes:
            buckets.setdefault((len(span.block_ids) - 1).bit_length(), []).append(span)
        groups += buckets.values()
    else:
        groups.append(decodes)
    return [build_batch(group, layout) for group in groups if group]


class PagedAttention:
    """Writes each layer's new k, v into the cache, then attends over the blocks."""

    def __init__(
        self, kv_cache: KVCache, slots: torch.Tensor, batches: list[AttentionBatch], scale: float
    ) -> None:
        self.kv_cache = kv_cache
        self.slots = slots
        self.batches = batches
        self.scale = scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.kv_cache.write(layer, self.slots, k, v)
        k_cache, v_cache = self.kv_cache.layer(layer)
        if len(self.batches) == 1 and self.batches[0].in_order and not self.batches[0].own_chunk:
            # Decode-only steps: the flat tokens already are the batch.
            b = self.batches[0]
            qb = q.reshape(*b.token_index.shape, *q.shape[1:])
            out, _ = micro_attention(qb, k_cache, v_cache, b.run, self.scale)
            return out.reshape(q.shape)
        out = torch.empty_like(q)
        for b in self.batches:
            index = b.token_index.view(-1)
            qb = q[index].view(*b.token_index.shape, *q.shape[1:])
            ob, lse = micro_attention(qb, k_cache, v_cache, b.run, self.scale)
            if b.own_chunk:
                kb = k[index].view(*b.token_index.shape, *k.shape[1:])
                vb = v[index].view(*b.token_index.shape, *v.shape[1:])
                ob, _ = merge([(ob, lse), causal_attention(qb, kb, vb, self.scale)])
            ob = ob.reshape(-1, *q.shape[1:])
            if b.keep is not None:
                ob, index = ob.index_select(0, b.keep), index.index_select(0, b.keep)
            out.index_copy_(0, index, ob)
        return out
