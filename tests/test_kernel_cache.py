"""Where the CPU kernels are built and kept: once per (source, flags, torch, Python,
compiler), said while it happens, shared by every environment with the same torch; a
machine that cannot build them still runs, and says so once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from infinite_llm.kernels.cpu import _has_avx2_fma, build_key

pytestmark = pytest.mark.skipif(not _has_avx2_fma(), reason="the kernels need x86 AVX2 + FMA")

_TINY = textwrap.dedent("""
    #include <torch/extension.h>
    torch::Tensor twice(torch::Tensor x) { return x * 2; }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
""")

_LOAD = textwrap.dedent("""
    import logging, sys, torch
    from pathlib import Path
    from infinite_llm.kernels.cpu import build_or_load
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = build_or_load(Path(sys.argv[1]), "tiny_ext", Path(sys.argv[2]), cflags=("-O1",),
                           ldflags=())
    print(module.twice(torch.ones(3)).tolist())
""")


def _load(source, root, env=None):
    return subprocess.run([sys.executable, "-c", _LOAD, str(source), str(root)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_a_kernel_is_built_once_said_and_loaded_by_the_next_process(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(_TINY)
    root = tmp_path / "cache"
    first = _load(source, root)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "[2.0, 2.0, 2.0]"
    assert "building the CPU kernels (once per torch version, about a minute)" in first.stderr
    assert "CPU kernels built in" in first.stderr
    key = build_key(source, ("-O1",), ())
    assert (root / key / "tiny_ext.so").exists()
    # Another process (another environment with this torch): loads, builds nothing.
    second = _load(source, root)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "building" not in second.stderr and "built" not in second.stderr
    # What the binary depends on changes its key: a new source is built apart.
    source.write_text(_TINY.replace("x * 2", "x + x"))
    assert build_key(source, ("-O1",), ()) != key
    assert build_key(source, ("-O2",), ()) != build_key(source, ("-O1",), ())


def test_without_a_compiler_the_engine_runs_on_pytorch_ops_and_says_so_once(
        tiny_llama_dir, tmp_path):
    env = {**os.environ, "CXX": "/bin/false", "INFINITE_LLM_CACHE": str(tmp_path)}
    script = textwrap.dedent(f"""
        import logging
        from infinite_llm import LLM, SamplingParams
        from infinite_llm.kernels.cpu import cpu_kernels
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        llm = LLM({str(tiny_llama_dir)!r}, dtype="float32", device="cpu",
                  kv_cache_memory="4MiB")
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
        assert cpu_kernels() is None
        print(len(out[0].outputs[0].token_ids))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
    assert done.stderr.count("CPU kernels unavailable, using PyTorch ops instead") == 1
