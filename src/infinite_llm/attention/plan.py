"""DistAttention's step planning: what goes where, the same for every layer of a step,
worked out once per step as index tensors. Pure index work; the per-layer execution is
``dist.py``.

The runner describes each scheduled sequence once (``SeqSpan``) and this module turns
the spans into where each new token's k, v go (``KVWrites``) and a few batches, each
with one MicroAttention run per owner of its sequences' blocks (where the pools are views
of one cache, ``KVLayout.joined``, one run over each sequence's blocks wherever they
live, through their ids in that cache: owner ``JOINED``)::

    span: positions first_pos .. first_pos + n - 1, its block table (owner, ids)
    Decodes (n = 1)       parts: each owner's blocks, slots of positions <= first_pos
    Chunks (later prompt  parts: each owner's blocks, slots of positions <  first_pos
      chunks)             + causal attention over the chunk's own k, v (this step's)
    FreshPrompts          causal attention over their own k, v only (no history),
      (from token 0)      read straight from the flat rows by the prefill kernel

An owner's blocks of a sequence, in logical order, hold the positions below any limit
as a prefix of their slots, so one length per (sequence, owner) says what is visible.
No Python loop runs over sequences inside a layer.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from infinite_llm.attention.micro import KVRun, MaskedRun, PagedRun
from infinite_llm.attention.tables import KVTable
from infinite_llm.config import ModelConfig
from infinite_llm.kernels import gpu
from infinite_llm.kernels.cpu import paged_decode_supported, prefill_attention_supported


@dataclass(frozen=True)
class KVLayout:
    """What the step's runs need to know of the model and the caches."""

    block_size: int
    dtype: torch.dtype
    # Decodes go to a paged kernel (blocks read in place, no mask, no padding): the CPU's,
    # or on a GPU the Triton kernel, which also takes a prompt chunk's history.
    decode_kernel: bool = False
    # Prompts from token 0 go to the CPU prefill kernel (flat rows: no padding, no gather).
    prefill_kernel: bool = False
    # Where the caches and the step's tensors live; the step is described on the CPU and
    # moved here once, before the first layer.
    device: torch.device = torch.device("cpu")
    # Every owner's pool is a view of one cache (``KVCache.joined``), the pool JOINED:
    # a sequence's blocks wherever they live are one run over it, in logical order.
    joined: bool = False

    @staticmethod
    def for_model(
        config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> KVLayout:
        """The layout of this model's cache, with each kernel where it takes the shapes."""
        heads, head_dim = config.num_attention_heads, config.head_dim
        return KVLayout(
            block_size,
            dtype,
            decode_kernel=(paged_decode_supported(device, dtype, heads, head_dim, block_size)
                           or gpu.paged_attention_supported(device, dtype, head_dim)),
            prefill_kernel=prefill_attention_supported(device, dtype, head_dim),
            device=torch.device(device),
        )


T = TypeVar("T")

JOINED = -1  # the owner of a plan over joined pools: the whole cache


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


@dataclass(frozen=True)
class Part:
    """MicroAttention of a batch's queries over one owner's blocks."""

    owner: int
    run: KVRun


@dataclass(frozen=True)
class FreshPrompts:
    """Prompts from token 0, for the prefill kernel: no history, and the kernel reads and
    writes the flat rows, so nothing is gathered or padded."""

    rows: torch.Tensor  # (S, 2) first flat row and length of each prompt
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True)
class Chunks:
    """Prompt chunks padded to ``Q`` queries each: their history per owner, merged with
    causal attention over their own k, v."""

    token_index: torch.Tensor  # (B, Q) flat index of each query; padding repeats a real one
    keep: torch.Tensor | None  # (K,) which of the B*Q results are real; None: all of them
    parts: tuple[Part, ...]  # the history, per owner (none for prompts from token 0)


@dataclass(frozen=True)
class Decodes:
    """One new token per sequence, attending to every owner's blocks."""

    token_index: torch.Tensor  # (B, 1)
    keep: None
    parts: tuple[Part, ...]
    in_order: bool  # its tokens are flat rows 0 .. B-1, in order: no gather needed


AttentionBatch = FreshPrompts | Chunks | Decodes


def _pad(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int64)


def _block_ids(ids: array) -> torch.Tensor:
    """One sequence's block ids on one owner as an int64 tensor: a copy of the buffer,
    however many blocks the context holds."""
    if not ids:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(ids, dtype=torch.int64).clone()


def _run(rows: list[torch.Tensor], kv_len: torch.Tensor, layout: KVLayout, paged: bool) -> KVRun:
    """One run over each sequence's block ids (``rows``) and its first ``kv_len`` slots."""
    table = rows[0][None] if len(rows) == 1 else pad_sequence(rows, batch_first=True)
    if paged:
        return PagedRun(table, kv_len)
    return MaskedRun.prefix(table, kv_len, layout.block_size, layout.dtype)


