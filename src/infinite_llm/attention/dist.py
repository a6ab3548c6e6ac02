"""DistAttention for one step: every layer's ``attend`` call over KV spread on instances.

A request's KV lives in rBlocks, each on an owner instance (its home or a creditor).
Each layer, the new tokens' k, v are written into the block that owns their position;
then each query is sent to every owner of its request's blocks, each owner computes
MicroAttention over the blocks it holds, and the partial ``(out, lse)`` are merged.
KV never moves; only queries go out and partials come back.

What goes where is the same for every layer of a step, so the runner describes each
scheduled sequence once (``SeqSpan``) and this module turns the spans into a few
batches, each with one MicroAttention call per owner::

    span: positions first_pos .. first_pos + n - 1, rBlocks (owner, first_block, ids)
    decode (n = 1)       parts: each owner's blocks, slots of positions <= first_pos
    later prompt chunk   parts: each owner's blocks, slots of positions <  first_pos
                         + causal attention over the chunk's own k, v (this step's)
    fresh prompt chunk   causal attention over its own k, v only (no history)

An owner's blocks of a sequence, in logical order, hold the positions below any limit
as a prefix of their slots, so one length per (sequence, owner) says what is visible.
No Python loop runs over sequences inside a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TypeVar

import torch

from infinite_llm.attention.merge import merge
from infinite_llm.attention.micro import KVRun, causal_attention, micro_attention
from infinite_llm.config import ModelConfig
from infinite_llm.kernels.cpu import (
    paged_decode_attention_owners,
    paged_decode_supported,
    prefill_attention,
    prefill_attention_supported,
)
from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.tables import KVTable


@dataclass(frozen=True)
class KVLayout:
    """What the step's runs need to know of the model and the caches."""

    block_size: int
    dtype: torch.dtype
    # Decodes go to the paged CPU kernel (blocks read in place, no mask, no padding).
    decode_kernel: bool = False
    # Prompts from token 0 go to the CPU prefill kernel (flat rows: no padding, no gather).
    prefill_kernel: bool = False
    # Where the caches and the step's tensors live; the step is described on the CPU and
    # moved here once, before the first layer.
    device: torch.device = torch.device("cpu")

    @staticmethod
    def for_model(
        config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> KVLayout:
        """The layout of this model's cache, with each kernel where it takes the shapes."""
        heads, head_dim = config.num_attention_heads, config.head_dim
        return KVLayout(
            block_size,
            dtype,
            decode_kernel=paged_decode_supported(device, dtype, heads, head_dim, block_size),
            prefill_kernel=prefill_attention_supported(device, dtype, head_dim),
            device=torch.device(device),
        )


T = TypeVar("T")


def on_device(step: T, device: torch.device) -> T:
    """A step description (dataclasses, tuples and lists of them) with its tensors on
    ``device``: built on the CPU from Python lists, moved in one go per step."""
    if device.type == "cpu":
        return step
    if isinstance(step, torch.Tensor):
        return step.to(device, non_blocking=True)
    if isinstance(step, (tuple, list)):
        return type(step)(on_device(item, device) for item in step)
    if is_dataclass(step) and not isinstance(step, type):
        changed = {f.name: on_device(getattr(step, f.name), device) for f in fields(step)}
        return replace(step, **changed)
    return step


@dataclass(frozen=True)
class SeqSpan:
    """A sequence's tokens in this step: flat[flat_start : flat_start + num_tokens] sit at
    positions first_pos.. and attend to every earlier token, stored where ``table`` says."""

    flat_start: int
    num_tokens: int
    first_pos: int
    table: KVTable

    def owned_below(self, limit: int, block_size: int) -> dict[int, tuple[list[int], int]]:
        """owner -> (its physical blocks of this sequence in logical order, how many of
        their slots hold positions < limit)."""
        return self.table.owned_below(limit, block_size)


@dataclass(frozen=True)
class Part:
    """MicroAttention of a batch's queries over one owner's blocks."""

    owner: int
    run: KVRun


@dataclass(frozen=True)
class AttentionBatch:
    """Sequences attended together, padded to ``Q`` queries each."""

    token_index: torch.Tensor  # (B, Q) flat index of each query; padding repeats a real one
    keep: torch.Tensor | None  # (K,) which of the B*Q results are real; None: all of them
    parts: tuple[Part, ...]  # the history, per owner
    in_order: bool  # the batch is every flat token, in order: no gather or scatter needed
    own_chunk: bool  # also attend causally to the chunk's own k, v, from this step
    # Prompts from token 0, for the prefill kernel: (S, 2) first flat row and length of
    # each. They have no history, and the kernel reads and writes the flat rows, so
    # token_index is empty and nothing is padded.
    fresh: torch.Tensor | None = None


def _pad(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int64)


def _parts(spans: list[SeqSpan], limits: list[int], layout: KVLayout) -> tuple[Part, ...]:
    """One run per owner over every span's blocks there (none, for a span it holds none of)."""
    owned = [s.owned_below(limit, layout.block_size) for s, limit in zip(spans, limits)]
    parts = []
    for owner in sorted({o for per_span in owned for o in per_span}):
        tables = [per_span.get(owner, ([], 0)) for per_span in owned]
        table = _pad([ids for ids, _ in tables])
        kv_len = torch.tensor([n for _, n in tables])
        if layout.decode_kernel and all(s.num_tokens == 1 for s in spans):
            run = KVRun.lengths(table, kv_len)
        else:
            run = KVRun.prefix(table, kv_len, layout.block_size, layout.dtype)
        parts.append(Part(owner, run))
    return tuple(parts)


def build_batch(spans: list[SeqSpan], layout: KVLayout) -> AttentionBatch:
    width = max(s.num_tokens for s in spans)
    offsets = torch.arange(width)
    starts = torch.tensor([s.flat_start for s in spans])
    counts = torch.tensor([s.num_tokens for s in spans])
    real = offsets[None, :] < counts[:, None]
    # Padding queries repeat the sequence's first token: harmless work, results dropped.
    token_index = starts[:, None] + torch.where(real, offsets[None, :], 0)
    keep = None if bool(real.all()) else real.reshape(-1).nonzero().squeeze(1)
    in_order = _in_order(spans, keep)
    if width == 1:  # decodes: the new token's k, v are in the cache already
        parts = _parts(spans, [s.first_pos + 1 for s in spans], layout)
        return AttentionBatch(token_index, keep, parts, in_order, own_chunk=False)
    history = [s.first_pos for s in spans]
    parts = _parts(spans, history, layout) if any(history) else ()
    return AttentionBatch(token_index, keep, parts, in_order, own_chunk=True)


def _in_order(spans: list[SeqSpan], keep: torch.Tensor | None) -> bool:
    return keep is None and spans[0].flat_start == 0 and all(
        a.flat_start + a.num_tokens == b.flat_start for a, b in zip(spans, spans[1:])
    )


# Below this many decodes one padded batch is cheaper than several calls per layer.
_BUCKET_MIN_DECODES = 16


def build_batches(spans: list[SeqSpan], layout: KVLayout) -> list[AttentionBatch]:
    """Decodes apart from prompt chunks (padding a decode to a chunk's length would
    multiply its work), prompts that start at token 0 apart from later chunks (they have
    no history to attend). With the prefill kernel, all such prompts are one unpadded
    batch; without it, they go by length. Without the paged decode kernel, many decodes
    are further split by context length in powers of two, since attention over gathered
    blocks costs what the padded contexts hold; the kernel reads only real tokens."""
    decodes = [s for s in spans if s.num_tokens == 1]
    fresh = [s for s in spans if s.num_tokens > 1 and s.first_pos == 0]
    later = [s for s in spans if s.num_tokens > 1 and s.first_pos > 0]
    batches, groups = [], []
    if fresh and layout.prefill_kernel:
        rows = torch.tensor([[s.flat_start, s.num_tokens] for s in fresh], dtype=torch.int64)
        no_index = torch.zeros(0, 1, dtype=torch.int64)
        batches.append(AttentionBatch(no_index, None, (), False, own_chunk=True, fresh=rows))
    else:
        # Causal attention costs (prompts x longest^2) in a padded batch: prompts of
        # similar length go together (lengths within a factor sqrt(2)), so padding stays small.
        by_length: dict[int, list[SeqSpan]] = {}
        for span in fresh:
            by_length.setdefault(int(2 * math.log2(span.num_tokens)), []).append(span)
        groups += by_length.values()
    groups.append(later)
    if len(decodes) >= _BUCKET_MIN_DECODES and not layout.decode_kernel:
        buckets: dict[int, list[SeqSpan]] = {}
        for span in decodes:
            num_blocks = span.table.num_blocks
            buckets.setdefault((num_blocks - 1).bit_length(), []).append(span)
        groups += buckets.values()
    else:
        groups.append(decodes)
    batches += [build_batch(group, layout) for group in groups if group]
    return on_device(batches, layout.device)


@dataclass(frozen=True)
class KVWrites:
    """Where each layer's new k, v go: per owner, the flat tokens and their cache slots."""

    per_owner: tuple[tuple[int, torch.Tensor | None, torch.Tensor], ...]  # (owner, index, slots)

    @staticmethod
    def build(
        spans: list[SeqSpan], positions: torch.Tensor, block_size: int,
        device: torch.device = torch.device("cpu"),
    ) -> KVWrites:
        """From the step's spans and CPU positions; the slots end up on ``device``."""
        return on_device(KVWrites._build(spans, positions, block_size), device)

    @staticmethod
    def _build(spans: list[SeqSpan], positions: torch.Tensor, block_size: int) -> KVWrites:
        owners, blocks, firsts = [], [], []
        for span in spans:  # (owner, physical id) of the blocks this step writes into
            first = span.first_pos // block_size
            last = (span.first_pos + span.num_tokens - 1) // block_size
            span_owners, span_blocks = span.table.blocks(first, last + 1)
            owners.append(span_owners)
            blocks.append(span_blocks)
            firsts.append(first)
        counts = torch.tensor([s.num_tokens for s in spans])
        seq = torch.repeat_interleave(torch.arange(len(spans)), counts)  # (N,) span of each token
        logical = positions // block_size - torch.tensor(firsts)[seq]
        owner = _pad(owners)[seq, logical]
        slots = _pad(blocks)[seq, logical] * block_size + positions % block_size
        distinct = sorted({o for row in owners for o in row})
        if len(distinct) == 1:
            return KVWrites(((distinct[0], None, slots),))
        per_owner = []
        for o in distinct:
            index = (owner == o).nonzero().squeeze(1)
            if index.numel():
                per_owner.append((o, index, slots.index_select(0, index)))
        return KVWrites(tuple(per_owner))


def batch_queries(batch: AttentionBatch, q: torch.Tensor) -> torch.Tensor:
    """The batch's queries (B, Q, H, D) gathered from the flat ones (N, H, D)."""
    return q[batch.token_index.view(-1)].view(*batch.token_index.shape, *q.shape[1:])


def finish_batch(
    batch: AttentionBatch,
    partials: list[tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    qb: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Merge a batch's history partials with its own chunk's causal attention and write
    the real queries' rows into the flat ``out`` (N, H, D). Fresh prompts go from the
    flat q, k, v straight to ``out`` through the prefill kernel."""
    if batch.fresh is not None:
        prefill_attention(q, k, v, batch.fresh, scale, out)
        return
    index = batch.token_index.view(-1)
    if batch.own_chunk:
        kb = k[index].view(*batch.token_index.shape, *k.shape[1:])
        vb = v[index].view(*batch.token_index.shape, *v.shape[1:])
        partials = [*partials, causal_attention(qb, kb, vb, scale)]
    ob = partials[0][0] if len(partials) == 1 else merge(partials)[0]
    ob = ob.to(out.dtype).reshape(-1, *out.shape[1:])
    if batch.keep is not None:
        ob, index = ob.index_select(0, batch.keep), index.index_select(0, batch.keep)
    out.index_copy_(0, index, ob)


class DistAttention:
    """The ``attend`` of one step: writes each layer's new k, v to their owners, then
    merges every owner's MicroAttention (and the chunk's own causal attention)."""

    def __init__(
        self,
        kv_caches: dict[int, KVCache],
        writes: KVWrites,
        batches: list[AttentionBatch],
        scale: float,
    ) -> None:
        self.kv_caches = kv_caches
        self.writes = writes
        self.batches = batches
        self.scale = scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for owner, index, slots in self.writes.per_owner:
            if index is None:
                self.kv_caches[owner].write(layer, slots, k, v)
            else:
                self.kv_caches[owner].write(layer, slots, k[index], v[index])
        first = self.batches[0]
        if len(self.batches) == 1 and first.in_order and not first.own_chunk:
            # Decode-only steps: the flat tokens already are the batch.
            qb = q.reshape(*first.token_index.shape, *q.shape[1:])
            partials = self._history(layer, qb, first.parts)
            out = partials[0][0] if len(partials) == 1 else merge(partials)[0]
            return out.reshape(q.shape)
        out = torch.empty_like(q)
        for b in self.batches:
            qb = batch_queries(b, q)
            finish_batch(b, self._history(layer, qb, b.parts), q, qb, k, v, self.scale, out)
        return out

    def _history(
        self, layer: int, q: torch.Tensor, parts: tuple[Part, ...]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each owner's MicroAttention partial. Where every owner's run goes to the paged
        kernel, the owners' caches are all in this process: one kernel pass computes
        their partials and the merge together (its online softmax is the merge)."""
        if len(parts) > 1 and all(part.run.mask is None for part in parts):
            owners = [
                (*self.kv_caches[part.owner].layer(layer), part.run.block_table, part.run.kv_len)
                for part in parts
            ]
            return [paged_decode_attention_owners(q, owners, self.scale)]
        partials = []
        for part in parts:
            k_cache, v_cache = self.kv_caches[part.owner].layer(layer)
            partials.append(micro_attention(q, k_cache, v_cache, part.run, self.scale))
        return partials
