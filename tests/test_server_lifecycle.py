"""How the server ends: SIGTERM drains (503 for newcomers, in-flight requests finish or
abort, the process and its group exit), and a failed engine turns the server unhealthy
with an error chunk in the open stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from test_server_cli import ServerProcess, assert_openai_error, free_port

openai = pytest.importorskip("openai")


def test_sigterm_drains_then_exits(tiny_llama_dir):
    # One request runs at a time, so four long ones outlast the one-second drain.
    server = ServerProcess(str(tiny_llama_dir), "--max-num-seqs", "1", "--drain-timeout", "1",
                           "--kv-cache-memory", "4MiB")
    try:
        async def stream(client, i: int, first: asyncio.Event) -> str | None:
            chunks = await client.completions.create(
                model=str(tiny_llama_dir), prompt=[i + 1] * 8, max_tokens=1000, temperature=0,
                stream=True, extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            finish = None
            async for chunk in chunks:
                first.set()
                finish = chunk.choices[0].finish_reason or finish
            return finish

        async def main():
            first = asyncio.Event()
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none",
                                          max_retries=0, timeout=60) as client:
                streams = [asyncio.create_task(stream(client, i, first)) for i in range(4)]
                await asyncio.wait_for(first.wait(), 30)
                os.kill(server.proc.pid, signal.SIGTERM)
                refused = await asyncio.to_thread(_refused_while_draining, server)
                return refused, await asyncio.gather(*streams)

        refused, finishes = asyncio.run(asyncio.wait_for(main(), 60))
        assert refused
        assert set(finishes) <= {"length", "abort"} and "abort" in finishes
        assert server.proc.wait(timeout=20) == 0
        with pytest.raises(ProcessLookupError):  # nothing left in its process group
            os.killpg(server.proc.pid, 0)
    finally:
        server.kill()


def _refused_while_draining(server: ServerProcess) -> bool:
    deadline = time.monotonic() + 5
    while server.get("/health").status_code != 503:
        assert time.monotonic() < deadline, "health did not turn 503"
        time.sleep(0.02)
    response = server.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
    assert_openai_error(response, 503)
    return True


class InProcessServer:
    """build_app under uvicorn in a thread of this process, so a test can reach into
    the engine (here: to make it fail)."""

    def __init__(self, llm, **config) -> None:
        uvicorn = pytest.importorskip("uvicorn")
        from infinite_llm.server import ServerConfig, build_app

        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(
            build_app(llm, ServerConfig(served_model_names=("tiny",), **config)),
            host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), log_level="critical",
        ))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()

    def stream(self, body: dict) -> list[str]:
        """The data of every server-sent event of a streamed completion."""
        with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True},
                          timeout=30) as response:
            assert response.status_code == 200
            return [line[len("data: "):] for line in response.iter_lines() if line]


def _tokens(events: list[str]) -> int:
    return sum(len(json.loads(e)["choices"][0]["token_ids"] or []) for e in events)


def test_a_failed_engine_ends_open_streams_with_an_error_and_turns_unhealthy(tiny_llama_dir):
    from infinite_llm import LLM

    llm = LLM(str(tiny_llama_dir), kv_cache_memory="1MiB")
    real_step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("device lost")
        return real_step()

    llm.engine.step = failing_step
    with InProcessServer(llm) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        events = server.stream({"prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True,
                                "return_token_ids": True})
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "device lost" in error["message"] and error["type"] == "service_unavailable"
        assert 0 < _tokens(events[:-2]) < 50
        assert httpx.get(server.url + "/health").status_code == 503
        late = httpx.post(server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert_openai_error(late, 503)


def test_a_dead_instance_fails_what_survivors_cannot_hold_and_health_says_degraded(
    tiny_llama_dir
):
    from infinite_llm import LLM
    from infinite_llm.core.step import InstanceFailure

    # Two instances of 42 blocks: a 700-token prompt lives on both.
    llm = LLM(str(tiny_llama_dir), instances=2, kv_cache_memory="512KiB")
    real_execute, calls = llm.engine.runner.execute, []

    def execute(plan):
        calls.append(1)
        if len(calls) == 3:  # the plan never reached the runner
            raise InstanceFailure([1])
        return real_execute(plan)

    llm.engine.runner.execute = execute
    with InProcessServer(llm) as server:
        prompt = [i % 320 for i in range(700)]
        events = server.stream({"prompt": prompt, "max_tokens": 100, "ignore_eos": True,
                                "return_token_ids": True})
        assert events[-1] == "[DONE]" and _tokens(events[:-2]) == 2
        error = json.loads(events[-2])["error"]
        assert "instance 1 died" in error["message"] and error["type"] == "server_error"
        # Degraded, not down: the survivor serves, so a load balancer keeps sending.
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["dead_instances"] == [1]
        alive = httpx.get(server.url + "/metrics").text
        assert 'infinite_llm:instance_alive{instance="1",model_name="tiny"} 0.0' in alive
        # The survivor still serves what it can hold.
        ok = httpx.post(server.url + "/v1/completions", timeout=30,
                        json={"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        view = httpx.get(server.url + "/v1/cluster").json()
        assert [i["alive"] for i in view["instances"]] == [True, False]
        assert view["instances"][0]["free"] == view["instances"][0]["capacity"]
