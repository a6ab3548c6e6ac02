"""Runs step plans through the model in this process: inputs, attention, logits, samples."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from infinite_llm.attention.dist import DistAttention
from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.plan import JOINED, AttentionPlan, KVLayout, SeqSpan, on_device
from infinite_llm.attention.tables import KVTables
from infinite_llm.config import GraphConfig
from infinite_llm.core.step import Chunk, StepPlan, StepResult
from infinite_llm.engine.decode_graphs import DecodeGraphs
from infinite_llm.engine.sampler import Sampler
from infinite_llm.model.checkpoint import Checkpoint
from infinite_llm.model.cpu_linear import use_cpu_linears
from infinite_llm.model.llama import LlamaForCausalLM


def build_model(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device = torch.device("cpu")
) -> LlamaForCausalLM:
    """Load weights into a Llama-family model of ``dtype`` on ``device`` (on CPU, with the
    packed linears)."""
    module = LlamaForCausalLM(checkpoint.config)
    module.load_weights(checkpoint.weights())
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    use_cpu_linears(module)
    return module


class ModelRunner:
    """The runner in this process: the model over every instance's KV tensors (by
    instance id), the block tables as the plans describe them, and the sampler. Where
    the instances' pools are views of one cache (``whole``: ``KVCache.joined``),
    attention reads it through one table per sequence wherever its blocks live. With
    ``graphs`` on a GPU, decode steps are replayed from CUDA graphs (``DecodeGraphs``)."""

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: dict[int, KVCache], sampler: Sampler,
        whole: KVCache | None = None, graphs: GraphConfig | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sampler = sampler
        config = model.config
        self.scale = config.head_dim**-0.5
        weight = next(model.parameters())
        block_size = next(iter(kv_caches.values())).block_size
        self.layout = KVLayout.for_model(config, block_size, weight.dtype, weight.device)
        # The caches attention reads, by owner: the whole where the pools are joined.
        self.pools = kv_caches
        bases = None
        if whole is not None:
            self.pools = {JOINED: whole}
            self.layout = replace(self.layout, joined=True)
            bases = {i: cache.base for i, cache in kv_caches.items()}
        self.tables = KVTables(bases)
        self.graphs = DecodeGraphs.on_gpu(model, self.pools, self.scale, graphs)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan's changes, compute its tokens, sample for each chunk that
        reaches its request's end."""
        self.sampler.apply(plan)
        self.tables.apply(plan)
        # Moves before the step writes anything, every source read before any block is
        # written (a cancelled debt cycle is a permutation): see core/migration.py.
        start = time.perf_counter()
        copies = [(move, self.kv_caches[move.src].gather(move.src_blocks)) for move in plan.moves]
        for move, (k, v) in copies:
            self.kv_caches[move.dst].scatter(move.dst_blocks, k, v)
        moved = StepResult(
            move_s=time.perf_counter() - start if copies else 0.0,
            moved_bytes=sum(k.nbytes + v.nbytes for _, (k, v) in copies),
        )
        if not plan.chunks:
            return moved
        result = self.sampler.sample(self.logits(plan.chunks), plan.chunks)
        return replace(result, move_s=moved.move_s, moved_bytes=moved.moved_bytes)

    @torch.inference_mode()
    def logits(self, chunks: tuple[Chunk, ...]) -> torch.Tensor:
        """Logits of the last token of each chunk that samples: from a graph where one
        takes the step, else op by op."""
        step = StepInputs.build(chunks, self.tables, self.layout, move=False)
        if (logits := graph_logits(self.graphs, step, chunks)) is not None:
            return logits
        hidden = self._forward(on_device(step, self.layout.device))
        return sample_logits(self.model, hidden, chunks)

    @torch.inference_mode()
    def forward(self, chunks: tuple[Chunk, ...]) -> torch.Tensor:
        """Final hidden states (N, hidden) of the chunks' tokens, chunk after chunk."""
        return self._forward(StepInputs.build(chunks, self.tables, self.layout))

    def _forward(self, step: StepInputs) -> torch.Tensor:
        attend = DistAttention(step.attention, self.pools, self.scale)
        return self.model(step.input_ids, step.positions, attend)

    def shutdown(self) -> None:
        """Nothing runs outside this process."""


@dataclass(frozen=True)
class StepInputs:
    """Chunks as the model and DistAttention take them, on the layout's device."""

    input_ids: torch.Tensor  # (N,) the chunks' tokens, flattened in order
    positions: torch.Tensor  # (N,)
    attention: AttentionPlan

    @staticmethod
    def build(chunks: Sequence[Chunk], tables: KVTables, layout: KVLayout,
              move: bool = True) -> StepInputs:
        """For the layout's kernels; on its device with ``move``, else on the CPU (to be
        moved in one go, ``on_device``, or copied into a graph's buffers)."""
        input_ids, positions, spans = prepare(chunks, tables)
        step = StepInputs(input_ids, positions, AttentionPlan.build(spans, positions, layout, False))
        return on_device(step, layout.device) if move else step


def prepare(
    chunks: Sequence[Chunk], tables: KVTables
) -> tuple[torch.Tensor, torch.Tensor, list[SeqSpan]]:
    """The chunks' tokens flattened in order: token ids, positions and one span each."""
    token_ids: list[int] = []
    positions: list[int] = []
    spans = []
    for chunk in chunks:
        n = len(chunk.token_ids)
        spans.append(SeqSpan(len(token_ids), n, chunk.first_pos, tables[chunk.request_id]))
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.first_pos, chunk.first_pos + n))
    return torch.tensor(token_ids), torch.tensor(positions), spans


def graph_logits(graphs: DecodeGraphs | None, step: StepInputs,
                 chunks: Sequence[Chunk]) -> torch.Tensor | None:
    """The logits of a step built on the CPU (``StepInputs.build(..., move=False)``) from
    a graph of ``graphs``, where one takes it and every chunk samples; else None."""
    if graphs is None or not all(c.sample for c in chunks):
        return None
    return graphs.logits(step.input_ids, step.positions, step.attention)


def sample_logits(
    model: LlamaForCausalLM, hidden: torch.Tensor, chunks: Sequence[Chunk]
) -> torch.Tensor:
    """Logits of the last token of each chunk that samples (hidden: the chunks' flat
    final hidden states)."""
    ends = torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0) - 1
    last = ends[torch.tensor([c.sample for c in chunks])].to(hidden.device)
    return model.compute_logits(hidden.index_select(0, last))
