"""A request as the scheduler sees it: tokens, one progress counter, its rBlocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.memory.rblock import BlockTable


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """``num_computed_tokens`` is the only progress state: the tokens whose KV is in the
    cache. Prefill, chunked prefill, decode and recompute after preemption are all
    "computed catches up with ``num_tokens``"::

        all_token_ids: | prompt ............ | output ..... |
                       |<- num_computed ->|  <- scheduled next ->
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what the context leaves when that is None
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    home: int = 0  # the instance that schedules it and runs its non-attention layers
    arrival: int = 0  # order of arrival in the cluster: older requests win for blocks
    block_table: BlockTable = field(default_factory=BlockTable)  # rBlocks, local or lent
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # set with finish_reason "error"
    num_preemptions: int = 0
    # When it finishes: the share of its KV blocks that instances other than its home
    # held then, and the seconds steps spent copying migrated KV while it was in the
    # cluster (every request waits for a step's copies); ``stall_mark``: that total
    # when it arrived.
    remote_kv_share: float = 0.0
    migration_stall_s: float = 0.0
    stall_mark: float = 0.0

    def num_blocks_needed(self, block_size: int) -> int:
        """Blocks its tokens so far take (what a waiting request needs to start)."""
        return -(-self.num_tokens // block_size)

    def max_blocks(self, block_size: int) -> int:
        """Blocks it takes at most: its prompt and every token it may generate."""
        return -(-self.max_total_tokens // block_size)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole context."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens the request holds at most: prompt + every token it may generate."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
