"""Runs a step plan through the model in this process: inputs, attention, logits, samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from infinite_llm.attention.dist import (
    AttentionBatch,
    DistAttention,
    KVLayout,
    KVWrites,
    SeqSpan,
    build_batches,
)
from infinite_llm.engine.sampler import SampledToken, Sampler, SampleRequest
from infinite_llm.engine.sampling_params import SamplingParams
from infinite_llm.engine.scheduler import ScheduledChunk, SchedulerOutput
from infinite_llm.memory.kv_cache import KVCache
from infinite_llm.model.checkpoint import Checkpoint
from infinite_llm.model.cpu_linear import use_cpu_linears
from infinite_llm.model.llama import LlamaForCausalLM


class InstanceFailure(RuntimeError):
    """Instances died during a step (their KV is gone); the step changed nothing else."""

    def __init__(self, dead: list[int]) -> None:
        super().__init__(f"instance(s) {dead} died")
        self.dead = dead


class Runner(Protocol):
    """What the engine needs of whoever computes its step plans."""

    sampler: Sampler

    def execute(
        self, plan: SchedulerOutput, params: dict[str, SamplingParams]
    ) -> dict[str, SampledToken]: ...


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
    """Runs the model over the instances' KV tensors (by instance id) and samples."""

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: dict[int, KVCache], sampler: Sampler
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sampler = sampler
        config = model.config
        self.scale = config.head_dim**-0.5
        weight = next(model.parameters())
        block_size = next(iter(kv_caches.values())).block_size
        self.layout = KVLayout.for_model(config, block_size, weight.dtype, weight.device)

    @torch.inference_mode()
    def execute(
        self, plan: SchedulerOutput, params: dict[str, SamplingParams]
    ) -> dict[str, SampledToken]:
        """Compute the plan's tokens; sample for each chunk that reaches its request's end."""
        if not plan.chunks:
            return {}
        hidden = self.forward(plan)
        sampled = [c for c in plan.chunks if c.sample]
        if not sampled:
            return {}
        logits = sample_logits(self.model, hidden, plan.chunks)
        rows = [SampleRequest(c.request_id, params[c.request_id]) for c in sampled]
        return {row.request_id: token for row, token in zip(rows, self.sampler(logits, rows))}

    @torch.inference_mode()
    def forward(self, plan: SchedulerOutput) -> torch.Tensor:
        """Final hidden states (N, hidden) of the plan's tokens, chunk after chunk."""
        step = StepInputs.build(plan.chunks, self.layout)
        attend = DistAttention(self.kv_caches, step.writes, step.batches, self.scale)
        return self.model(step.input_ids, step.positions, attend)


@dataclass(frozen=True)
class StepInputs:
    """Chunks as the model and DistAttention take them, on the layout's device."""

    input_ids: torch.Tensor  # (N,) the chunks' tokens, flattened in order
    positions: torch.Tensor  # (N,)
    writes: KVWrites
    batches: list[AttentionBatch]

    @staticmethod
    def build(chunks: list[ScheduledChunk], layout: KVLayout) -> StepInputs:
        input_ids, positions, spans = prepare(chunks)
        return StepInputs(
            input_ids.to(layout.device),
            positions.to(layout.device),
            KVWrites.build(spans, positions, layout.block_size, layout.device),
            build_batches(spans, layout),
        )


def prepare(chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, list[SeqSpan]]:
    """The chunks' tokens flattened in order: token ids, positions and one span each."""
    token_ids: list[int] = []
    positions: list[int] = []
    spans = []
    for chunk in chunks:
        n = len(chunk.token_ids)
        spans.append(SeqSpan(len(token_ids), n, chunk.first_pos, chunk.rblocks))
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.first_pos, chunk.first_pos + n))
    return torch.tensor(token_ids), torch.tensor(positions), spans


def sample_logits(
    model: LlamaForCausalLM, hidden: torch.Tensor, chunks: list[ScheduledChunk]
) -> torch.Tensor:
    """Logits of the last token of each chunk that samples (hidden: the chunks' flat
    final hidden states)."""
    ends = torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0) - 1
    last = ends[torch.tensor([c.sample for c in chunks])].to(hidden.device)
    return model.compute_logits(hidden.index_select(0, last))
