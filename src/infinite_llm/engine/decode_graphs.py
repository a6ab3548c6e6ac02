"""Decode steps replayed from CUDA graphs: a step without launch overhead.

A decode step of a small model is hundreds of small kernel launches, each a few
microseconds of the host's time, so on a GPU the host sets the pace, not the device. A
step whose tokens all decode and whose sequences' KV all lives in one pool of this
process is instead replayed from a graph captured once for its shape: the batch padded
up to a bucket (1, 2, 4, ... up to ``max_num_seqs``), the block table up to a width
bucket (16, 32, 64, ... blocks). A padding row decodes token 0 at position 0 over no
keys and writes its k, v to the pool's scratch slot (``KVCache.scratch_slot``); its
logits are dropped. The step's inputs reach the device as one copy from one pinned host
buffer; the graph leaves the logits in a buffer of its own, and the sampler's copy of
the sampled tokens back is the step's one host synchronisation.

With ``torch_compile`` (``enable_torch_compile``) the padded step is compiled by
torch.compile for its shape before its graph is captured: what the graph then replays
is Inductor's kernels (its fusions of what runs between the Triton kernels) instead of
PyTorch's ops one by one. Each shape compiles once, when a step first needs it.

Every other step (prompts, a sequence over several pools, a batch beyond the largest
bucket) runs op by op, as with ``enforce_eager``. Without a GPU the same padded step
runs without a graph (``capture=False``), compiled or not: what the padding computes
is checked on every machine, the capture itself only on a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from infinite_llm.attention.dist import DistAttention
from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.micro import PagedRun
from infinite_llm.attention.plan import AttentionPlan, Decodes, KVWrites, OwnerWrites, Part
from infinite_llm.config import GraphConfig
from infinite_llm.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

MIN_WIDTH = 16  # blocks: the narrowest table a graph is captured for
# torch.compile keeps this many shapes of the padded step (its defaults, 8 a function
# and 256 in all, would run the rest uncompiled): every (batch, width) bucket a server
# meets.
MAX_COMPILED_SHAPES = 1024


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two at or above ``n`` (at least ``smallest``)."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class GraphKey:
    """The shape a graph was captured for: whose pool, how many rows, how wide a table."""

    owner: int
    batch: int
    width: int


class _Static:
    """One graph's inputs in one int64 buffer on the device (token ids, positions, KV
    slots, context lengths, the block table), filled from a host buffer of the same
    layout by one copy, and the step it describes over them (``attend``: one layer's
    attention)."""

    def __init__(self, key: GraphKey, pools: dict[int, KVCache], scale: float,
                 device: torch.device) -> None:
        scratch_slot = pools[key.owner].scratch_slot
        b, w = key.batch, key.width
        pinned = device.type == "cuda"
        self.key, self.scratch_slot = key, scratch_slot
        self.host = torch.zeros(4 * b + b * w, dtype=torch.int64, pin_memory=pinned)
        self.reset(self.host)
        self.device = self.host if device.type == "cpu" else self.host.to(device)
        self.copied = torch.cuda.Event() if pinned else None
        self.ids, self.positions, self.slots, self.kv_len, self.table = _views(self.device, b, w)
        writes = KVWrites((OwnerWrites(key.owner, slice(None), self.slots),))
        rows = torch.arange(b, device=device)[:, None]
        decodes = Decodes(rows, None, (Part(key.owner, PagedRun(self.table, self.kv_len)),),
                          in_order=True)
        self.attend = DistAttention(AttentionPlan(writes, (decodes,)), pools, scale)

    def reset(self, buffer: torch.Tensor) -> None:
        """Every row padding: token 0 at position 0 over no keys, its k, v to the scratch.
        The table is left as it is: no row reads its entries past its length."""
        ids, positions, slots, kv_len, _ = _views(buffer, self.key.batch, self.key.width)
        for column in (ids, positions, kv_len):
            column.zero_()
        slots.fill_(self.scratch_slot)

    def load(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             run: PagedRun) -> None:
        """A step's rows into the host buffer, the rest padding, then one copy over."""
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copy has left the host buffer
        n, w = ids.shape[0], run.block_table.shape[1]
        self.reset(self.host)
        h_ids, h_positions, h_slots, h_kv_len, h_table = _views(
            self.host, self.key.batch, self.key.width)
        h_ids[:n] = ids
        h_positions[:n] = positions
        h_slots[:n] = slots
        h_kv_len[:n] = run.kv_len
        h_table[:n, :w] = run.block_table
        if self.device is not self.host:
            self.device.copy_(self.host, non_blocking=True)
            self.copied.record()


