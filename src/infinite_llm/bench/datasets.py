"""What a benchmark sends: prompts as token ids (exact lengths, no tokenizer needed, any
server that takes token-id prompts reads them), how many tokens each must generate,
and when each is sent.

- ``w1``, ``w2``: the standard workloads (``docs/WORKLOADS.md``), in order;
- ``random``: prompts of ``input_len`` and outputs of ``output_len`` tokens, each
  drawn uniformly within ``range_ratio`` of them, as ``vllm bench serve``'s random set;
- ``trace``: a Mooncake JSON-lines or Vidur-style CSV trace's lengths, scaled by
  ``length_scale`` (by default, so that its longest request fits the server's context),
  with random token ids;
- ``shaped``: lengths drawn from one of the paper's trace shapes
  (``workload.traces.PAPER_SHAPES``: ``short-1..3``, lognormal contexts whose spread
  rises; ``long-1..6``, 2% of requests far beyond one instance), scaled the same way.

Requests are sent at ``request_rate`` per second (``inf``: all at once) with gamma gaps
of shape ``burstiness`` (1: Poisson), or, with ``fixed_schedule``, at the trace's own
times.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from infinite_llm.workload.traces import (
    PAPER_SHAPES,
    TraceRequest,
    arrival_times,
    read_trace,
    shaped,
)

DATASETS = ("random", "trace", "shaped", "w1", "w2")
# Token ids of random prompts: SmolLM2's vocabulary, clear of its special tokens (the
# standard workloads' range, docs/WORKLOADS.md).
LOW_TOKEN_ID, HIGH_TOKEN_ID = 1000, 49000


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_tokens: int
    arrival_s: float  # from the run's start


@dataclass(frozen=True)
class Dataset:
    name: str = "random"
    num_prompts: int | None = None  # None: all of w1, w2 or the trace; random needs it
    trace: str | None = None
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    length_scale: float | None = None  # trace lengths x this; None: fit the context
    request_rate: float = math.inf
    burstiness: float = 1.0
    fixed_schedule: bool = False
    seed: int = 0
    shape: str | None = None  # with name "shaped": a key of PAPER_SHAPES

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}: one of {', '.join(DATASETS)}")
        if (self.name == "shaped") != (self.shape is not None):
            raise ValueError("--dataset shaped and --shape NAME go together")
        if self.shape is not None and self.shape not in PAPER_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: one of {', '.join(PAPER_SHAPES)}")
        if self.name == "shaped" and self.num_prompts is None:
            raise ValueError("--dataset shaped needs --num-prompts")
        if (self.name == "trace") != (self.trace is not None):
            raise ValueError("--dataset trace and --trace FILE go together")
        if self.fixed_schedule and self.name != "trace":
            raise ValueError(
                "--fixed-schedule replays a trace's own times: it needs --dataset trace")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.name == "random" and self.num_prompts is None:
            raise ValueError("--dataset random needs --num-prompts")
        if self.input_len < 1 or self.output_len < 1 or not 0 <= self.range_ratio < 1:
            raise ValueError("random lengths need input and output >= 1 and 0 <= range ratio < 1")
        if self.length_scale is not None and not self.length_scale > 0:
            raise ValueError(f"--length-scale must be positive, got {self.length_scale}")
        if not (self.request_rate > 0 and self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("--request-rate and --burstiness must be positive")

    def requests(
        self, max_model_len: int | None = None, vocab_size: int | None = None,
    ) -> tuple[list[BenchRequest], list[str]]:
        """The requests, and lines saying what was done to them (the scale of a trace).
        Random token ids are drawn from [1000, 49000) (SmolLM2's vocabulary, clear of
        its special tokens), below ``vocab_size`` where that is smaller."""
        rng = random.Random(self.seed)
        notes: list[str] = []
        vocab = HIGH_TOKEN_ID if vocab_size is None else min(HIGH_TOKEN_ID, vocab_size)
        ids = (min(LOW_TOKEN_ID, vocab // 10), vocab)
        if self.name in ("w1", "w2") and vocab < HIGH_TOKEN_ID:
            raise ValueError(f"{self.name}'s token ids reach {HIGH_TOKEN_ID - 1}; this model's "
                             f"vocabulary has {vocab_size}: use --dataset random or trace")
        if self.name in ("w1", "w2"):
            from infinite_llm.bench.workloads import get_workload  # NumPy, only for these

            workload = get_workload(self.name.upper())
            n = self.num_prompts or workload.num_requests
            shapes = list(zip(workload.prompts, workload.output_lens))[:n]
            return self._at_rate([(list(p), o) for p, o in shapes]), notes
        if self.name == "random":
            shapes = []
            for _ in range(self.num_prompts or 0):
                n_in = _around(rng, self.input_len, self.range_ratio)
                n_out = _around(rng, self.output_len, self.range_ratio)
                shapes.append((_prompt(rng, n_in, ids), n_out))
            return self._at_rate(shapes), notes
        if self.name == "shaped":  # arrivals at the rate, as drawn with the lengths
            trace = shaped(PAPER_SHAPES[self.shape], self.num_prompts or 0, self.request_rate,
                           self.seed, self.burstiness)
        else:
            trace = read_trace(self.trace)[: self.num_prompts]
        if not trace:
            raise ValueError(f"{self.trace}: no requests")
        scale = self.length_scale
        if scale is None:
            longest = max(r.input_tokens + r.output_tokens for r in trace)
            scale = 1.0 if max_model_len is None else min(1.0, max_model_len / longest)
            if scale < 1:
                notes.append(f"trace lengths x {scale:.4g} so that the longest request "
                             f"({longest} tokens) fits the context ({max_model_len})")
        else:
            notes.append(f"trace lengths x {scale:.4g}")
        scaled = [scale_lengths(r, scale) for r in trace]
        shapes = [(_prompt(rng, r.input_tokens, ids), r.output_tokens) for r in scaled]
        if self.fixed_schedule or self.name == "shaped":
            first = trace[0].arrival_s
            if self.fixed_schedule:
                notes.append(
                    f"replaying the trace's own times ({trace[-1].arrival_s - first:.1f} s)")
            return [BenchRequest(p, o, r.arrival_s - first)
                    for (p, o), r in zip(shapes, trace)], notes
        return self._at_rate(shapes), notes

    def _at_rate(self, shapes: list[tuple[list[int], int]]) -> list[BenchRequest]:
        times = arrival_times(len(shapes), self.request_rate, self.burstiness, self.seed)
        return [BenchRequest(p, o, t) for (p, o), t in zip(shapes, times)]


def scale_lengths(request: TraceRequest, scale: float) -> TraceRequest:
    """Prompt and output lengths times ``scale``, rounded down (so a request that fit
    a context still does), at least one token each."""
    return TraceRequest(request.arrival_s, max(1, int(request.input_tokens * scale)),
                        max(1, int(request.output_tokens * scale)))


def _around(rng: random.Random, length: int, ratio: float) -> int:
    """Uniform over [length (1 - ratio), length (1 + ratio)], at least 1."""
    return max(1, rng.randint(math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))))


def _prompt(rng: random.Random, length: int, ids: tuple[int, int]) -> list[int]:
    return [rng.randrange(*ids) for _ in range(length)]
