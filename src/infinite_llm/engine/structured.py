"""Structured outputs: each sampled token kept within a JSON Schema's language, by
llguidance (a grammar engine that computes the allowed-token mask per step from the
tokenizer's vocabulary). Chosen by measurement (``benchmarks/structured.py``,
docs/BENCHMARKS.md): 37-71 us a token on SmolLM2's vocabulary, under 1 ms a step more
than xgrammar's masks at 16 requests, as one dependency-free wheel (xgrammar brings
transformers and triton); outlines-core's masks cost 5-10x and its compile 0.2-0.3 s."""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import torch

from infinite_llm.core.sampling_params import StructuredOutput

if TYPE_CHECKING:
    import llguidance

    from infinite_llm.model.tokenizer import Tokenizer


def _llguidance():
    try:
        import llguidance
    except ImportError as error:  # a dependency; missing only from a broken install
        raise ValueError("structured outputs need llguidance: pip install llguidance") from error
    return llguidance


def grammar_of(spec: StructuredOutput) -> str:
    """The llguidance grammar of ``spec``; raises ValueError, saying why, for a schema
    it cannot follow."""
    return _grammar(json.dumps(spec.schema))  # key order kept: it orders the properties


# JSON as ``json.dumps`` writes it: ", " and ": " between items, no other whitespace. A
# model may not fill the output with blanks (flexible whitespace lets a weak model loop
# on them until max_tokens); a schema's own "x-guidance" options override these.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=256)
def _grammar(schema: str) -> str:
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE)
    except ValueError as error:
        raise ValueError(f"json_schema: {error}") from error
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"json_schema cannot be followed: {problem}")
    return grammar


class Grammars:
    """Matchers over one model's tokenizer. The tokenizer is converted once, on the
    first structured request (about a second for a 50K vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)

    @cached_property
    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        llg = _llguidance()
        backend = self._tokenizer.backend
        return llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                               eos_token=self._eos or None)

    @cached_property
    def _executor(self) -> llguidance.LLExecutor:
        return _llguidance().LLExecutor()

    def matcher(self, spec: StructuredOutput) -> Matcher:
        return Matcher(_llguidance().LLMatcher(self._ll_tokenizer, grammar_of(spec)))

    def masks(self, matchers: list[Matcher]) -> torch.Tensor:
        """(len(matchers), words) int32: the tokens each matcher allows next, one bit
        a token, computed in one call across threads."""
        words = (self.vocab_size + 31) // 32
        masks = torch.zeros(len(matchers), words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m.matcher, i) for i, m in enumerate(matchers)], masks.data_ptr(), words * 4,
            len(matchers))
        for m in matchers:
            m.check()
        return masks


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)
        self.check()

    def check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"structured output: {self.matcher.get_error()}")


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, V) with every token whose bit is clear in ``masks`` (B, words,
    int32) set to -inf."""
    vocab = logits.shape[1]
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((masks.unsqueeze(-1) >> bits) & 1).reshape(masks.shape[0], -1)[:, :vocab]
    return logits.masked_fill(allowed.to(logits.device) == 0, float("-inf"))
