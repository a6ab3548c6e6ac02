"""DistAttention for one step: every layer's ``attend`` call over KV spread on instances.

A request's KV lives in rBlocks, each on an owner instance (its home or a creditor).
Each layer, the new tokens' k, v are written into the block that owns their position;
then each batch of queries gets one MicroAttention partial ``(out, lse)`` per owner of
its blocks, and the partials are merged (with the chunk's own causal attention for
prompt chunks). KV never moves; only queries go out and partials come back.

One path serves every backend. Owners whose pool is in this process (``pools``) are
attended here; where every instance is in this process their pools are views of one
cache (``KVCache.joined``), one owner (``plan.JOINED``) whose run reads each sequence's
blocks through one table wherever they live: a spread sequence costs what a local one
does, one launch. Other owners are reached through ``remote``: nobody in one process
(``InProcess``), an all-to-all among the instance processes on Ray
(``exchange.Exchanged``). What goes where was planned once for the
step (``plan.AttentionPlan``); this is the per-layer execution.
"""

from __future__ import annotations

from typing import Protocol

import torch

from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.merge import merge
from infinite_llm.attention.micro import causal_attention, micro_attention
from infinite_llm.attention.plan import (
    AttentionBatch,
    AttentionPlan,
    Chunks,
    Decodes,
    FreshPrompts,
    Part,
)
from infinite_llm.kernels.cpu import prefill_attention

Partial = tuple[torch.Tensor, torch.Tensor]  # (out, lse)


class Remote(Protocol):
    """How a layer reaches the owners whose pools are elsewhere."""

    def trade(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, queries: list[torch.Tensor | None]
    ) -> dict[tuple[int, int], Partial]:
        """Send the new k, v and the ``queries`` (one per batch of the plan) bound for
        remote owners, serve what others send here; the remote partials, by (owner,
        batch index)."""
        ...


class InProcess:
    """Every owner's pool is in this process: nothing is remote."""

    def trade(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, queries: list[torch.Tensor | None]
    ) -> dict[tuple[int, int], Partial]:
        return {}


IN_PROCESS = InProcess()


def batch_queries(batch: AttentionBatch, q: torch.Tensor) -> torch.Tensor | None:
    """A padded batch's queries (B, Q, H, D) from the flat ones (N, H, D); None for
    fresh prompts, which the prefill kernel reads from the flat rows."""
    if isinstance(batch, FreshPrompts):
        return None
    if isinstance(batch, Decodes) and batch.in_order:  # flat rows 0 .. B-1: a view
        return q[: batch.token_index.shape[0]].unsqueeze(1)
    return q[batch.token_index.view(-1)].view(*batch.token_index.shape, *q.shape[1:])


def _scatter(batch: Chunks | Decodes, ob: torch.Tensor, out: torch.Tensor) -> None:
    """The real queries' rows of a padded batch's result into the flat ``out`` (N, H, D)."""
    index = batch.token_index.view(-1)
    ob = ob.to(out.dtype).reshape(-1, *out.shape[1:])
    if batch.keep is not None:
        ob, index = ob.index_select(0, batch.keep), index.index_select(0, batch.keep)
    out.index_copy_(0, index, ob)


class DistAttention:
    """The ``attend`` of one step in one process (see the module docstring)."""

    def __init__(
        self,
        plan: AttentionPlan,
        pools: dict[int, KVCache],
        scale: float,
        remote: Remote = IN_PROCESS,
    ) -> None:
        self.plan = plan
        self.pools = pools
        self.scale = scale
        self.remote = remote

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for w in self.plan.writes.per_owner:
            if w.owner in self.pools:
                self.pools[w.owner].write(layer, w.slots, k[w.index], v[w.index])
        batches = self.plan.batches
        queries = [batch_queries(b, q) for b in batches]
        remote = self.remote.trade(layer, k, v, queries)
        if len(batches) == 1 and isinstance(batches[0], Decodes) and batches[0].in_order:
            # Decode-only steps: the flat tokens already are the batch.
            partials = self._partials(layer, 0, queries[0], batches[0].parts, remote)
            out = partials[0][0] if len(partials) == 1 else merge(partials)[0]
            return out.to(q.dtype).reshape(q.shape)
        out = torch.empty_like(q)
        for i, (b, qb) in enumerate(zip(batches, queries)):
            if isinstance(b, FreshPrompts):
                prefill_attention(q, k, v, b.rows, self.scale, out)
                continue
            partials = self._partials(layer, i, qb, b.parts, remote)
            if isinstance(b, Chunks):
                index = b.token_index.view(-1)
                kb = k[index].view(*b.token_index.shape, *k.shape[1:])
                vb = v[index].view(*b.token_index.shape, *v.shape[1:])
                partials.append(causal_attention(qb, kb, vb, self.scale))
            _scatter(b, partials[0][0] if len(partials) == 1 else merge(partials)[0], out)
        return out

    def serve(self, layer: int) -> None:
        """Take part in a layer's trade with no tokens of this process's own."""
        self.remote.trade(layer, torch.empty(0), torch.empty(0), [])

    def _partials(
        self, layer: int, i: int, q: torch.Tensor, parts: tuple[Part, ...],
        remote: dict[tuple[int, int], Partial],
    ) -> list[Partial]:
        """Batch ``i``'s partial per owner, in the parts' order: here, or from ``remote``."""
        partials = []
        for part in parts:
            if part.owner in self.pools:
                k_cache, v_cache = self.pools[part.owner].layer(layer)
                partials.append(micro_attention(q, k_cache, v_cache, part.run, self.scale))
            else:
                out, lse = remote[(part.owner, i)]
                partials.append((out.to(q.dtype), lse))
        return partials
