"""The server against hostile clients: input bounded before it costs anything (huge
prompts refused on their length while /health keeps answering, and the memory they
took given back), fan-out, stop strings and output tokens bounded with the limit in
the message, idle and slow connections closed, the soft file limit raised and a
failing accept logged once per interval instead of a traceback per try."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from test_server_cli import ServerProcess, assert_openai_error

NAME = "smollm2"


@pytest.fixture(scope="module")
def server(smollm2_path):
    process = ServerProcess(
        "smollm2", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "2048",
        "--timeout-keep-alive", "2", "--request-read-timeout", "2",
    )
    yield process
    process.kill()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


_POLL_HEALTH = """
import sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
slowest, client, end = 0.0, httpx.Client(), time.monotonic() + seconds
while time.monotonic() < end:
    start = time.perf_counter()
    assert client.get(url + "/health").status_code == 200
    slowest = max(slowest, time.perf_counter() - start)
    time.sleep(0.01)
print(slowest)
"""


def test_huge_prompts_are_refused_at_once_while_health_answers_and_memory_comes_back(server):
    start_mb = rss_mb(server.proc.pid)
    bodies = {size: json.dumps({"model": NAME, "prompt": "word " * (size // 5),
                                "max_tokens": 4}).encode()
              for size in (2_000_000, 15_000_000)}
    # /health, asked every 10 ms from another process the whole time.
    poller = subprocess.Popen([sys.executable, "-c", _POLL_HEALTH, server.url, "8"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for size in [2_000_000] * 20 + [15_000_000]:
        began = time.perf_counter()
        response = server.post("/v1/completions", content=bodies[size],
                               headers={"Content-Type": "application/json"})
        took = time.perf_counter() - began
        error = assert_openai_error(response, 400)
        assert f"the prompt has {size} characters" in error["message"]
        assert "2048 tokens of context" in error["message"] and "--max-prompt-chars" in error["message"]
        assert took < 1.0, f"a {size}-character prompt took {took:.2f} s to refuse"
    # The same bound on /tokenize and on a conversation.
    response = server.post("/tokenize", content=bodies[2_000_000],
                           headers={"Content-Type": "application/json"})
    assert "characters" in assert_openai_error(response, 400)["message"]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "word " * 400_000}]}
    response = server.post("/v1/chat/completions", json=chat)
    assert "characters" in assert_openai_error(response, 400)["message"]
    slowest = float(poller.communicate(timeout=30)[0])
    assert slowest < 0.1, f"/health took {slowest * 1e3:.0f} ms while prompts were refused"
    # An idle server gives back what they took (every few seconds): within 100 MB.
    deadline = time.monotonic() + 20
    while rss_mb(server.proc.pid) > start_mb + 100:
        assert time.monotonic() < deadline, (
            f"RSS {rss_mb(server.proc.pid):.0f} MB, {start_mb:.0f} MB before the prompts")
        time.sleep(0.5)
    # A prompt that fits still works.
    ok = server.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize("body, limit", [
    ({"prompt": [[5]] * 500, "n": 128}, "asks for 500 prompt(s) x n=128 = 64000 completions; "
     "this server takes at most 256 a request (--max-completions-per-request)"),
    ({"prompt": ["a", "b", "c"], "n": 100}, "= 300 completions"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(10_000)]},
     "10000 stop strings; this server takes at most 64 (--max-stop-strings)"),
    ({"prompt": "hi", "stop": "x" * 5000},
     "a stop string of 5000 characters; this server takes at most 1024 (--max-stop-string-chars)"),
    ({"prompt": [[5]] * 100, "n": 2, "max_tokens": 6000},
     "may generate 1200000 tokens together (max_tokens x completions); this server takes at "
     "most 1048576 a request (--max-output-tokens-per-request)"),
])
def test_fan_out_stop_strings_and_output_tokens_are_bounded(server, body, limit):
    began = time.perf_counter()
    error = assert_openai_error(server.post("/v1/completions", json={"model": NAME, **body}), 400)
    assert limit in error["message"]
    assert time.perf_counter() - began < 2.0


def test_idle_connections_and_a_slow_body_leave_the_server_serving(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 200\r\n\r\n{\"prompt\": ")
    try:
        # Served meanwhile, each at once.
        for _ in range(5):
            began = time.perf_counter()
            response = server.post("/v1/completions",
                                   json={"model": NAME, "prompt": "Hi", "max_tokens": 1})
            assert response.status_code == 200 and time.perf_counter() - began < 5
        # The slow body: 408 after --request-read-timeout (2 s).
        slow.settimeout(10)
        assert slow.recv(64).startswith(b"HTTP/1.1 408")
        # The idle connections: closed after --timeout-keep-alive (2 s).
        time.sleep(3)
        closed = 0
        for sock in idle:
            sock.settimeout(2)
            try:
                closed += sock.recv(16) == b""
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed == len(idle)
    finally:
        for sock in [*idle, slow]:
            sock.close()


def test_a_soft_file_limit_is_raised_to_the_hard_one(tiny_llama_dir):
    process = ServerProcess(str(tiny_llama_dir), "--kv-cache-memory", "1MiB",
                            file_limit=(256, 4096))
    try:
        with open(f"/proc/{process.proc.pid}/limits") as limits:
            row = next(line for line in limits if line.startswith("Max open files"))
        assert row.split()[3:5] == ["4096", "4096"]
        idle = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(300)]
        try:
            assert process.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2},
                                timeout=30).status_code == 200
        finally:
            for sock in idle:
                sock.close()
    finally:
        process.kill()


def test_out_of_file_descriptors_the_server_logs_once_and_recovers(tiny_llama_dir):
    process = ServerProcess(str(tiny_llama_dir), "--kv-cache-memory", "1MiB",
                            "--timeout-keep-alive", "2", file_limit=(256, 256))
    try:
        log_before = len(process.output(whole=True))
        sockets = []
        for _ in range(400):  # more than the process may open: its accepts fail
            try:
                sockets.append(socket.create_connection(("127.0.0.1", process.port), timeout=1))
            except OSError:
                break
        time.sleep(3)
        grown = len(process.output(whole=True)) - log_before
        assert grown < 20_000, f"the log grew {grown} bytes in 3 s"
        assert "socket.accept() out of system resource" in process.output()
        for sock in sockets:
            sock.close()
        time.sleep(1)
        response = process.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2},
                                timeout=30)
        assert response.status_code == 200
    finally:
        process.kill()


def test_accept_failures_pass_once_an_interval_with_a_count():
    from infinite_llm.server.launch import AcceptErrorsOnce

    now = [100.0]
    gate = AcceptErrorsOnce(interval_s=10, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                                 (OSError, OSError(24, "Too many open files"), None))

    first = record("socket.accept() out of system resource")
    assert gate.filter(first) and first.exc_info is None
    assert not any(gate.filter(record("socket.accept() out of system resource"))
                   for _ in range(500))
    assert gate.filter(record("something else entirely"))
    now[0] += 10
    again = record("socket.accept() out of system resource")
    assert gate.filter(again) and "(500 more since the last report)" in again.getMessage()
