"""MicroAttention over paged KV blocks in Triton, for GPUs: ``(out, lse)`` with a natural-log
lse, the CPU kernels' contract.

One kernel covers every run the engine makes (``attention/micro.py``): sequence b's
queries (1 for a decode, a prompt chunk otherwise) at absolute positions ``q_pos[b]``
attend over the first ``kv_len[b]`` slots of its blocks, whose first slot holds position
``kv_start[b]``; a query sees the slots at positions ``<= `` its own (causal over the
chunk, everything before it in the history). Each program takes one sequence, one KV
head with the query heads that share it (GQA: their rows read each K/V block once), a
tile of queries and one split of the blocks (split-KV: a long context is cut into
``num_splits`` ranges computed side by side), and keeps an online softmax over the
split's blocks, read in place through the block table. A second kernel merges the
splits' partials exactly (``merge_partials``: also the merge of several owners'
partials, DistAttention's arithmetic). A query that sees no key gets ``out = 0`` and
``lse = -inf``. The new tokens' k and v go into their slots in one launch for both
(``write_kv``).

Runs on a GPU, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported), which is how CI tests it without a GPU. ``triton`` is an
optional dependency (the ``gpu`` extra): nothing else imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, kv_start_ptr, kv_len_ptr, q_pos_ptr, out_ptr, lse_ptr,
    scale,
    stride_qb, stride_qq, stride_qh,
    stride_kn, stride_ks, stride_kh,
    stride_vn, stride_vs, stride_vh,
    stride_tb, stride_pb,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lq,
    num_q, num_splits, blocks_per_split,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BS_PAD: tl.constexpr, TILE_BLOCKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, USE_DOT: tl.constexpr,
    ALL_VISIBLE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits

    # Rows: BLOCK_Q queries x GROUP_PAD query heads, row r = query (r // GROUP_PAD), head
    # kv_head * GROUP + (r % GROUP_PAD); ROWS >= BLOCK_Q * GROUP_PAD pads them to what a
    # tensor-core product takes (16), the padding rows masked.
    rows = tl.arange(0, ROWS)
    query = q_tile * BLOCK_Q + rows // GROUP_PAD
    member = rows % GROUP_PAD
    head = kv_head * GROUP + member
    row_ok = (rows < BLOCK_Q * GROUP_PAD) & (query < num_q) & (member < GROUP)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM

    q = tl.load(q_ptr + b * stride_qb + query[:, None] * stride_qq + head[:, None] * stride_qh
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if not ALL_VISIBLE:
        pos = tl.load(q_pos_ptr + b * stride_pb + query, mask=row_ok, other=-1)
        kv_start = tl.load(kv_start_ptr + b)
    kv_len = tl.load(kv_len_ptr + b)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    # A tile: TILE_BLOCKS blocks of the table read together (more bytes in flight a
    # program), slot t of the tile = block t // BS_PAD of it, offset t % BS_PAD.
    tile = tl.arange(0, TILE_BLOCKS * BS_PAD)
    in_tile = tile // BS_PAD
    offset = tile % BS_PAD
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(kv_len, BLOCK_SIZE))
    if not ALL_VISIBLE:  # causal: no block past the tile's last query is read
        last = tl.minimum(last, tl.cdiv(tl.max(pos, axis=0) - kv_start + 1, BLOCK_SIZE))
    for j in range(first, last, TILE_BLOCKS):
        index = j + in_tile
        block = tl.load(table_ptr + b * stride_tb + index, mask=index < last, other=0)
        block = block.to(tl.int64)
        slot = index * BLOCK_SIZE + offset
        slot_ok = (offset < BLOCK_SIZE) & (index < last) & (slot < kv_len)
        kv_mask = slot_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kn + offset[:, None] * stride_ks
                    + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + block[:, None] * stride_vn + offset[:, None] * stride_vs
                    + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        scores = scores * scale
        if ALL_VISIBLE:  # a decode, or a chunk's history: every slot up to kv_len
            visible = slot_ok[None, :] & row_ok[:, None]
        else:
            visible = slot_ok[None, :] & (kv_start + slot[None, :] <= pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        # Rows that have seen nothing yet keep m = -inf: shift by 0 there.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(m - shift)
        total = total * rescale + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * rescale[:, None] + pv
        m = m_new

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    base = split * stride_os + b * stride_ob + query[:, None] * stride_oq
    tl.store(out_ptr + base + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + split * stride_ls + b * stride_lb + query * stride_lq + head, lse,
             mask=row_ok)


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, merged_ptr, merged_lse_ptr, num_parts, rows,
    stride_op, stride_lp,
    PARTS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    parts = tl.arange(0, PARTS_PAD)
    part_ok = parts < num_parts
    lses = tl.load(lse_ptr + parts * stride_lp + row, mask=part_ok, other=float("-inf"))
    top = tl.max(lses, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp(lses - shift)
    total = tl.sum(weights, axis=0)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    outs = tl.load(out_ptr + parts[:, None] * stride_op + row * HEAD_DIM + dims[None, :],
                   mask=part_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    seen = total > 0
    merged = tl.sum(weights[:, None] * outs, axis=0) / tl.where(seen, total, 1.0)
    tl.store(merged_ptr + row * HEAD_DIM + dims, merged.to(merged_ptr.dtype.element_ty),
             mask=dim_ok)
    tl.store(merged_lse_ptr + row, tl.where(seen, shift + tl.log(tl.where(seen, total, 1.0)),
                                            float("-inf")))


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ks, stride_kch, stride_vs, stride_vch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    dims = tl.arange(0, D_PAD)
    ok = (heads < KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + token * stride_kn + heads[:, None] * stride_kh + dims[None, :], mask=ok)
    v = tl.load(v_ptr + token * stride_vn + heads[:, None] * stride_vh + dims[None, :], mask=ok)
    tl.store(k_cache_ptr + slot * stride_ks + heads[:, None] * stride_kch + dims[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + slot * stride_vs + heads[:, None] * stride_vch + dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Token n's k[n], v[n] (N, KVH, D) into flat slot ``slots[n]`` (block * block_size +
    offset) of k_cache, v_cache (num_blocks, block_size, KVH, D), both in one launch;
    ``index_copy_``'s effect, k and v read where they lie (views of the fused qkv)."""
    tokens, kv_heads, dim = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dimension")
    k_flat = k_cache.view(-1, kv_heads, dim)  # a view: each pool's blocks are contiguous
    v_flat = v_cache.view(-1, kv_heads, dim)
    if tokens:
        _write_kv_kernel[(tokens,)](
            k, v, slots, k_flat, v_flat,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_flat.stride(0), k_flat.stride(1), v_flat.stride(0), v_flat.stride(1),
            KV_HEADS=kv_heads, HEAD_DIM=dim, H_PAD=triton.next_power_of_2(kv_heads),
            D_PAD=triton.next_power_of_2(dim),
        )


