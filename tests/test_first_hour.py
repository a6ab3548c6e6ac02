"""What a new user meets first: errors that say what to do in the user's own terms
(the CLI's flags, the API's fields), refused before anything loads or is allocated, and
a quiet Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from infinite_llm import SamplingParams
from infinite_llm.engine.errors import RequestTooLarge

from test_cluster import tiny_cluster


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinite_llm.cli", *args],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_the_capacity_error_suggests_only_what_would_help(tiny_llama_dir):
    prompt = [list(range(1, 31))]  # 30 tokens
    isolated = tiny_cluster(tiny_llama_dir, 2, 8, kv_pooling=False)  # 32 tokens a request
    with pytest.raises(RequestTooLarge) as refused:
        isolated.generate(prompt, SamplingParams(max_tokens=10), use_tqdm=False)
    message = str(refused.value)
    assert "needs KV cache for 40 tokens" in message and "pooling off" in message
    assert "lower max_tokens to at most 2" in message and "raise kv_cache_memory" in message
    assert "pool the instances' KV (kv_pooling=True)" in message
    assert "number of instances" not in message  # more instances would not help
    pooled = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=0.5)  # 32 + 16 tokens
    with pytest.raises(RequestTooLarge) as refused:
        pooled.generate([list(range(1, 61))], SamplingParams(max_tokens=10), use_tqdm=False)
    message = str(refused.value)
    assert "raise the number of instances" in message and "kv_pooling" not in message
    # A prompt beyond what any output fits: lowering max_tokens is no remedy.
    assert "lower max_tokens" not in message
    for llm in (isolated, pooled):
        snap = llm.engine.snapshot()
        assert all(i.free == i.capacity for i in snap.instances) and not llm.engine.requests


def test_the_cli_names_its_flags_in_the_capacity_error(smollm2_path):
    done = cli("generate", "Hi", "--dtype", "float32", "--kv-cache-memory", "3MiB",
               "--max-tokens", "100")  # 64 tokens of KV
    assert done.returncode == 2, done.stderr
    assert re.search(r"lower --max-tokens to at most 6[0-3]\b", done.stderr)
    assert "raise --kv-cache-memory" in done.stderr and "Traceback" not in done.stderr
    assert "max_tokens" not in done.stderr.replace("--max-tokens", "")


@pytest.mark.parametrize("flag, value, message", [
    ("--max-tokens", "-5", "--max-tokens must be at least 1, got -5"),
    ("--temperature", "-1", "temperature must be non-negative, got -1.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
])
def test_sampling_flags_are_refused_before_the_model_loads(flag, value, message):
    done = cli("generate", "x", "--model", "no-such-model", flag, value, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "cannot load model" not in done.stderr  # nothing was loaded


def test_the_ray_backend_without_ray_names_the_extra():
    script = ("import sys; sys.modules['ray'] = None\n"
              "from infinite_llm.cli import main\n"
              "sys.exit(main(['generate', 'x', '--model', 'no-such-model', '--backend', 'ray']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "pip install 'infinite-llm[ray]'" in done.stderr
    assert "cannot load model" not in done.stderr and "Traceback" not in done.stderr


def test_a_bad_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    done = cli("generate", "x", "--model", str(bad), timeout=60)
    assert done.returncode == 2
    assert f"{bad} is not a readable GGUF model file" in done.stderr
    assert "Traceback" not in done.stderr


def test_engine_errors_name_the_cli_flags():
    done = cli("generate", "x", "--model", "no-such-model", "--max-lend-fraction", "2",
               timeout=60)
    assert done.returncode == 2
    assert "--max-lend-fraction must be in [0, 1], got 2.0" in done.stderr


def test_version():
    done = cli("--version", timeout=60)
    from infinite_llm import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"infinite-llm {__version__}"


def test_ctrl_c_ends_generate_quietly(smollm2_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "infinite_llm.cli", "generate", "Once upon a time",
         "--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-tokens", "4000",
         "--ignore-eos"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal's foreground, whoever started the suite: a suite run in a
        # background job hands its children SIGINT ignored, and Ctrl-C would not reach.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + 60
        # Wait for the model to be generating, then interrupt it as a terminal would.
        while process.poll() is None and time.monotonic() < deadline:
            if os.read(process.stdout.fileno(), 1):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_serve_refuses_a_busy_port_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        done = cli("serve", "no-such-model", "--port", str(port), timeout=60)
    assert done.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr
    assert f"port {port}" in done.stderr and "cannot load model" not in done.stderr
    assert time.monotonic() - start < 30


def test_float16_runs_on_the_cpu_through_pytorch_ops(tiny_llama_dir):
    """The README says float16 is accepted and, on the CPU, computed by PyTorch's ops:
    it runs, and its greedy tokens are float32's (a random tiny model, 8 tokens)."""
    from infinite_llm import LLM

    prompts = [[5, 6, 7, 8, 9], [11] * 12]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for dtype in ("float32", "float16"):
        llm = LLM(str(tiny_llama_dir), dtype=dtype, device="cpu", kv_cache_memory="2MiB")
        assert next(llm.engine.runner.model.parameters()).dtype.is_floating_point
        tokens[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                      use_tqdm=False)]
    assert tokens["float16"] == tokens["float32"]
