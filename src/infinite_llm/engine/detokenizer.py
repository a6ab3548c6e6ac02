"""Incremental detokenization and stop-string detection for one request's output."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer


class Detokenizer:
    """Turns output token ids into text one token at a time, in O(1) per token."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were decoded already as context
        self._read = 0

    def push(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any (text is cut before it)."""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix :], self.skip_special_tokens)
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next token.
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        delta = new_text[len(prefix_text) :]
        # The tokens just read become the context the next ones are decoded after, so
        # merges and leading-space rules come out as in a full decode.
        self._prefix = self._read
        self._read = len(self._ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        found = [(at, stop) for stop in self.stop if (at := self.text.find(stop, start)) != -1]
        if not found:
            return None
        at, stop = min(found)
        self.text = self.text[:at]
        return stop
