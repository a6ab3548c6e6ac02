"""How DistAttention reaches owners in other processes: at every layer, every instance
trades with every other in two all-to-alls.

    1. out: to each owner j, the new k, v of my tokens whose blocks j holds, and the
            queries of each of my batches that has blocks on j
       in:  the same from each debtor d, addressed to me
    2. I write the k, v I received into my pool, run MicroAttention for each debtor's
       queries over my blocks, and send back each (out, lse); I receive mine

Every instance derives every home's ``AttentionPlan`` from the same step plan, so each
side knows what it will receive and nothing waits on a message it did not plan for.
KV never moves; only queries (and new tokens' k, v) go out and partials come back. An
instance with no tokens of its own still takes part: it serves its blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.plan import AttentionBatch, AttentionPlan, Part

Exchange = Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]
Partial = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _remote_parts(plan: AttentionPlan, owner: int) -> list[tuple[int, AttentionBatch, Part]]:
    """(batch index, batch, part) of every part of ``plan`` on ``owner``, in send order."""
    return [(i, b, p) for i, b in enumerate(plan.batches) for p in b.parts if p.owner == owner]


class Exchanged:
    """The remote owners of instance ``rank`` in an SPMD step, reached through
    ``exchange`` (an all-to-all of flat float32 buffers, one per live instance in id
    order). ``plans``: every live home's share of the step."""

    def __init__(
        self,
        rank: int,
        pool: KVCache,
        plans: dict[int, AttentionPlan],
        exchange: Exchange,
        shapes: Shapes,
        scale: float,
    ) -> None:
        self.rank = rank
        self.pool = pool
        self.plans = plans
        self.exchange = exchange
        self.shapes = shapes
        self.scale = scale
        self.peers = sorted(plans)  # buffers go in rank order: the live ids, sorted
        self.position = {peer: n for n, peer in enumerate(self.peers)}
        # What each exchange carries is the same for every layer of the step: work it
        # out once. to_owner[j]: my parts on j, in send order; from_debtor[d]: d's on me.
        mine = plans[rank]
        self.to_owner = {j: _remote_parts(mine, j) for j in self.peers if j != rank}
        self.from_debtor = {d: _remote_parts(plans[d], rank) for d in self.peers if d != rank}
        self.inbound_sizes = [0 if d == rank else self._inbound(d) for d in self.peers]
        self.back_sizes = [
            0 if j == rank else sum(self._partial_size(b) for _, b, _ in self.to_owner[j])
            for j in self.peers
        ]

    def _query_size(self, batch: AttentionBatch) -> int:
        return batch.token_index.numel() * self.shapes.num_heads * self.shapes.head_dim

    def _partial_size(self, batch: AttentionBatch) -> int:
        s = self.shapes
        return batch.token_index.numel() * s.num_heads * (s.head_dim + 1)  # out + lse

    def _kv_width(self, tokens: int) -> int:
        return tokens * self.shapes.num_kv_heads * self.shapes.head_dim

    def _inbound(self, debtor: int) -> int:
        """Floats ``debtor`` sends me in the first exchange."""
        plan = self.plans[debtor]
        writes = plan.writes.to(self.rank)
        size = 2 * self._kv_width(writes.num_tokens) if writes else 0
        return size + sum(self._query_size(b) for _, b, _ in self.from_debtor[debtor])

    def trade(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, queries: list[torch.Tensor | None]
    ) -> dict[tuple[int, int], Partial]:
        mine, position = self.plans[self.rank], self.position
        send: list[list[torch.Tensor]] = [[] for _ in self.peers]
        for w in mine.writes.per_owner:
            if w.owner != self.rank:
                send[position[w.owner]] += [k[w.index], v[w.index]]
        for j, parts in self.to_owner.items():
            send[position[j]] += [queries[i] for i, _, _ in parts]
        inbound = self.exchange(
            [torch.cat([t.reshape(-1).float() for t in parts]) if parts else torch.empty(0)
             for parts in send],
            self.inbound_sizes,
        )
        back = self.exchange(
            [self._serve(layer, d, inbound[position[d]]) for d in self.peers], self.back_sizes
        )
        return self._unpack(back)

    def _serve(self, layer: int, debtor: int, buf: torch.Tensor) -> torch.Tensor:
        """Debtor's k, v into my pool, its queries over my blocks; the partials to send back."""
        if debtor == self.rank:
            return torch.empty(0)
        s, plan = self.shapes, self.plans[debtor]
        k_cache, v_cache = self.pool.layer(layer)
        offset = 0
        writes = plan.writes.to(self.rank)
        if writes is not None:
            n, width = writes.num_tokens, self._kv_width(writes.num_tokens)
            kk = buf[offset : offset + width].view(n, s.num_kv_heads, s.head_dim)
            vv = buf[offset + width : offset + 2 * width].view(n, s.num_kv_heads, s.head_dim)
            self.pool.write(layer, writes.slots, kk.to(k_cache.dtype), vv.to(k_cache.dtype))
            offset += 2 * width
        outs = []
        for _, b, part in self.from_debtor[debtor]:
            size = self._query_size(b)
            qb = buf[offset : offset + size].view(*b.token_index.shape, s.num_heads, s.head_dim)
            offset += size
            o, lse = micro_attention(qb.to(k_cache.dtype), k_cache, v_cache, part.run, self.scale)
            outs += [o.float().reshape(-1), lse.reshape(-1)]
        return torch.cat(outs) if outs else torch.empty(0)

    def _unpack(self, back: list[torch.Tensor]) -> dict[tuple[int, int], Partial]:
        """My remote partials, by (owner, batch index), from the buffers sent back."""
        s = self.shapes
        partials: dict[tuple[int, int], Partial] = {}
        for j, parts in self.to_owner.items():
            buf, offset = back[self.position[j]], 0
            for i, b, _ in parts:
                shape = (*b.token_index.shape, s.num_heads)
                count = b.token_index.numel() * s.num_heads
                o = buf[offset : offset + count * s.head_dim].view(*shape, s.head_dim)
                lse = buf[offset + count * s.head_dim : offset + count * (s.head_dim + 1)]
                offset += count * (s.head_dim + 1)
                partials[(j, i)] = (o, lse.view(shape))
        return partials