def _views(buffer: torch.Tensor, b: int, w: int) -> tuple[torch.Tensor, ...]:
    ids, positions, slots, kv_len, table = buffer.split([b, b, b, b, b * w])
    return ids, positions, slots, kv_len, table.view(b, w)


class DecodeGraphs:
    """Decode steps from graphs, one per ``GraphKey``, captured when a step first needs
    it (see the module docstring)."""

    def __init__(self, model: LlamaForCausalLM, pools: dict[int, KVCache], scale: float,
                 max_batch: int, capture: bool, torch_compile: bool = False) -> None:
        self.model = model
        self.pools = pools  # the caches attention reads, by owner (``ModelRunner.pools``)
        self.scale = scale
        self.max_batch = bucket(max_batch)
        self.capture = capture
        # One shape, one compiled step: a new shape compiles, never widens an old one.
        self._step = torch.compile(self._forward, dynamic=False) if torch_compile else None
        self.device = next(model.parameters()).device
        self._graphs: dict[GraphKey, tuple[_Static, torch.cuda.CUDAGraph | None, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps served from a graph (or, without capture, its padded step)

    @staticmethod
    def on_gpu(model: LlamaForCausalLM, pools: dict[int, KVCache], scale: float,
               config: GraphConfig | None) -> DecodeGraphs | None:
        """Captured graphs where the model is on a GPU and ``config`` is given (None:
        ``enforce_eager``); None otherwise (every step op by op)."""
        if config is None or next(model.parameters()).device.type != "cuda":
            return None
        return DecodeGraphs(model, pools, scale, config.max_batch, capture=True,
                            torch_compile=config.torch_compile)

    @property
    def keys(self) -> list[GraphKey]:
        """The shapes captured so far."""
        return list(self._graphs)

    def graph(self, key: GraphKey) -> torch.cuda.CUDAGraph | None:
        """The graph captured for ``key`` (None without capture): to time it alone."""
        return self._graphs[key][1]

    def key(self, plan: AttentionPlan, tokens: int) -> GraphKey | None:
        """The graph a step of ``tokens`` tokens with this (CPU-side) plan would replay:
        None unless it is decodes only, in order, over one pool paged, writing there."""
        if len(plan.batches) != 1 or len(plan.writes.per_owner) != 1:
            return None
        decodes, = plan.batches
        if not isinstance(decodes, Decodes) or not decodes.in_order or len(decodes.parts) != 1:
            return None
        part, = decodes.parts
        writes, = plan.writes.per_owner
        if (not isinstance(part.run, PagedRun) or writes.owner != part.owner
                or decodes.token_index.shape[0] != tokens or tokens > self.max_batch):
            return None
        return GraphKey(part.owner, bucket(tokens), bucket(part.run.block_table.shape[1], MIN_WIDTH))

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
               plan: AttentionPlan) -> torch.Tensor | None:
        """The logits (tokens, vocab) float32 of a decode step described on the CPU, from
        its graph; None where no graph takes the step (``key``)."""
        key = self.key(plan, input_ids.shape[0])
        if key is None:
            return None
        static, graph, logits = self._graphs.get(key) or self._capture(key)
        writes, = plan.writes.per_owner
        static.load(input_ids, positions, writes.slots, plan.batches[0].parts[0].run)
        if graph is None:
            logits = self._run(static)
        else:
            graph.replay()
        self.replays += 1
        return logits[: input_ids.shape[0]]

    def _forward(self, static: _Static) -> torch.Tensor:
        hidden = self.model(static.ids, static.positions, static.attend)
        return self.model.compute_logits(hidden)

    def _run(self, static: _Static) -> torch.Tensor:
        """The padded step over ``static``'s buffers, through torch.compile if asked."""
        if self._step is None:
            return self._forward(static)
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES,
                                        accumulated_recompile_limit=MAX_COMPILED_SHAPES):
            return self._step(static)

    def _capture(self, key: GraphKey) -> tuple[_Static, torch.cuda.CUDAGraph | None, torch.Tensor]:
        """The static buffers of ``key`` and, on a GPU, its graph: run once on a side
        stream (Triton compiles its kernels, the allocator sees the step), then captured,
        every row padding meanwhile (nothing but the scratch slot written)."""
        static = _Static(key, self.pools, self.scale, self.device)
        graph, logits = None, torch.empty(0)
        if self.capture:
            start = time.perf_counter()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Thread-local: a server's other threads may use CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._run(static)
            # A compile takes seconds and stalls the steps behind it: say so, once a shape.
            logger.info("decode step of %d rows over %d blocks a table %s in %.2f s",
                        key.batch, key.width,
                        "compiled and captured" if self._step is not None else "captured",
                        time.perf_counter() - start)
        self._graphs[key] = (static, graph, logits)
        return self._graphs[key]
