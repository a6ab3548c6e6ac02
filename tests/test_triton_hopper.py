"""Every Triton kernel of the GPU path compiles to H100/H200 machine code (sm_90) in each
form the engine launches at SmolLM2's shapes (and the tiny test Llama's, which
tests/test_cuda.py runs there), with nothing spilled to local memory.
Triton compiles for a named target without a GPU, so this runs on any machine: a
session lent a GPU does not find a kernel that only the interpreter accepts (it checks
neither tensor-core shapes nor registers).

The forms are recorded, not restated: the kernels' Python wrappers run with the
launches caught (nothing computed), and each launch's argument types, alignments and
compile-time constants are compiled as a GPU launch would compile them."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
triton_attention = pytest.importorskip("infinite_llm.kernels.triton_attention")
triton_elementwise = pytest.importorskip("infinite_llm.kernels.triton_elementwise")

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 9, 3, 64, 576, 1536  # SmolLM2-135M
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.int32: "*i32", torch.int64: "*i64"}


class Launches:
    """Stands in for a kernel: records each launch's arguments, runs nothing."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name = module.__name__, name
        self.params = inspect.signature(getattr(module, name).fn).parameters
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({**dict(zip(self.params, args)), **kwargs})
        return launch

    def forms(self) -> dict[str, dict]:
        """Each distinct launch as a GPU would compile it: pointers and ints typed, those
        divisible by 16 marked so (Triton's own specialisation), constants fixed."""
        forms = {}
        for call in self.calls:
            signature, constants, divisible = {}, {}, []
            for i, (name, param) in enumerate(self.params.items()):
                value = call[name]
                if "constexpr" in str(param.annotation):
                    signature[name], constants[name] = "constexpr", value
                    continue
                if isinstance(value, torch.Tensor):
                    signature[name] = POINTER[value.dtype]
                    aligned = value.data_ptr() % 16 == 0
                elif isinstance(value, int):
                    signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                    aligned = value % 16 == 0
                else:
                    signature[name], aligned = "fp32", False
                if aligned:
                    divisible.append(i)
            form = dict(module=self.module, name=self.name, signature=signature,
                        constants=constants, divisible=divisible)
            forms[json.dumps(form, sort_keys=True)] = form
        return forms


# Compiles each form given on stdin for sm_90 and prints what the assembler says of
# each: bytes spilled to local memory and registers used (or the error). In a process of its own: Triton cannot compile for a GPU where
# its interpreter is on, as it is for the other tests on a machine without one.
COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

ptxas = get_ptxas(90).path  # the assembler Triton itself uses for sm_90
results = []
for form in json.load(sys.stdin):
    fn = getattr(importlib.import_module(form["module"]), form["name"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in form["divisible"]}
    try:
        compiled = triton.compile(ASTSource(fn, form["signature"], form["constants"], attrs),
                                  target=GPUTarget("cuda", 90, 32))
    except Exception as error:
        results.append("error: " + repr(error)[-2000:])
        continue
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    results.append(" ".join(re.findall(r"\d+ bytes spill (?:stores|loads)|Used \d+ registers",
                                       log)))
print(json.dumps(results))
"""


def record(monkeypatch, module, name: str) -> Launches:
    launches = Launches(module, name)
    monkeypatch.setattr(module, name, launches)
    return launches


def attention_launches(monkeypatch, dtype: torch.dtype):
    """The attention kernels' launches, as a GPU makes them (tensor-core products, the
    default tile of blocks), at SmolLM2's heads in blocks of 16 and at the tiny test
    Llama's (6 heads over 2 of 16, blocks of 4: tests/test_cuda.py's): decodes of 1 and
    64 sequences (one split, and split-KV with its merge) with the tables a CUDA graph
    step (int64) and an op-by-op step (int32) bring, a prompt chunk's history (16 queries
    a tile), a chunk over its own keys (causal), and the KV writes."""
    attention = record(monkeypatch, triton_attention, "_paged_attention_kernel")
    merge = record(monkeypatch, triton_attention, "_merge_kernel")
    write = record(monkeypatch, triton_attention, "_write_kv_kernel")
    for heads, kv_heads, head_dim, block_size in ((HEADS, KV_HEADS, HEAD_DIM, 16), (6, 2, 16, 4)):
        qkv = torch.empty(64, heads + 2 * kv_heads, head_dim, dtype=dtype)
        k_cache = torch.empty(4096, block_size, kv_heads, head_dim, dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        for batch, width, splits in ((1, 16, 1), (1, 512, 8), (64, 512, 3)):
            q = qkv[:batch, :heads].unsqueeze(1)
            for index in (torch.int64, torch.int32):
                table = torch.zeros(batch, width, dtype=index)
                kv_len = torch.full((batch,), width * block_size, dtype=index)
                triton_attention.paged_attention(q, k_cache, v_cache, table, None, kv_len,
                                                 None, 0.125, num_splits=splits, use_dot=True)
        chunk = qkv[:48, :heads].view(3, 16, heads, head_dim)  # 3 chunks of 16 queries
        triton_attention.paged_attention(chunk, k_cache, v_cache,
                                         torch.zeros(3, 64, dtype=torch.int32), None,
                                         torch.full((3,), 200, dtype=torch.int32), None, 0.125,
                                         use_dot=True)
        triton_attention.causal_attention(chunk, qkv[:48, heads:heads + kv_heads].reshape(
            3, 16, kv_heads, head_dim), qkv[:48, heads + kv_heads:].reshape(3, 16, kv_heads,
                                                                            head_dim),
                                          0.125, use_dot=True)
        triton_attention.write_kv(k_cache, v_cache, torch.zeros(64, dtype=torch.int64),
                                  qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:])
    return [attention, merge, write]


def elementwise_launches(monkeypatch, dtype: torch.dtype):
    """The norm, residual-add-and-norm, SiLU-and-multiply and rotary launches of a
    decode step of 64 rows at SmolLM2's sizes."""
    kernels = [record(monkeypatch, triton_elementwise, name)
               for name in ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel")]
    x, residual = torch.empty(64, HIDDEN, dtype=dtype), torch.empty(64, HIDDEN, dtype=dtype)
    weight = torch.empty(HIDDEN, dtype=dtype)
    triton_elementwise.rms_norm(x, weight, 1e-5)
    triton_elementwise.add_rms_norm_(x, residual, weight, 1e-5)
    triton_elementwise.silu_and_mul(torch.empty(64, 2 * INTERMEDIATE, dtype=dtype))
    qkv = torch.empty(64, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=dtype)
    cos = torch.empty(64, HEAD_DIM, dtype=dtype)
    triton_elementwise.rotary_(qkv, cos, torch.empty_like(cos), HEADS + KV_HEADS)
    return kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("which", [attention_launches, elementwise_launches],
                         ids=["attention", "elementwise"])
def test_each_launch_compiles_for_hopper_without_spilling(monkeypatch, dtype, which):
    forms = {}
    for kernel in which(monkeypatch, dtype):
        assert kernel.calls, kernel.name
        forms.update(kernel.forms())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(list(forms.values())),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for form, usage in zip(forms.values(), json.loads(done.stdout.splitlines()[-1])):
        what = (form["name"], form["constants"], form["signature"])
        assert not usage.startswith("error"), (what, usage)
        assert "0 bytes spill stores" in usage, (what, usage)  # every value in registers
