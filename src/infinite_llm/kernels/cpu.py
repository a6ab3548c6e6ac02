"""The CPU kernels of ``csrc/cpu_kernels.cpp``, compiled on first use, with their contracts.

Two hot spots of CPU serving have no good PyTorch form: attention over paged blocks
(PyTorch needs them gathered into a padded copy first) and linear layers at the row
counts of decoding (PyTorch's matrix-vector products read weights at ~11-13 GB/s of the
~27 GB/s the memory gives, and MKL repacks the weight on every call, ~70 GFLOP/s at 64
rows where a pre-packed weight gives ~130). The kernels
need x86 AVX2 + FMA and a C++ compiler; where the CPU also has AVX-512 the products run
512 bits wide (about twice the FLOP/s on 2 cores; the same results, bit for bit). They
are built by ``torch.utils.cpp_extension`` on first use (about a minute, said when it starts and ends) and kept in
``~/.cache/infinite-llm/kernels/<key>`` (``$INFINITE_LLM_CACHE`` or ``$XDG_CACHE_HOME``
move it), where the key hashes everything the binary depends on: the source, the
compiler flags, torch's version and build, the Python ABI and the compiler. So every
virtual environment with the same torch loads the same build, and none rebuilds
another's. Where AVX2 or a compiler is missing every caller keeps its PyTorch path,
which computes the same thing, and says so once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_DTYPES = (torch.float32, torch.bfloat16)
# Query rows (queries x heads) of one sequence the attention kernel holds at once.
MAX_QUERY_ROWS = 32


def _has_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


_NAME = "infinite_llm_cpu_kernels"
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def cache_root() -> Path:
    """Where built kernels are kept: ``$INFINITE_LLM_CACHE/kernels``, else under
    ``$XDG_CACHE_HOME`` (``~/.cache``) ``/infinite-llm/kernels``."""
    root = os.environ.get("INFINITE_LLM_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "infinite-llm" / "kernels"


def build_key(source: Path, cflags: tuple[str, ...] = _CFLAGS,
              ldflags: tuple[str, ...] = _LDFLAGS) -> str:
    """What a built binary depends on, hashed: its source, the flags, torch's version
    and build, the Python ABI, the machine and the compiler."""
    digest = hashlib.sha256(source.read_bytes())
    for part in (*cflags, "|", *ldflags, "|", torch.__version__, str(torch.version.git_version),
                 sys.implementation.cache_tag, platform.machine(), os.environ.get("CXX", "c++")):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def build_or_load(source: Path, name: str, root: Path, cflags: tuple[str, ...] = _CFLAGS,
                  ldflags: tuple[str, ...] = _LDFLAGS) -> ModuleType:
    """The extension ``name`` of ``source``, loaded from ``root/<key>`` when it was
    built there before (by any environment), else built (saying so, and how long it
    took) and kept there. Raises what the build raises."""
    key_dir = root / build_key(source, cflags, ldflags)
    binary = key_dir / f"{name}.so"
    if not binary.exists():
        from torch.utils.cpp_extension import load

        logger.warning("building the CPU kernels (once per torch version, about a minute) "
                       "into %s", key_dir)
        start = time.perf_counter()
        build = key_dir / "build"  # torch's own lock guards processes building at once
        build.mkdir(parents=True, exist_ok=True)
        module = load(name=name, sources=[str(source)], extra_cflags=list(cflags),
                      extra_ldflags=list(ldflags), build_directory=str(build))
        if not binary.exists():  # whole or absent: copied aside, then renamed into place
            partial = key_dir / f".{name}.{os.getpid()}.so"
            shutil.copyfile(build / f"{name}.so", partial)
            os.replace(partial, binary)
        logger.warning("CPU kernels built in %.0f s", time.perf_counter() - start)
        return module
    spec = importlib.util.spec_from_file_location(name, binary)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {binary}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None when this machine cannot build or run it (said
    once)."""
    if not _has_avx2_fma():
        logger.warning("this CPU has no AVX2 + FMA: the CPU kernels are off, PyTorch ops "
                       "compute instead")
        return None
    try:
        return build_or_load(_SOURCE, _NAME, cache_root())
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a build error: keep PyTorch's path
        logger.warning("CPU kernels unavailable, using PyTorch ops instead: %s", error)
        return None


