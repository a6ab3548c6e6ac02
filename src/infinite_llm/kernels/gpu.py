"""Which GPU kernels this machine has: the Triton MicroAttention kernels
(``triton_attention``) on a CUDA device when ``triton`` is installed (the ``gpu`` extra).
Where they are missing the GPU keeps PyTorch's ops (gathered blocks, dense scores),
which compute the same thing."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_kernels_available() -> bool:
    """Triton is installed (imported only when a GPU step first needs it)."""
    if importlib.util.find_spec("triton") is None:
        logger.warning("triton is not installed: GPU attention uses PyTorch ops "
                       "(pip install 'infinite-llm[gpu]')")
        return False
    return True


def paged_attention_supported(device: torch.device | str, dtype: torch.dtype,
                              head_dim: int) -> bool:
    """Whether the Triton kernels take this model's attention on ``device``."""
    return (torch.device(device).type == "cuda" and dtype in _DTYPES and head_dim <= 256
            and triton_kernels_available())


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, kv_len: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query of sequence b over its first kv_len[b] slots, read in place."""
    from infinite_llm.kernels import triton_attention

    return triton_attention.paged_decode(q, k_cache, v_cache, block_table, kv_len, scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt chunk over its own keys, causal: (out, lse), no Q x Q scores."""
    from infinite_llm.kernels import triton_attention

    return triton_attention.causal_attention(q, k, v, scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k[n], v[n] into flat slot slots[n] of one layer's caches, in one launch."""
    from infinite_llm.kernels import triton_attention

    triton_attention.write_kv(k_cache, v_cache, slots, k, v)


def triton_takes(x: torch.Tensor) -> bool:
    """Whether the Triton kernels that take a tensor whole (norm, rotary, SiLU-and-multiply,
    the KV write into a cache) take this one."""
    return x.device.type == "cuda" and x.dtype in _DTYPES and triton_kernels_available()
