"""How to pick each request's next tokens and when to stop, as vLLM users know it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any


# A temperature this small samples the argmax anyway; below it, logits / temperature
# overflows float32 (vLLM draws the same line).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """Output constrained to JSON: any JSON object (``json_object``), or JSON valid under
    ``json_schema`` (a JSON Schema, as a dict or its text). Every token sampled keeps
    the text a prefix of such JSON, and the output ends where the JSON does."""

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (not self.json_object):
            raise ValueError("a structured output is either json_object or a json_schema")
        if isinstance(self.json_schema, str):
            try:
                parsed = json.loads(self.json_schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"json_schema is not valid JSON: {error}") from error
            if not isinstance(parsed, dict):
                raise ValueError("json_schema must be a JSON object")
        elif self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError("json_schema must be a dict or its JSON text")

    @property
    def schema(self) -> dict[str, Any]:
        """The schema to follow (json_object: any object)."""
        if self.json_schema is None:
            return {"type": "object"}
        if isinstance(self.json_schema, str):
            return json.loads(self.json_schema)
        return self.json_schema


@dataclass
class SamplingParams:
    """Per-request sampling settings; validated on construction.

    temperature 0 (or below ``GREEDY_BELOW``, where dividing the logits by it would
    overflow) means greedy. ``top_k`` -1 (or 0) and ``top_p`` 1.0 disable those
    filters. ``stop`` strings end generation and are not included in the text;
    ``stop_token_ids`` end it too (the token is kept in ``token_ids``, as for EOS).
    ``logprobs`` = k returns the sampled token's log-probability and the k most likely.
    ``structured_output`` constrains the output to JSON (``StructuredOutput``).
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None
    _stop: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.top_k == 0:
            self.top_k = -1
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._stop = tuple(stop)
        if self.structured_output is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a structured output: the "
                             "output ends where its JSON does")
        self.stop_token_ids = list(self.stop_token_ids or [])

    def samples(self) -> list[SamplingParams]:
        """The n samples of one prompt, run as n requests of one sample each; seeded ones
        get seeds seed, seed+1, ..., so they differ and each can be reproduced alone."""
        if self.n == 1:
            return [self]
        return [
            replace(self, n=1, seed=None if self.seed is None else self.seed + i)
            for i in range(self.n)
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop
