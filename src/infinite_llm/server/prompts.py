"""Prompts as the engine takes them (token ids), from completions' four prompt shapes
and from chat messages rendered with the model's template; token ids as text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jinja2

from infinite_llm.engine.chat import chat_prompt
from infinite_llm.server.errors import ApiError
from infinite_llm.server.protocol import ChatMessage

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer


def _need(tokenizer: Tokenizer | None, what: str) -> Tokenizer:
    if tokenizer is None:
        raise ApiError(400, f"this model has no tokenizer, so {what}: pass token ids instead")
    return tokenizer


def encode(text: str, tokenizer: Tokenizer | None, add_special_tokens: bool = True) -> list[int]:
    try:
        return _need(tokenizer, "no text prompts").encode(text,
                                                          add_special_tokens=add_special_tokens)
    except ValueError as error:  # text the tokenizer cannot take: the client's
        raise ApiError(400, str(error), "prompt") from error


def completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer | None
) -> list[list[int]]:
    """One token-id list per prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "the prompt list is empty", "prompt")
    prompts = []
    for p in prompt:
        ids = encode(p, tokenizer) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "a prompt is empty", "prompt")
        prompts.append(ids)
    return prompts


def render_chat(
    messages: list[ChatMessage], tokenizer: Tokenizer | None, add_generation_prompt: bool = True
) -> list[int]:
    """The conversation through the model's chat template, as token ids (as ``LLM.chat``
    renders it)."""
    tokenizer = _need(tokenizer, "no chat template")
    conversation = [{"role": m.role, "content": _text(m)} for m in messages]
    try:
        _, ids = chat_prompt(tokenizer, conversation, add_generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        message = f"the chat template refused the messages: {error}"
        raise ApiError(400, message, "messages") from error
    return ids


def _text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            message = f"only text content is supported, got a {part.type!r} part"
            raise ApiError(400, message, "messages")
        parts.append(part.text)
    return "".join(parts)


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """A token as text for logprobs: its decoded piece, or ``token_id:N`` without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def detokenize(tokens: list[int], tokenizer: Tokenizer | None, vocab_size: int) -> str:
    tokenizer = _need(tokenizer, "no detokenization")
    if not all(0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"token ids must be in [0, {vocab_size})", "tokens")
    return tokenizer.decode(tokens)
