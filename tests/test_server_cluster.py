"""The real server on a tiny random Llama pooled over two small instances: bad input,
load, disconnects, lent blocks, metrics. Prompts are token ids (the model has no
tokenizer); ``return_token_ids`` makes every streamed token visible."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from test_server_cli import ServerProcess, assert_openai_error

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

NAME = "tiny"
SUCCESS = "infinite_llm:request_success_total"
# 512 KiB per instance holds 42 blocks of 16 tokens of this model: 672 tokens; one request
# may borrow half of the other's pool, so it can hold 63 blocks (1008 tokens) < context 1024.
FLAGS = ("--dtype", "float32", "--instances", "2", "--kv-cache-memory", "512KiB",
         "--served-model-name", NAME, "--max-body-size", "64KiB")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(str(tiny_llama_dir), *FLAGS)
    yield process
    process.kill()


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(320) for _ in range(n)]


def body(prompt, **kwargs) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, **kwargs}


def scrape(server) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in parser.text_string_to_metric_families(server.get("/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                              timeout=120)


def test_cluster_and_metrics_describe_the_pool(server):
    view = server.cluster()
    assert view["model"] == NAME and view["block_size"] == 16
    assert [i["instance_id"] for i in view["instances"]] == [0, 1]
    assert all(i["capacity"] == i["free"] == 42 and i["alive"] for i in view["instances"])
    assert view["max_request_tokens"] == 63 * 16
    assert set(view["ledger"]["instances"]) == {"0", "1"}
    samples = scrape(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(samples, f"infinite_llm:{name}", model_name=NAME) == 0
    assert value(samples, "infinite_llm:instance_alive", model_name=NAME) == 2
    for state in ("free", "used", "lent", "borrowed"):
        for instance in ("0", "1"):
            expected = 42 if state == "free" else 0
            assert value(samples, f"infinite_llm:kv_{state}_blocks", instance=instance) == expected
    for name in ("num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert (f"infinite_llm:{name}", (("model_name", NAME),)) in samples


def _chunked(data: bytes):
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


JSON = {"content-type": "application/json"}
BAD = {
    "validation": (dict(json=body([1, 2], temperature=-1)), 400, "temperature"),
    "wrong type": (dict(json=body([1, 2], max_tokens="many")), 400, "max_tokens"),
    "malformed json": (dict(content=b'{"prompt": [1, 2', headers=JSON), 400, "JSON"),
    "not an object": (dict(json=[1, 2, 3]), 400, None),
    "no prompt": (dict(json={"model": NAME}), 400, "prompt"),
    "empty prompt": (dict(json=body([])), 400, "empty"),
    "token out of vocab": (dict(json=body([1, 320])), 400, "[0, 320)"),
    "text without tokenizer": (dict(json=body("hello")), 400, "tokenizer"),
    "prompt beyond the context": (dict(json=body(ids(1024, 1))), 400, "1024"),
    "prompt + max_tokens beyond the context": (dict(json=body(ids(100, 2), max_tokens=1000)),
                                               400, "1100"),
    "beyond what the cluster holds": (dict(json=body(ids(500, 3), max_tokens=520)), 400,
                                      "1008 tokens"),
    "second prompt bad": (dict(json=body([ids(40, 4), ids(1024, 5)])), 400, "1024"),
    "n too large": (dict(json=body([1, 2], n=1000)), 400, "n"),
    "logprobs too many": (dict(json=body([1, 2], logprobs=1000)), 400, "logprobs"),
    "empty stop string": (dict(json=body([1, 2], stop=[""])), 400, "stop"),
    "top_k past int64 (once killed the engine)": (dict(json=body([1, 2], top_k=10**30)), 400,
                                                   "top_k"),
    "unknown model": (dict(json={**body([1, 2]), "model": "gpt-4"}), 404, "gpt-4"),
    "body too large": (dict(json=body(ids(20000, 6))), 413, "65536"),
    "body too large, chunked": (dict(content=_chunked(b'{"prompt": [' + b"1, " * 30000 + b"1]}"),
                                     headers=JSON), 413, "65536"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_changes_nothing(server, case):
    kwargs, status, needle = BAD[case]
    before = scrape(server)
    error = assert_openai_error(server.post("/v1/completions", **kwargs), status)
    if needle is not None:
        assert needle in error["message"] + str(error["param"])
    assert value(scrape(server), "infinite_llm:prompt_tokens_total") == value(
        before, "infinite_llm:prompt_tokens_total")
    server.wait_idle(within=0.5)
    ok = server.post("/v1/completions", json=body(ids(10, 7), max_tokens=3, return_token_ids=True))
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 3
    server.wait_idle()


def test_chat_without_a_template_and_unknown_routes_are_4xx(server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = assert_openai_error(server.post("/v1/chat/completions", json=chat), 400)
    assert "tokenizer" in error["message"]
    assert_openai_error(server.post("/v1/chat/completions", json={"messages": []}), 400)
    assert_openai_error(server.get("/v1/nothing"), 404)
    assert_openai_error(server.get("/v1/completions"), 405)
    server.wait_idle()


@dataclass
class Streamed:
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    usage: object = None
    first: float = 0.0  # when the first and the last token arrived
    last: float = 0.0


async def _stream_tokens(client, prompt, max_tokens, *, stop_after: int | None = None):
    """What one streamed request received; with ``stop_after``, the stream is closed
    after that many chunks (a client leaving)."""
    stream = await client.completions.create(
        model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    got, chunks = Streamed(), 0
    async for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            got.usage = chunk.usage
        for choice in chunk.choices:
            if choice.model_extra["token_ids"]:
                got.tokens += choice.model_extra["token_ids"]
                got.first = got.first or time.monotonic()
                got.last = time.monotonic()
            got.finish = choice.finish_reason or got.finish
        if stop_after is not None and chunks >= stop_after:
            await stream.close()
            break
    return got


def test_100_concurrent_streams_each_get_exactly_their_tokens(server):
    async def main():
        async with async_client(server) as client:
            return await asyncio.gather(
                *[_stream_tokens(client, ids(8, 100 + i), 8) for i in range(100)]
            )

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    elapsed = time.monotonic() - start
    for got in results:
        assert len(got.tokens) == 8 and got.finish == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (8, 8)
    # Requests whose token streams overlap in time ran in the same steps.
    events = sorted([(r.first, 1) for r in results] + [(r.last, -1) for r in results])
    overlap = max(itertools.accumulate(delta for _, delta in events))
    assert overlap > 10, f"at most {overlap} requests generated at once"
    server.wait_idle()
    print(f"100 streams x 8 tokens in {elapsed:.1f} s; up to {overlap} generating at once")


def test_half_of_20_clients_leave_mid_stream_and_the_rest_are_exact(server):
    kept = [ids(6 + i, 200 + i) for i in range(10)]
    left = [ids(6 + i, 300 + i) for i in range(10)]
    expected = []
    for prompt in kept:
        response = server.post("/v1/completions",
                               json=body(prompt, max_tokens=16, return_token_ids=True))
        expected.append(response.json()["choices"][0]["token_ids"])
    aborted_before = value(scrape(server), SUCCESS, finished_reason="abort")

    async def main():
        async with async_client(server) as client:
            return await asyncio.gather(
                *[_stream_tokens(client, p, 16) for p in kept],
                # Left alone these would run ~900 steps, seconds: only an abort ends them soon.
                *[_stream_tokens(client, p, 900, stop_after=3) for p in left],
            )

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for got, want in zip(results[:10], expected, strict=True):
        assert got.tokens == want and got.finish == "length"
    server.wait_idle(within=1.0)
    aborted = value(scrape(server), SUCCESS, finished_reason="abort")
    assert aborted - aborted_before == 10


def test_a_client_that_gives_up_on_a_plain_request_aborts_it(server):
    aborted = value(scrape(server), SUCCESS, finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json=body(ids(10, 8), max_tokens=990), timeout=0.3)
    server.wait_idle(within=1.0)
    assert value(scrape(server), SUCCESS, finished_reason="abort") == aborted + 1


def test_a_request_larger_than_one_instance_borrows_and_returns_every_block(server):
    prompt = ids(700, 9)  # 44 blocks: more than one instance's 42

    async def main():
        async with async_client(server) as client:
            stream = await client.completions.create(
                model=NAME, prompt=prompt, max_tokens=300, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            async for _ in stream:
                view = await asyncio.to_thread(server.cluster)
                await stream.close()
                return view

    view = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert sum(i["lent"] for i in view["instances"]) > 0
    assert sum(i["borrowed"] for i in view["instances"]) == view["ledger"]["total_debt"] > 0
    # The request itself: its home, and how many of its blocks each instance holds.
    (request,) = view["requests"]
    assert set(request["blocks"]) == {"0", "1"} and request["num_tokens"] > 700
    # Between steps its blocks hold exactly the tokens it has computed (16 per block).
    assert sum(request["blocks"].values()) == -(-request["num_computed_tokens"] // 16)
    server.wait_idle(within=1.0)


def test_metrics_count_exactly_what_ran(server):
    n, p, t = 4, 12, 6
    before = scrape(server)
    for i in range(n):
        response = server.post("/v1/completions", json=body(ids(p, 400 + i), max_tokens=t))
        assert response.json()["usage"]["completion_tokens"] == t
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        name = f"infinite_llm:{name}"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("time_to_first_token_seconds_count") == n
    assert delta("prompt_tokens_total") == n * p
    assert delta("generation_tokens_total") == n * t
    assert delta("inter_token_latency_seconds_count") == n * (t - 1)
    assert delta("e2e_request_latency_seconds_count") == n
    assert delta("request_success_total", finished_reason="length") == n
    server.wait_idle()
