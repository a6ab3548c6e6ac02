"""Which kernels take the decoder's elementwise passes (``rms_norm``, ``add_rms_norm_``,
``silu_and_mul``, ``rotary_``, one contract): the compiled CPU kernels on the CPU, the
Triton ones on a GPU, or none (PyTorch's ops, which compute the same thing)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from infinite_llm.kernels import cpu, gpu


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The module whose elementwise passes take ``x``, or None."""
    if cpu.elementwise_supported(x):
        return cpu
    if gpu.triton_takes(x):
        return _triton()
    return None


@functools.cache
def _triton() -> ModuleType:
    """The Triton kernels' module, imported once (triton only where a GPU asks)."""
    return importlib.import_module("infinite_llm.kernels.triton_elementwise")