def paged_decode_supported(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int, block_size: int
) -> bool:
    """Whether ``paged_decode_attention`` takes one query per sequence of this model and cache."""
    return (
        torch.device(device).type == "cpu"
        and dtype in _DTYPES
        and head_dim % 8 == 0
        and head_dim <= 256
        and block_size <= 64
        and num_heads <= MAX_QUERY_ROWS
        and cpu_kernels() is not None
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of sequence b attends to the first kv_len[b] slots of its blocks,
    read in place. Returns out (B, Q, H, D) in q's dtype and lse (B, Q, H) in float32;
    kv_len[b] == 0 gives out 0 and lse -inf."""
    return paged_decode_attention_owners(q, [(k_cache, v_cache, block_table, kv_len)], scale)


def paged_decode_attention_owners(
    q: torch.Tensor,
    owners: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same over several pools at once: ``owners`` is a list of (k_cache, v_cache,
    block_table, kv_len), one per owner. Equal to merging each owner's partial, in one
    pass (the online softmax runs on from one owner's blocks to the next)."""
    k_caches, v_caches, tables, lengths = (list(x) for x in zip(*owners))
    out, lse = cpu_kernels().paged_decode_attention(q, k_caches, v_caches, tables, lengths, scale)
    return out, lse


def linear_packed_supported(dtype: torch.dtype) -> bool:
    """Whether ``pack_weight`` / ``linear_packed`` take CPU weights of this dtype."""
    return dtype in _DTYPES and cpu_kernels() is not None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight (N, K), laid out once for ``linear_packed``:
    (ceil(N / 16), K, 16) in its own dtype, zero past N."""
    return cpu_kernels().pack_weight(weight)


def linear_packed(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
    vector_bits: int = 0,
) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias from the packed weight, for any M: float32
    arithmetic, the result in x's dtype. ``vector_bits``: 512 or 256 picks the AVX-512 or
    the AVX2 tiles (equal results, bit for bit), 0 the widest this CPU has."""
    return cpu_kernels().linear_packed(x, packed, bias, out_features, vector_bits)


def pack_gate_up(weight: torch.Tensor, intermediate: int) -> torch.Tensor:
    """The MLP's fused weight [gate; up] (2 * I, K), laid out for ``linear_silu``: the
    packed panels of gate and of up, interleaved (gate 16i.., up 16i.., gate 16(i+1)..)."""
    gate = pack_weight(weight[:intermediate])
    up = pack_weight(weight[intermediate:])
    return torch.stack([gate, up], dim=1).flatten(0, 1).contiguous()


def linear_silu(
    x: torch.Tensor, packed: torch.Tensor, intermediate: int, vector_bits: int = 0
) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) (M, I) from ``pack_gate_up``'s weight: the gate and up
    products and SiLU-and-multiply in one pass, as ``silu_and_mul(linear_packed(...))``
    (``vector_bits`` as there)."""
    return cpu_kernels().linear_silu(x, packed, intermediate, vector_bits)


def has_avx512() -> bool:
    """Whether the products run on AVX-512 tiles here (else AVX2, or no kernels)."""
    kernels = cpu_kernels()
    return kernels is not None and bool(kernels.has_avx512())


def elementwise_supported(x: torch.Tensor) -> bool:
    """Whether ``rms_norm``, ``silu_and_mul`` and ``rotary_`` take this tensor."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and cpu_kernels() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm over the last dimension (normalised in float32, as Hugging Face)."""
    return cpu_kernels().rms_norm(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = rms_norm(residual) (contiguous, one shape)."""
    cpu_kernels().add_rms_norm_(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2 * I) = [gate | up] -> silu(gate) * up (..., I)."""
    return cpu_kernels().silu_and_mul(x)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate, in place, the first ``heads`` heads of x (N, all heads, D) by each token's
    cos, sin (N, 1, D), in the rotate-half layout."""
    cpu_kernels().rotary_(x, cos, sin, heads)


def prefill_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``prefill_attention`` takes this model's q, k, v."""
    return (
        torch.device(device).type == "cpu"
        and dtype in _DTYPES
        and head_dim % 16 == 0
        and head_dim <= 256
        and cpu_kernels() is not None
    )


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqs: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> None:
    """Causal attention of whole sequences over their own keys, from the flat rows.

    q (N, H, D), k and v (N, KVH, D) may be strided views of a fused qkv; ``seqs`` (S, 2)
    holds each sequence's first row and length; token t of a sequence sees its keys
    0..t. Fills those rows of ``out`` (N, H, D, contiguous) and of ``lse`` (N, H) if given.
    """
    cpu_kernels().prefill_attention(q, k, v, seqs, scale, out, lse)
