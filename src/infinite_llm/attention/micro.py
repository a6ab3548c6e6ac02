"""MicroAttention: attention of a batch of queries over paged KV blocks, returning ``(out, lse)``.

One call covers a batch of sequences. Each sequence brings ``Q`` queries (1 for decode, a
prefill chunk otherwise) and a run of its KV blocks in one pool: its rBlock. The run
holds the tokens at absolute positions ``[kv_start, kv_start + kv_len)``; a query at
position ``p`` sees the keys at positions ``<= p`` (the causal mask). Sequences of one
call are padded to the longest, so nothing loops over sequences in Python::

    block_table[b] = [ 7, 2, 9, 0, 0 ]      (block_size = 4, padded with any id)
    key slot j of b:   j // 4 -> block, j % 4 -> offset
    kv_start[b] = 32, kv_len[b] = 10  ->  keys at positions 32..41, slots 0..9 valid

The partial result over a subset of a sequence's keys is returned with its log-sum-exp
so that partials over disjoint subsets merge exactly (see ``merge``). A query that sees
no key at all gets ``out = 0`` and ``lse = -inf``: the identity of the merge.

What a query may see is the same in every layer, so a run computes it once per step:
a ``PagedRun`` (decodes: the paged kernel reads the blocks in place) or a ``MaskedRun``
(a gather of the blocks plus one fused attention kernel under a mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinite_llm.kernels import gpu
from infinite_llm.kernels.cpu import paged_decode_attention


@dataclass(frozen=True)
class PagedRun:
    """Every query of sequence b sees the first kv_len[b] (>= 0) slots of its blocks:
    read in place by a paged kernel, no gather, no mask: the CPU kernel (decodes, where
    ``paged_decode_supported``) or, on a GPU, the Triton kernel (decodes and a chunk's
    history, where ``gpu.paged_attention_supported``)."""

    block_table: torch.Tensor  # (B, NB) int64
    kv_len: torch.Tensor  # (B,)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = gpu.paged_decode if q.device.type == "cuda" else paged_decode_attention
        return kernel(q, k_cache, v_cache, self.block_table, self.kv_len, scale)


@dataclass(frozen=True)
class MaskedRun:
    """The blocks gathered end to end and attended under a mask of what each query sees."""

    block_table: torch.Tensor  # (B, NB) int64
    # (B, 1, group * Q or 1, NB * block_size): 0 where visible, -inf elsewhere
    mask: torch.Tensor
    # Queries that see no key, broadcastable to (B, Q, H); None when there are none.
    empty: torch.Tensor | None

    @staticmethod
    def prefix(
        block_table: torch.Tensor, kv_len: torch.Tensor, block_size: int, dtype: torch.dtype
    ) -> MaskedRun:
        """Every query of sequence b sees its first kv_len[b] (>= 0) slots: the history
        before a prompt chunk, or one owner's share of it. The mask covers keys only
        (B, 1, 1, T), whatever the chunk's length."""
        slot = torch.arange(block_table.shape[1] * block_size)
        hidden = slot[None, :] >= kv_len[:, None]
        mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, -torch.inf)
        none = kv_len == 0
        empty = none[:, None, None] if bool(none.any()) else None
        return MaskedRun(block_table, mask[:, None, None, :], empty)

    @staticmethod
    def build(
        block_table: torch.Tensor,
        kv_start: torch.Tensor,
        kv_len: torch.Tensor,
        q_pos: torch.Tensor,
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        dtype: torch.dtype,
    ) -> MaskedRun:
        """block_table (B, NB); kv_start, kv_len (B,); q_pos (B, Q) absolute positions."""
        batch, num_q = q_pos.shape
        group = num_heads // num_kv_heads
        slot = torch.arange(block_table.shape[1] * block_size)
        visible = (slot[None, None, :] < kv_len[:, None, None]) & (
            kv_start[:, None, None] + slot[None, None, :] <= q_pos[:, :, None]
        )  # (B, Q, T)
        # Query rows are ordered (group, Q) to match how ``attend`` folds heads.
        rows = visible[:, None].expand(batch, group, num_q, slot.numel())
        mask = torch.zeros(rows.shape, dtype=dtype).masked_fill_(~rows, -torch.inf)
        sees_nothing = ~visible.any(dim=-1)  # (B, Q)
        empty = None
        if bool(sees_nothing.any()):
            empty = sees_nothing[:, :, None].expand(batch, num_q, num_heads)
        return MaskedRun(block_table, mask.reshape(batch, 1, group * num_q, -1), empty)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_q, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        group = num_heads // kv_heads
        keys = gather_blocks(k_cache, self.block_table)  # (B, KVH, T, D)
        values = gather_blocks(v_cache, self.block_table)
        # Grouped-query attention without repeating K/V: the `group` query heads that
        # share a KV head become extra query rows of that head. (B, KVH, group * Q, D)
        qg = q.view(batch, num_q, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, kv_heads, group * num_q, head_dim)
        out, lse = _attention_with_lse(qg, keys, values, self.mask, scale)
        out = out.view(batch, kv_heads, group, num_q, head_dim).permute(0, 3, 1, 2, 4)
        lse = lse.view(batch, kv_heads, group, num_q).permute(0, 3, 1, 2)
        lse = lse.reshape(batch, num_q, num_heads)
        out = out.reshape(batch, num_q, num_heads, head_dim)
        if self.empty is not None:
            # The kernel reports lse = 0 for a row with no visible key; the merge needs
            # -inf and an output of 0.
            lse = lse.masked_fill(self.empty, -torch.inf)
            out = out.masked_fill(self.empty[..., None], 0.0)
        return out, lse


