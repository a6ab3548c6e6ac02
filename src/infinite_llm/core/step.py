"""The step contract: what the bookkeeping hands whoever computes a cluster step, and
what comes back. Plain, picklable values (they cross to Ray actors as they are); no torch.

    bookkeeping (Cluster) ── StepPlan ──► Runner (in process, or one Ray actor per
                          ◄─ StepResult ─   instance: model, KV tensors, sampling)

A runner keeps its own copy of what it needs across steps (each request's block table,
sampling state) and learns every change from the plans, in this order: forget
``finished`` requests entirely and ``preempted`` requests' tables, note ``new_requests``,
apply ``tables``, copy ``moves``, then compute ``chunks``. So a plan's size is what
changed this step, not the length of anyone's context.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, replace
from typing import Protocol

from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.memory.rblock import TableUpdate


@dataclass(frozen=True)
class Chunk:
    """Tokens of one request computed this step, at positions ``first_pos`` on; their
    KV goes into (and their attention reads) the request's block table."""

    request_id: str
    home: int  # the instance that runs its non-attention layers
    token_ids: tuple[int, ...]
    first_pos: int
    sample: bool  # the chunk reaches the request's last token: sample the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class NewRequest:
    """A request the runners have not seen yet: how to sample its tokens."""

    request_id: str
    params: SamplingParams


@dataclass(frozen=True)
class BlockMove:
    """Copy the KV of blocks ``src_blocks`` on instance ``src`` into ``dst_blocks`` on
    ``dst`` before the step computes (live migration, cancelled debt cycles). A plan's
    moves read every source before writing any destination: they may permute blocks."""

    request_id: str
    src: int
    src_blocks: tuple[int, ...]
    dst: int
    dst_blocks: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """Everything one cluster step computes, and every change the runners must apply
    first (see the module docstring for the order)."""

    chunks: tuple[Chunk, ...] = ()
    tables: tuple[TableUpdate, ...] = ()
    new_requests: tuple[NewRequest, ...] = ()
    preempted: tuple[str, ...] = ()  # back to waiting: their tables are gone
    finished: tuple[str, ...] = ()  # ended since the last plan: forget them
    moves: tuple[BlockMove, ...] = ()


def encode_plan(plan: StepPlan) -> bytes:
    """A plan as the instance processes receive it: without the sampling params (the
    driver samples), pickled once for all of them."""
    return pickle.dumps(replace(plan, new_requests=()), protocol=pickle.HIGHEST_PROTOCOL)


def decode_plan(data: bytes) -> StepPlan:
    plan = pickle.loads(data)
    if not isinstance(plan, StepPlan):
        raise TypeError(f"expected a pickled StepPlan, got {type(plan).__name__}")
    return plan


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # log p(token) under the model's raw distribution
    top_logprobs: dict[int, float] | None = None


@dataclass(frozen=True)
class StepResult:
    """The token sampled for every chunk of the plan that samples, by request id; and
    what the plan's moves cost: seconds the step spent copying migrated KV before it
    could compute (the migration stall; the slowest instance's, where they run side by
    side) and the bytes copied."""

    tokens: dict[str, SampledToken] = field(default_factory=dict)
    move_s: float = 0.0
    moved_bytes: int = 0


class InstanceFailure(RuntimeError):
    """Instances died during a step (their KV is gone); the step changed nothing else,
    and the runners have forgotten every request's table (the next plan resends them)."""

    def __init__(self, dead: list[int]) -> None:
        super().__init__(f"instance(s) {dead} died")
        self.dead = dead


class Runner(Protocol):
    """Whoever computes step plans: the model and the KV tensors live behind it."""

    def execute(self, plan: StepPlan) -> StepResult: ...

    def shutdown(self) -> None: ...
