"""DistAttention across processes: each instance runs the layers of its own requests and,
at every layer, trades with every other instance in two all-to-alls.

    1. out: to each owner j, the new k, v of my tokens whose blocks j holds, and the
            queries of each of my batches that has blocks on j
       in:  the same from each debtor d, addressed to me
    2. I write the k, v I received into my pool, run MicroAttention for each debtor's
       queries over my blocks, and send back each (out, lse); I receive mine
    3. each batch merges its local partial, the remote ones and its own-chunk attention

The plan of every instance is derived from the same step plan on every instance, so
each side knows what it will receive and nothing waits on a message it did not plan for.
KV never moves; only queries (and new tokens' k, v) go out and partials come back. An
instance with no tokens of its own still takes part: it serves its blocks (``serve``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from infinite_llm.attention.dist import AttentionBatch, KVWrites, batch_queries, finish_batch
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.kv_cache import KVCache

Exchange = Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]


@dataclass(frozen=True)
class InstanceStep:
    """One instance's share of a step, as every instance derives it."""

    batches: list[AttentionBatch]
    writes: KVWrites


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int


class ExchangeAttention:
    """The ``attend`` of instance ``rank`` in an SPMD step (see the module docstring)."""

    def __init__(
        self,
        rank: int,
        kv_cache: KVCache,
        steps: dict[int, InstanceStep],
        exchange: Exchange,
        shapes: Shapes,
        scale: float,
    ) -> None:
        self.rank = rank
        self.kv_cache = kv_cache
        self.steps = steps
        self.exchange = exchange
        self.shapes = shapes
        self.scale = scale
        # Buffers are exchanged in rank order: the live instances' ids, sorted.
        self.peers = sorted(steps)
        self.position = {peer: i for i, peer in enumerate(self.peers)}
        # What each exchange carries is the same for every layer of the step: size it once.
        self.inbound_sizes = [self._inbound(d) for d in self.peers]
        mine = steps[rank]
        self.back_sizes = [
            0 if j == rank else
            sum(self._partial_size(b) for b in mine.batches for p in b.parts if p.owner == j)
            for j in self.peers
        ]

    # -- sizes, known on both sides -------------------------------------------------

    def _query_size(self, batch: AttentionBatch) -> int:
        s = self.shapes
        return batch.token_index.numel() * s.num_heads * s.head_dim

    def _write_tokens(self, step: InstanceStep, owner: int) -> int:
        for o, index, slots in step.writes.per_owner:
            if o == owner:
                return slots.numel()
        return 0

    def _inbound(self, debtor: int) -> int:
        """Floats debtor sends me in the first exchange."""
        step = self.steps[debtor]
        s = self.shapes
        size = 2 * self._write_tokens(step, self.rank) * s.num_kv_heads * s.head_dim
        for b in step.batches:
            size += sum(self._query_size(b) for p in b.parts if p.owner == self.rank)
        return size if debtor != self.rank else 0

    def _partial_size(self, batch: AttentionBatch) -> int:
        s = self.shapes
        return batch.token_index.numel() * s.num_heads * (s.head_dim + 1)  # out + lse

    # -- one layer ------------------------------------------------------------------

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mine = self.steps[self.rank]
        # 1. my writes to my pool, and what goes out to each owner
        send: list[list[torch.Tensor]] = [[] for _ in self.peers]
        for owner, index, slots in mine.writes.per_owner:
            kk, vv = (k, v) if index is None else (k[index], v[index])
            if owner == self.rank:
                self.kv_cache.write(layer, slots, kk, vv)
            else:
                send[self.position[owner]] += [kk, vv]
        queries = []
        for b in mine.batches:
            qb = batch_queries(b, q)
            queries.append(qb)
            for part in b.parts:
                if part.owner != self.rank:
                    send[self.position[part.owner]].append(qb)
        received = self._trade(layer, send, mine)
        # 3. merge per batch, then scatter back to the flat tokens
        out = torch.empty_like(q)
        for i, (b, qb) in enumerate(zip(mine.batches, queries)):
            partials = []
            for part in b.parts:
                if part.owner == self.rank:
                    k_cache, v_cache = self.kv_cache.layer(layer)
                    partials.append(micro_attention(qb, k_cache, v_cache, part.run, self.scale))
                else:
                    o, lse = received[(part.owner, i)]
                    partials.append((o.to(q.dtype), lse))
            finish_batch(b, partials, q, qb, k, v, self.scale, out)
        return out

    def serve(self, layer: int) -> None:
        """Take part in a layer's exchanges with no tokens of my own."""
        self._trade(layer, [[] for _ in self.peers], self.steps[self.rank])

    def _trade(
        self, layer: int, send: list[list[torch.Tensor]], mine: InstanceStep
    ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """Both exchanges of a layer; returns my remote partials by (owner, batch index)."""
        s = self.shapes
        inbound = self.exchange(
            [torch.cat([t.reshape(-1).float() for t in parts]) if parts else torch.empty(0)
             for parts in send],
            self.inbound_sizes,
        )
        # 2. serve each debtor: its k, v into my pool, its queries over my blocks
        replies: list[torch.Tensor] = []
        k_cache, v_cache = self.kv_cache.layer(layer)
        for d in self.peers:
            if d == self.rank:
                replies.append(torch.empty(0))
                continue
            step, buf, offset, outs = self.steps[d], inbound[self.position[d]], 0, []
            n = self._write_tokens(step, self.rank)
            if n:
                width = n * s.num_kv_heads * s.head_dim
                kk = buf[offset : offset + width].view(n, s.num_kv_heads, s.head_dim)
                vv = buf[offset + width : offset + 2 * width].view(n, s.num_kv_heads, s.head_dim)
                slots = next(sl for o, _, sl in step.writes.per_owner if o == self.rank)
                self.kv_cache.write(layer, slots, kk.to(k_cache.dtype), vv.to(k_cache.dtype))
                offset += 2 * width
            for b in step.batches:
                for part in b.parts:
                    if part.owner != self.rank:
                        continue
                    size = self._query_size(b)
                    qb = buf[offset : offset + size].view(*b.token_index.shape, s.num_heads, s.head_dim)
                    offset += size
                    o, lse = micro_attention(qb.to(k_cache.dtype), k_cache, v_cache, part.run, self.scale)
                    outs += [o.float().reshape(-1), lse.reshape(-1)]
            replies.append(torch.cat(outs) if outs else torch.empty(0))
        back = self.exchange(replies, self.back_sizes)
        partials: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        offsets = {j: 0 for j in self.peers}
        for i, b in enumerate(mine.batches):
            for part in b.parts:
                j = part.owner
                if j == self.rank:
                    continue
                shape = (*b.token_index.shape, s.num_heads)
                count = b.token_index.numel() * s.num_heads
                buf = back[self.position[j]]
                o = buf[offsets[j] : offsets[j] + count * s.head_dim].view(*shape, s.head_dim)
                lse = buf[offsets[j] + count * s.head_dim : offsets[j] + count * (s.head_dim + 1)]
                offsets[j] += count * (s.head_dim + 1)
                partials[(j, i)] = (o, lse.view(shape))
        return partials
