"""schemathesis fuzzes the real server from its own OpenAPI document: valid and
invalid requests to every operation, and none may get a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from test_server_cli import ServerProcess

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # A short context bounds the work of any valid request the fuzzer makes up.
    process = ServerProcess(str(tiny_llama_dir), "--max-model-len", "48", "--kv-cache-memory",
                            "2MiB", "--served-model-name", "tiny", "--max-body-size", "256KiB")
    yield process
    process.kill()


# Examples per operation: most of the budget goes where requests generate.
BUDGET = {"POST /v1/completions": 150, "POST /v1/chat/completions": 60}


def test_no_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        positive = operation.as_strategy(schemathesis.GenerationMode.POSITIVE)
        # Random token ids are rarely below the vocabulary size and random names never
        # name the model: a share of the valid bodies gets both right, so generation runs.
        cases = (positive | positive.map(_servable)
                 | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
        examples = BUDGET.get(f"{operation.method.upper()} {operation.path}", 15)

        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def call(case):
            response = case.call(base_url=server.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                f"{response.text}"
            )

        call()
    print(f"status codes: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) >= 20 and any(400 <= s < 500 for s in seen), seen
    assert server.get("/health").status_code == 200
    server.wait_idle(within=5.0)


def _servable(case):
    if case.path == "/v1/completions" and isinstance(case.body, dict):
        case.body["model"] = "tiny"
        case.body["prompt"] = [1, 2, 3]
    return case
