"""What the engine returns, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: sampled + top-k log-probs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """What the pooled KV did to a finished request: the share of its KV blocks on
    instances other than its home when it finished, the seconds steps spent copying
    migrated KV while it was in the cluster (it waited for them), its preemptions."""

    remote_kv_share: float
    migration_stall_s: float
    num_preemptions: int

    @staticmethod
    def of_samples(samples: list[RequestMetrics]) -> RequestMetrics:
        """The n samples of one prompt as one: their mean remote share, the longest
        stall, every preemption."""
        return RequestMetrics(
            sum(m.remote_kv_share for m in samples) / len(samples),
            max(m.migration_stall_s for m in samples),
            sum(m.num_preemptions for m in samples),
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why it ended with finish_reason "error"
    metrics: RequestMetrics | None = None  # once finished
