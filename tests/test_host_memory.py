"""The host allocator keeps freed memory for reuse, unless the user says otherwise; what
loading the model freed goes back at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes, ctypes.util, sys
from infinite_llm.engine.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory()
print(applied)
if applied:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
    big = libc.malloc(64 << 20)
    print(libc.mallinfo2().hblkhd - before)  # none more: the block came from the heap
    libc.free(big)
    print(libc.mallinfo2().fordblks >= 64 << 20)  # freed, and kept
"""


def run_check(**env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", CHECK], env=full, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_stay_in_the_heap():
    assert run_check() == ["True", "0", "True"]


def test_the_user_can_opt_out_or_set_glibc_themselves():
    assert run_check(INFINITE_LLM_KEEP_HOST_MEMORY="0") == ["False"]
    assert run_check(MALLOC_TRIM_THRESHOLD_="1000000") == ["False"]


LOAD = """
import sys
from infinite_llm import LLM
from infinite_llm.engine.host_memory import resident_bytes, trim_host_memory
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
before = resident_bytes()
trim_host_memory()
print((before - resident_bytes()) >> 20)  # MiB a trim would still give back
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_what_loading_freed_is_given_back(smollm2_path):
    """Dequantizing a GGUF makes copies that are freed once the model is built: a
    heap set to keep freed memory would hold them for good (~400 MB for SmolLM2-135M
    in float32), and giving them back later, while serving, stalls other threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", LOAD, str(smollm2_path)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 32
