"""A conversation as a prompt: the model's chat template, then token ids.

One rule for every front end: the offline API (``LLM.chat``, the CLI) and the server's
chat completions and ``/tokenize``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer

Message = dict[str, str]


def chat_prompt(
    tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """The conversation rendered with the model's chat template, as text and token ids."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt)
    # The template already writes any BOS token: encode without adding another.
    return text, tokenizer.encode(text, add_special_tokens=False)