def merge_partials(outs: torch.Tensor, lses: torch.Tensor,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials over disjoint key sets exactly: outs (P, ..., D), lses (P, ...)
    float32 -> out (..., D) in ``out_dtype`` (outs' by default), lse (...) float32."""
    parts, *shape, dim = outs.shape
    outs = outs.contiguous()
    lses = lses.to(torch.float32).contiguous()
    rows = lses[0].numel()
    # Written in the dtype asked for: no cast after (one kernel fewer a layer).
    merged = torch.empty(rows, dim, dtype=out_dtype or outs.dtype, device=outs.device)
    merged_lse = torch.empty(rows, dtype=torch.float32, device=outs.device)
    if rows:
        _merge_kernel[(rows,)](
            outs, lses, merged, merged_lse, parts, rows, rows * dim, rows,
            PARTS_PAD=triton.next_power_of_2(max(parts, 1)), HEAD_DIM=dim,
            D_PAD=triton.next_power_of_2(dim),
        )
    return merged.view(*shape, dim), merged_lse.view(*shape)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    kv_start: torch.Tensor | None, kv_len: torch.Tensor, q_pos: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None, block_q: int | None = None,
    tile_blocks: int | None = None, use_dot: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Q, H, D) over each sequence's first ``kv_len[b]`` slots of its
    blocks (k_cache, v_cache: (num_blocks, block_size, KVH, D); block_table (B, NB)), the
    slots at positions ``kv_start[b]`` on, each query at ``q_pos`` (B, Q) seeing those at
    or before its own (``kv_start`` and ``q_pos`` None: every query sees all of them, a
    decode, with nothing built for it each layer). ``num_splits`` ranges of blocks are
    computed side by side and merged (default: enough to give the GPU work for a short
    batch of long contexts). The knobs, defaults chosen here: ``tile_blocks`` blocks read
    a step of a program's loop, ``use_dot`` tensor-core products (rows padded to 16;
    where a tile has fewer than 16 slots, none).
    Returns out (B, Q, H, D) in q's dtype and lse (B, Q, H) float32, natural log."""
    batch, num_q, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last dimension")
    group = heads // kv_heads
    width = block_table.shape[1]
    if num_splits is None:
        num_splits = _default_splits(batch * kv_heads, width)
    num_splits = max(1, min(num_splits, max(width, 1)))
    blocks_per_split = max(1, -(-width // num_splits))
    group_pad = triton.next_power_of_2(group)
    if block_q is None:
        block_q = max(1, min(triton.next_power_of_2(num_q), max(1, 64 // group_pad)))
    d_pad = triton.next_power_of_2(dim)
    bs_pad = triton.next_power_of_2(block_size)
    if use_dot is None:  # on a GPU (the interpreter's bfloat16 products are wrong)
        use_dot = q.device.type == "cuda" and d_pad >= 16
    # A tensor-core product takes at least 16 rows and 16 slots: the rows padded.
    rows = max(block_q * group_pad, 16 if use_dot else 1)
    if tile_blocks is None:
        tile_blocks = _default_tile_blocks(rows, bs_pad, q.element_size())
    tile_blocks = triton.next_power_of_2(tile_blocks)
    if use_dot and tile_blocks * bs_pad < 16:
        use_dot, rows = False, block_q * group_pad
    device = q.device
    # Index tensors as the plan made them (int32 or int64): the kernel reads either, so
    # a layer converts nothing.
    table = block_table.to(device).contiguous()
    lengths = kv_len.to(device).contiguous()
    if lengths.is_floating_point():  # lengths given as floats: counted as ints
        lengths = lengths.to(torch.int32)
    all_visible = q_pos is None
    starts = lengths if all_visible else kv_start.to(device).contiguous()
    positions = block_table if all_visible else q_pos.to(device).contiguous()
    # One split's out is the answer: written in q's dtype (no cast after); several are
    # kept in float32 for their merge.
    outs = torch.empty(num_splits, batch, num_q, heads, dim, device=device,
                       dtype=q.dtype if num_splits == 1 else torch.float32)
    lses = torch.empty(num_splits, batch, num_q, heads, dtype=torch.float32, device=device)
    grid = (batch, kv_heads, triton.cdiv(num_q, block_q) * num_splits)
    if batch and num_q:
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, table, starts, lengths, positions, outs, lses, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            table.stride(0), positions.stride(0),
            outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
            lses.stride(0), lses.stride(1), lses.stride(2),
            num_q, num_splits, blocks_per_split,
            GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, ROWS=rows,
            BLOCK_SIZE=block_size, BS_PAD=bs_pad, TILE_BLOCKS=tile_blocks, HEAD_DIM=dim,
            D_PAD=d_pad, USE_DOT=use_dot, ALL_VISIBLE=all_visible,
        )
    if num_splits == 1:
        return outs[0], lses[0]
    return merge_partials(outs, lses, q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     block_size: int = 16, use_dot: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt chunk over its own keys, query i seeing keys 0..i: q (B, Q, H, D), k, v
    (B, Q, KVH, D) -> out (B, Q, H, D) in q's dtype, lse (B, Q, H) float32. The paged
    kernel over the chunk's keys laid out as blocks of their own (no Q x Q scores
    anywhere), each query tile stopping at its last position (``use_dot``: as
    ``paged_attention``'s)."""
    batch, num_q, _, _ = q.shape
    blocks = -(-num_q // block_size)
    pad = blocks * block_size - num_q
    if pad:  # the last block filled out: no query sees past its own position
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
    k_cache = k.reshape(batch * blocks, block_size, *k.shape[2:])
    v_cache = v.reshape(batch * blocks, block_size, *v.shape[2:])
    device = q.device
    table = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
    starts = torch.zeros(batch, dtype=torch.int32, device=device)
    lengths = torch.full((batch,), num_q, dtype=torch.int32, device=device)
    positions = torch.arange(num_q, dtype=torch.int32, device=device).expand(batch, num_q)
    return paged_attention(q, k_cache, v_cache, table, starts, lengths, positions, scale,
                           num_splits=1, use_dot=use_dot)


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    kv_len: torch.Tensor, scale: float, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: each sequence's queries q (B, Q, H, D) see all of its first ``kv_len[b]``
    slots (as the CPU kernel ``paged_decode_attention``)."""
    return paged_attention(q, k_cache, v_cache, block_table, None, kv_len, None, scale,
                           num_splits)


def _default_tile_blocks(rows: int, bs_pad: int, element_size: int) -> int:
    """Blocks a step of the loop reads: up to 64 slots and 4 blocks (the more bytes in
    flight, the nearer the copy bandwidth), fewer where they would not stay in registers
    on an H100/H200: sm_90 builds spill beyond 4,096 scores (rows x slots) at 2 bytes an
    element, 1,024 at 4, and past 4 blocks of 4 slots (tests/test_triton_hopper.py)."""
    scores = 4096 if element_size <= 2 else 1024
    return max(1, min(64 // bs_pad, 4, scores // (rows * bs_pad)))


def _default_splits(programs: int, width: int) -> int:
    """Splits enough that (sequences x KV heads x splits) fills a GPU's streaming
    multiprocessors a few times over, each split at least 8 blocks long."""
    if width <= 8:
        return 1
    target = 4 * 132  # SMs of an H100/H200
    return max(1, min(width // 8, -(-target // max(programs, 1))))
