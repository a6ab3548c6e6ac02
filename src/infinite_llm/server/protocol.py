"""The OpenAI wire format: request bodies as pydantic models, and response shapes.

Requests ignore fields they do not know, as OpenAI's clients send many (``user``,
``metadata``, ``store``...), except those that would change what a request means: those
this server does not implement (``_UNSUPPORTED``) are accepted only at the value that
changes nothing and refused with a 400 otherwise, never silently dropped. Bounds that
do not depend on the model (n, logprobs, seed) live in the schema, so the OpenAPI
document says them and validation refuses them with a 400; bounds that do (the
context length, the KV capacity, the vocabulary) are the engine's to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_INT64 = 2**63


def _absent(value: Any) -> bool:
    return value is None or value == [] or value == {} or value is False or value == ""


# OpenAI's and vLLM's request fields that change a request's meaning and that this server
# does not implement, with the values at which they change nothing.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": _absent,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": _absent,
    "function_call": lambda v: v in (None, "none", "auto"),
    "logit_bias": _absent,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "min_p": lambda v: v in (None, 0),
    "min_tokens": lambda v: v in (None, 0),
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": _absent,
    "echo": _absent,
    "suffix": _absent,
    "prompt_logprobs": lambda v: v is None,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "prediction": lambda v: v is None,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "chat_template": lambda v: v is None,
    "chat_template_kwargs": _absent,
    "continue_final_message": _absent,
    "add_generation_prompt": lambda v: v in (None, True),
}


class _Request(BaseModel):
    # strict: types as OpenAI's API has them (a string is no number, a boolean no token
    # id; an integer is a number).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _refuse_unsupported(data: Any, fields: dict[str, Callable[[Any], bool]]) -> Any:
    if isinstance(data, dict):
        for name, neutral in fields.items():
            if name in data and not neutral(data[name]):
                raise ValueError(f"{name} is not supported by this server; leave it out")
    return data


class StreamOptions(_Request):
    include_usage: bool | None = False


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # followed strictly either way


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is given with type json_schema, "
                             "and only then")
        return self


class _SamplingFields(_Request):
    """What completions and chat completions share, with vLLM's extras
    (top_k, ignore_eos, stop_token_ids, skip_special_tokens, return_token_ids)."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=2**31)  # the sampler builds an int64 tensor
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # each choice (and chunk) also carries its token ids
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse_unsupported(data, _UNSUPPORTED)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:  # a past tool call: tools are not served
        return _refuse_unsupported(data, {"tool_calls": _absent, "function_call": _absent})


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Ours, beyond OpenAI's (clients ignore them): the share of the request's KV that
    # instances other than its home held when it finished (the mean over n samples),
    # and the milliseconds steps spent copying migrated KV while it ran (the longest).
    kv_remote_share: float | None = None
    migration_stall_ms: float | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "infinite-llm"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
