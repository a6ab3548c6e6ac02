"""The real server on SmolLM2, through the official `openai` client: completions and
chat, streamed and not, usage, stops, seeds, n > 1, logprobs, the key, the model name."""

from __future__ import annotations

import pytest

from test_server_cli import ServerProcess, assert_openai_error

openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "smol"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    process = ServerProcess(
        "smollm2", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "1024",
        "--served-model-name", NAME, "other-name", api_key=KEY,
    )
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def complete(client, **kwargs):
    kwargs.setdefault("model", NAME)
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("max_tokens", 10)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(**kwargs)


def streamed(chunks) -> tuple[dict[int, str], dict[int, str | None], object]:
    """Texts and finish reasons by choice index, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    return texts, finish, usage


def test_models_lists_the_served_names_with_the_context(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME, "other-name"]
    assert models[0].model_extra["max_model_len"] == 1024


def test_completion_usage_and_stream_equal_the_plain_response(client, server):
    plain = complete(client, extra_body={"return_token_ids": True})
    choice = plain.choices[0]
    count = server.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert plain.usage.prompt_tokens == count
    assert plain.usage.completion_tokens == len(choice.model_extra["token_ids"])
    assert plain.usage.total_tokens == count + plain.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length") and choice.text
    if choice.finish_reason == "length":
        assert plain.usage.completion_tokens == 10

    texts, finish, usage = streamed(
        complete(client, stream=True, stream_options={"include_usage": True})
    )
    assert texts == {0: choice.text} and finish == {0: choice.finish_reason}
    assert usage.model_dump() == plain.usage.model_dump()


def test_chat_stream_equals_the_plain_response(client):
    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, finish, usage = streamed(chunks)
    assert texts == {0: message.content}
    assert finish == {0: plain.choices[0].finish_reason}
    assert usage.model_dump() == plain.usage.model_dump()


def test_a_stop_string_cuts_the_text_streamed_or_not(client):
    full = complete(client, max_tokens=16).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    cut = complete(client, max_tokens=16, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    texts, finish, _ = streamed(complete(client, max_tokens=16, stop=[stop], stream=True))
    assert texts == {0: expected} and finish == {0: "stop"}


def test_a_seed_reproduces_a_sample_and_n_gives_seeded_choices(client):
    sample = dict(temperature=1.0, max_tokens=8)
    first = complete(client, seed=7, **sample).choices[0].text
    assert complete(client, seed=7, **sample).choices[0].text == first
    others = {complete(client, seed=s, **sample).choices[0].text for s in (1, 2, 3)}
    assert others != {first}

    many = complete(client, n=3, seed=7, extra_body={"return_token_ids": True}, **sample)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    by_index = {c.index: c.text for c in many.choices}
    assert by_index[0] == first  # sample j uses seed + j
    counts = [len(c.model_extra["token_ids"]) for c in many.choices]
    assert many.usage.completion_tokens == sum(counts)
    texts, _, _ = streamed(complete(client, n=3, seed=7, stream=True, **sample))
    assert texts == by_index


def test_logprobs_for_completions_and_chat(client):
    out = complete(client, max_tokens=4, logprobs=2).choices[0]
    assert len(out.logprobs.tokens) == len(out.logprobs.token_logprobs) == 4
    assert all(len(top) >= 2 for top in out.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in out.logprobs.token_logprobs)
    # Greedy: the chosen token is the most likely one.
    for token, lp, top in zip(out.logprobs.tokens, out.logprobs.token_logprobs,
                              out.logprobs.top_logprobs, strict=True):
        assert lp == pytest.approx(max(top.values())) and top[token] == pytest.approx(lp)

    chat = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    ).choices[0]
    assert len(chat.logprobs.content) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in chat.logprobs.content)


def test_tokenize_and_detokenize_round_trip(server):
    tokens = server.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    text = server.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": PROMPT}
    chat = server.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > tokens["count"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_key_is_401(server, client, headers):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2}
    error = assert_openai_error(server.post("/v1/completions", json=body, headers=headers), 401)
    assert error["code"] == "invalid_api_key"
    assert server.get("/health", headers={}).status_code == 200  # these stay open
    assert server.get("/metrics", headers={}).status_code == 200
    assert_openai_error(server.get("/v1/cluster", headers=headers), 401)
    assert complete(client, max_tokens=2).choices[0].text
    server.wait_idle()


def test_an_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as raised:
        complete(client, model="gpt-4")
    assert "gpt-4" in raised.value.body["message"]
    assert complete(client, model="other-name", max_tokens=2).model == NAME
    server.wait_idle()


def test_a_plain_request_may_leave_out_the_model(server):
    response = server.post("/v1/chat/completions",
                           json={"messages": CHAT, "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "required"},
    {"logit_bias": {"5": 10}},
    {"presence_penalty": 0.5},
    {"extra_body": {"guided_regex": "[0-9]+"}},
    {"extra_body": {"chat_template": "{{ messages }}"}},
])
def test_fields_that_change_a_request_are_refused_not_ignored(client, extra):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2, **extra)
    assert "is not supported by this server; leave it out" in str(refused.value)
    assert refused.value.status_code == 400


def test_such_fields_at_their_neutral_values_are_served(client):
    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4,
                                           temperature=0)
    neutral = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=4, temperature=0, presence_penalty=0,
        frequency_penalty=0, logit_bias={}, user="someone",
        response_format={"type": "text"}, extra_body={"echo": False},
    )
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="best_of is not supported"):
        complete(client, best_of=3, n=1)


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                              "maxItems": 3}},
    "required": ["name", "age", "colors"], "additionalProperties": False,
}


def test_response_format_json_schema_streamed_or_not(client):
    import json

    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=200,
                                           temperature=0.8, seed=3, n=2, response_format=fmt)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=200,
                                            temperature=0.8, seed=3, n=2, response_format=fmt,
                                            stream=True)
    texts, finish, _ = streamed(stream)
    assert [c.message.content for c in reply.choices] == [texts[0], texts[1]]
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    anything = complete(client, prompt="A JSON object about cats:", max_tokens=120,
                        extra_body={"response_format": {"type": "json_object"}})
    text = anything.choices[0].text
    assert text.startswith("{")
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError, match="json_schema cannot be followed"):
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    with pytest.raises(openai.BadRequestError, match="json_schema is given with type"):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                       response_format={"type": "json_schema"})


def test_a_lone_surrogate_is_a_400_not_a_500(server):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = '{"model": "%s", "prompt": "ab\\ud800c", "max_tokens": 2}' % NAME
    for path, text in (("/v1/completions", body), ("/tokenize", '{"prompt": "\\ud800"}')):
        response = httpx.post(server.url + path, content=text, headers=headers, timeout=30)
        error = assert_openai_error(response, 400)
        assert "not valid Unicode (a lone surrogate at character" in error["message"]


@pytest.mark.parametrize("body, where", [
    ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "hi", "n": 1.5}, "n"),
])
def test_types_are_strict_as_openai_has_them(server, body, where):
    import httpx

    response = httpx.post(server.url + "/v1/completions", json={"model": NAME, **body},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    error = assert_openai_error(response, 400)
    assert where in error["message"]


def test_extreme_temperature_and_top_p_sample_the_greedy_token(client):
    greedy = complete(client, max_tokens=6).choices[0].text
    for extreme in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-46},
                    {"temperature": 1e-7, "top_p": 1e-30}):
        assert complete(client, max_tokens=6, **extreme).choices[0].text == greedy, extreme
