"""Where the model and the KV cache live, and in which dtype: user-facing names resolved once."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def torch_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when this process sees a GPU, else CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``; a GPU that is not there is refused here, before any weight loads."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for, but this PyTorch ({torch.__version__}) sees no "
                "CUDA GPU; use device='cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of a user-facing name. ``"auto"`` is float32 on CPU (exact, and the CPU
    kernels are fastest there for small models) and bfloat16 on GPUs, as in vLLM."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {['auto', *sorted(_DTYPES)]}")
    return _DTYPES[name]
