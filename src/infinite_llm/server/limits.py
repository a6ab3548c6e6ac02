"""What one API request may ask for, checked before it costs anything.

Before tokenizing: a text prompt (or a conversation's text) longer than the context could
hold even if every token were the vocabulary's longest is refused on its length alone;
the prompts x ``n`` completions it asks for, its stop strings and their lengths are
bounded. After tokenizing: the tokens all its completions may generate together. Each
refusal is a 400 that states the limit and the flag that sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from infinite_llm.config import ServerConfig
from infinite_llm.server import protocol as p
from infinite_llm.server.errors import ApiError

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer


def prompt_chars_bound(max_model_len: int, tokenizer: Tokenizer | None) -> int | None:
    """Characters beyond which a text cannot fit ``max_model_len`` tokens: each token
    stands for at most the longest vocabulary entry's characters (a normalizer may
    fold several characters into one: then four times that). None without a tokenizer
    (no text prompts then)."""
    if tokenizer is None:
        return None
    return max_model_len * tokenizer.max_token_chars * (4 if tokenizer.normalizes else 1)


@dataclass(frozen=True)
class Limits:
    """The context, what one request can hold in the cluster's KV (the default
    max_tokens), and what one API request may ask for (``ServerConfig``'s, the prompt
    length derived from the context when not set)."""

    max_model_len: int
    max_request_tokens: int
    max_prompt_chars: int | None = None
    max_completions: int = ServerConfig.max_completions_per_request
    max_output_tokens: int = ServerConfig.max_output_tokens_per_request
    max_stop_strings: int = ServerConfig.max_stop_strings
    max_stop_string_chars: int = ServerConfig.max_stop_string_chars

    @classmethod
    def of(cls, config: ServerConfig, max_model_len: int, max_request_tokens: int,
           tokenizer: Tokenizer | None) -> Limits:
        chars = config.max_prompt_chars
        return cls(
            max_model_len, max_request_tokens,
            chars if chars is not None else prompt_chars_bound(max_model_len, tokenizer),
            config.max_completions_per_request, config.max_output_tokens_per_request,
            config.max_stop_strings, config.max_stop_string_chars,
        )

    def check_body(self, body: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        """What can be judged before tokenizing: completions asked for, stop strings,
        text lengths."""
        if isinstance(body, p.ChatCompletionRequest):
            prompts, texts = 1, [conversation_chars(body.messages)]
        else:
            prompts, texts = _prompt_shape(body.prompt)
        if prompts * body.n > self.max_completions:
            raise ApiError(
                400, f"this request asks for {prompts} prompt(s) x n={body.n} = "
                f"{prompts * body.n} completions; this server takes at most "
                f"{self.max_completions} a request (--max-completions-per-request)", "n")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > self.max_stop_strings:
            raise ApiError(400, f"{len(stops)} stop strings; this server takes at most "
                           f"{self.max_stop_strings} (--max-stop-strings)", "stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_string_chars:
            raise ApiError(400, f"a stop string of {longest} characters; this server takes "
                           f"at most {self.max_stop_string_chars} (--max-stop-string-chars)",
                           "stop")
        param = "messages" if isinstance(body, p.ChatCompletionRequest) else "prompt"
        for chars in texts:
            self.check_text(chars, param)

    def check_text(self, chars: int, param: str = "prompt") -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise ApiError(
                400, f"the prompt has {chars} characters, more than the {self.max_model_len} "
                f"tokens of context could hold ({self.max_prompt_chars} characters at most: "
                "--max-prompt-chars)", param)

    def check_outputs(self, tokens: int) -> None:
        """The tokens all of a request's completions may generate together."""
        if tokens > self.max_output_tokens:
            raise ApiError(
                400, f"this request's completions may generate {tokens} tokens together "
                f"(max_tokens x completions); this server takes at most "
                f"{self.max_output_tokens} a request (--max-output-tokens-per-request)",
                "max_tokens")


def _prompt_shape(prompt: str | list) -> tuple[int, list[int]]:
    """(prompts, characters of each text prompt) of a completions prompt."""
    if isinstance(prompt, str):
        return 1, [len(prompt)]
    if prompt and isinstance(prompt[0], int):
        return 1, []
    return len(prompt), [len(x) for x in prompt if isinstance(x, str)]


def conversation_chars(messages: list[p.ChatMessage]) -> int:
    """Characters of a conversation's text (before its template)."""
    chars = 0
    for m in messages:
        if isinstance(m.content, str):
            chars += len(m.content)
        elif m.content is not None:
            chars += sum(len(part.text or "") for part in m.content)
    return chars
