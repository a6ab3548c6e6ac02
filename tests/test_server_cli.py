"""`infinite-llm serve` as a process: the helper the other server tests start it with,
and the command line itself (flags, refusals before any model loads)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m infinite_llm.cli serve MODEL ...` on a free loopback port, in its own
    process group; ready once /health says 200; killed with its group on exit."""

    def __init__(
        self, model: str, *flags: str, api_key: str | None = None, start_timeout: float = 180.0,
        file_limit: tuple[int, int] | None = None,
    ) -> None:
        self.port = free_port()
        # Requests carry the key unless a test passes its own headers.
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            flags = (*flags, "--api-key", api_key)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        command = [
            sys.executable, "-m", "infinite_llm.cli", "serve", model,
            "--host", "127.0.0.1", "--port", str(self.port), "--uvicorn-log-level", "warning",
            *flags,
        ]
        def limit_files() -> None:  # (soft, hard) open files, in the child before exec
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, file_limit)

        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=limit_files if file_limit else None,
        )
        self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"the server exited with {code}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.output()}")

    def output(self, whole: bool = False) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return text if whole else text[-6000:]

    def get(self, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        headers = self.auth if headers is None else headers
        return httpx.get(self.url + path, headers=headers, timeout=30.0, **kwargs)

    def post(
        self, path: str, headers: dict | None = None, timeout: float = 60.0, **kwargs
    ) -> httpx.Response:
        headers = self.auth if headers is None else headers
        return httpx.post(self.url + path, headers=headers, timeout=timeout, **kwargs)

    def cluster(self) -> dict:
        return self.get("/v1/cluster").json()

    def wait_idle(self, within: float = 1.0) -> float:
        """Seconds until no request runs or waits, every pool is full and nothing is
        lent; fails after ``within``."""
        start = time.monotonic()
        while True:
            view = self.cluster()
            idle = (
                view["num_requests_running"] == 0
                and view["num_requests_waiting"] == 0
                and all(i["free"] == i["capacity"] for i in view["instances"])
                and view["ledger"]["total_debt"] == 0
            )
            elapsed = time.monotonic() - start
            if idle:
                return elapsed
            assert elapsed < within, f"not idle after {within} s: {view}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        Path(self.log.name).unlink(missing_ok=True)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- the command line ------------------------------------------------------------------


def test_serve_flags_follow_vllm_and_map_to_the_engine():
    from infinite_llm.cli import build_parser

    args = build_parser().parse_args([
        "serve", "smollm2", "--port", "9001", "--instances", "3", "--kv-cache-memory", "64MiB",
        "--max-model-len", "512", "--max-num-seqs", "8", "--api-key", "k",
        "--served-model-name", "a", "b", "--no-kv-pooling", "--max-lend-fraction", "0.25",
    ])
    assert (args.model, args.host, args.port, args.instances) == ("smollm2", "127.0.0.1", 9001, 3)
    assert (args.kv_cache_memory, args.max_model_len, args.max_num_seqs) == ("64MiB", 512, 8)
    assert (args.api_key, args.served_model_name) == ("k", ["a", "b"])
    assert args.kv_pooling is False and args.max_lend_fraction == 0.25
    # generate keeps its --model flag.
    assert build_parser().parse_args(["generate", "hi"]).model == "smollm2"


def test_every_default_is_stated_once_in_the_config():
    """The command line's defaults are EngineConfig's, and the flags map onto it."""
    from infinite_llm.cli import _ENGINE_FLAGS, build_parser
    from infinite_llm.config import EngineConfig, option_default, parse_memory_size

    for command in (["serve", "m"], ["generate", "hi"]):
        args = build_parser().parse_args(command)
        options = {name: getattr(args, name) for name in _ENGINE_FLAGS}
        options["kv_cache_memory"] = parse_memory_size(options["kv_cache_memory"])
        assert options == {name: option_default(name) for name in _ENGINE_FLAGS}
        assert EngineConfig.from_options("m", **options) == EngineConfig("m")
    assert EngineConfig("m").scheduler.max_num_batched_tokens == 8192
    from infinite_llm.config import ServerConfig

    args = build_parser().parse_args(["serve", "m"])
    assert (args.host, args.port, args.uvicorn_log_level, args.drain_timeout) == (
        ServerConfig.host, ServerConfig.port, ServerConfig.log_level, ServerConfig.drain_timeout)
    assert parse_memory_size(args.max_body_size) == ServerConfig.max_body_bytes
    # Every server flag's default is ServerConfig's, under the field's name.
    from infinite_llm.cli import _SERVER_FLAGS

    assert {name: getattr(args, name) for name in _SERVER_FLAGS} == {
        name: getattr(ServerConfig, name) for name in _SERVER_FLAGS}
    with pytest.raises(TypeError, match="unknown option.*kv_cache_mem\\b"):
        EngineConfig.from_options("m", kv_cache_mem="1GiB")
    with pytest.raises(ValueError, match="backend must be one of"):
        EngineConfig.from_options("m", backend="mpi")


def test_a_bad_flag_is_refused_before_the_model_loads():
    result = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "serve", "no-such-model",
         "--max-body-size", "lots"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "cannot parse memory size 'lots'" in result.stderr
    # A limit out of range names its flag, before anything loads.
    result = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "serve", "no-such-model",
         "--max-connections", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--max-connections must be at least 1" in result.stderr