def _parts(
    spans: list[SeqSpan], limits: list[int], layout: KVLayout, paged: bool
) -> tuple[Part, ...]:
    """One run per owner over every span's blocks there (none, for a span it holds none of);
    over joined pools, one run over each span's blocks in logical order (the positions
    below a limit are the first that many slots, as on one owner)."""
    if layout.joined:
        bs = layout.block_size
        rows = [_block_ids(s.table.joined[: -(-limit // bs)]) for s, limit in zip(spans, limits)]
        return (Part(JOINED, _run(rows, torch.tensor(limits), layout, paged)),)
    owned = [s.table.owned_below(limit, layout.block_size) for s, limit in zip(spans, limits)]
    parts = []
    for owner in sorted({o for per_span in owned for o in per_span}):
        tables = [per_span.get(owner, (array("q"), 0)) for per_span in owned]
        rows = [_block_ids(ids) for ids, _ in tables]
        kv_len = torch.tensor([n for _, n in tables])
        parts.append(Part(owner, _run(rows, kv_len, layout, paged)))
    return tuple(parts)


def build_batch(spans: list[SeqSpan], layout: KVLayout) -> Chunks | Decodes:
    width = max(s.num_tokens for s in spans)
    offsets = torch.arange(width)
    starts = torch.tensor([s.flat_start for s in spans])
    counts = torch.tensor([s.num_tokens for s in spans])
    real = offsets[None, :] < counts[:, None]
    # Padding queries repeat the sequence's first token: harmless work, results dropped.
    token_index = starts[:, None] + torch.where(real, offsets[None, :], 0)
    if width == 1:  # decodes: the new token's k, v are in the cache already
        parts = _parts(spans, [s.first_pos + 1 for s in spans], layout, layout.decode_kernel)
        in_order = spans[0].flat_start == 0 and all(
            a.flat_start + 1 == b.flat_start for a, b in zip(spans, spans[1:])
        )
        return Decodes(token_index, None, parts, in_order)
    keep = None if bool(real.all()) else real.reshape(-1).nonzero().squeeze(1)
    history = [s.first_pos for s in spans]
    # The CPU kernel holds a decode's query rows only; the GPU's takes any chunk.
    paged = layout.decode_kernel and layout.device.type == "cuda"
    parts = _parts(spans, history, layout, paged) if any(history) else ()
    return Chunks(token_index, keep, parts)


# Below this many decodes one padded batch is cheaper than several calls per layer.
_BUCKET_MIN_DECODES = 16


def build_batches(spans: list[SeqSpan], layout: KVLayout, move: bool = True
                  ) -> list[AttentionBatch]:
    """Decodes apart from prompt chunks (padding a decode to a chunk's length would
    multiply its work), prompts that start at token 0 apart from later chunks (they have
    no history to attend). With the prefill kernel, all such prompts are one unpadded
    batch; without it, they go by length. Without the paged decode kernel, many decodes
    are further split by context length in powers of two, since attention over gathered
    blocks costs what the padded contexts hold; the kernel reads only real tokens."""
    decodes = [s for s in spans if s.num_tokens == 1]
    fresh = [s for s in spans if s.num_tokens > 1 and s.first_pos == 0]
    later = [s for s in spans if s.num_tokens > 1 and s.first_pos > 0]
    batches: list[AttentionBatch] = []
    groups: list[list[SeqSpan]] = []
    if fresh and layout.prefill_kernel:
        rows = torch.tensor([[s.flat_start, s.num_tokens] for s in fresh], dtype=torch.int64)
        batches.append(FreshPrompts(rows))
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
            buckets.setdefault((span.table.num_blocks - 1).bit_length(), []).append(span)
        groups += buckets.values()
    else:
        groups.append(decodes)
    batches += [build_batch(group, layout) for group in groups if group]
    return on_device(batches, layout.device) if move else batches


@dataclass(frozen=True)
class OwnerWrites:
    """The flat tokens whose new k, v go to ``owner``'s pool, and their slots there."""

    owner: int
    index: torch.Tensor | slice  # rows of the step's k, v (slice(None): all of them)
    slots: torch.Tensor  # flat slot of each: block * block_size + offset

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()


@dataclass(frozen=True)
class KVWrites:
    """Where each layer's new k, v go: per owner, the flat tokens and their cache slots."""

    per_owner: tuple[OwnerWrites, ...]

    def to(self, owner: int) -> OwnerWrites | None:
        return next((w for w in self.per_owner if w.owner == owner), None)

    @staticmethod
    def build(
        spans: list[SeqSpan], positions: torch.Tensor, block_size: int,
        device: torch.device = torch.device("cpu"), joined: bool = False,
    ) -> KVWrites:
        """From the step's spans and CPU positions; the slots end up on ``device``.
        ``joined``: the slots are the joined cache's (owner ``JOINED``)."""
        if not spans:
            return KVWrites(())
        owners, blocks, firsts = [], [], []
        for span in spans:  # (owner, physical id) of the blocks this step writes into
            first = span.first_pos // block_size
            last = (span.first_pos + span.num_tokens - 1) // block_size
            if joined:
                span_blocks = list(span.table.joined[first : last + 1])
                span_owners = [JOINED] * len(span_blocks)
            else:
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
            writes = (OwnerWrites(distinct[0], slice(None), slots),)
        else:
            writes = tuple(
                OwnerWrites(o, index, slots.index_select(0, index))
                for o in distinct
                if (index := (owner == o).nonzero().squeeze(1)).numel()
            )
        return on_device(KVWrites(writes), device)


@dataclass(frozen=True)
class AttentionPlan:
    """One home's share of a step, as DistAttention executes it layer after layer."""

    writes: KVWrites
    batches: tuple[AttentionBatch, ...]

    @staticmethod
    def build(spans: list[SeqSpan], positions: torch.Tensor, layout: KVLayout,
              move: bool = True) -> AttentionPlan:
        """The plan for the layout's kernels, its tensors on the layout's device (with
        ``move``; else on the CPU, to be moved in one go: ``on_device``)."""
        device = layout.device if move else torch.device("cpu")
        return AttentionPlan(
            KVWrites.build(spans, positions, layout.block_size, device, layout.joined),
            tuple(build_batches(spans, layout, move)),
        )


NO_ATTENTION = AttentionPlan(KVWrites(()), ())  # a home with no tokens this step