KVRun = PagedRun | MaskedRun


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Keys (or values) of each sequence's blocks laid end to end.

    cache: (num_blocks, block_size, kv_heads, head_dim); block_table: (B, NB)
    returns (B, kv_heads, NB * block_size, head_dim)
    """
    batch, num_blocks = block_table.shape
    _, block_size, kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, block_table.reshape(-1))
    return gathered.view(batch, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)


def micro_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, run: KVRun, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of ``q`` (B, Q, H, D) over each sequence's blocks in one pool,
    the way ``run``'s type says. k_cache, v_cache: (num_blocks, block_size, KVH, D).
    Returns out (B, Q, H, D) in q's dtype and lse (B, Q, H) in float32."""
    return run.attend(q, k_cache, v_cache, scale)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a chunk over its own keys, query i seeing keys 0..i.

    q (B, Q, H, D); k, v (B, Q, KVH, D). Returns out (B, Q, H, D) and lse (B, Q, H).
    On a GPU with the Triton kernels, the paged kernel over the chunk's own keys (no
    Q x Q scores: 32K tokens over SmolLM2's 9 heads would need 38 GB of them a layer).
    """
    if gpu.paged_attention_supported(q.device, q.dtype, q.shape[-1]):
        return gpu.causal_attention(q, k, v, scale)
    group = q.shape[2] // k.shape[2]
    out, lse = _attention_with_lse(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(group, dim=1),
        v.transpose(1, 2).repeat_interleave(group, dim=1),
        None,
        scale,
    )
    return out.transpose(1, 2), lse.transpose(1, 2)


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and its row log-sum-exp; (B, heads, R, D) inputs.
    With no mask, row i sees keys 0..i (causal, top-left aligned)."""
    causal = mask is None
    if q.device.type == "cpu":
        # One fused, multi-threaded kernel that also returns the log-sum-exp.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    if causal:
        rows, cols = q.shape[-2], k.shape[-2]
        mask = torch.full((rows, cols), -torch.inf, device=q.device).triu_(1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)  # rows with no key
    return torch.matmul(probs.to(v.dtype), v), lse.nan_to_num_(0.0, neginf=0.0)
