"""infinite-llm: an LLM serving engine that treats the KV memory of a cluster as one pool."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinite_llm.core.sampling_params import SamplingParams, StructuredOutput
    from infinite_llm.engine.outputs import CompletionOutput, RequestOutput
    from infinite_llm.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

# Resolved on first use, so `import infinite_llm.memory...` (the torch-free bookkeeping
# the simulator reuses) does not load the model stack.
_EXPORTS = {
    "LLM": "infinite_llm.llm",
    "SamplingParams": "infinite_llm.core.sampling_params",
    "StructuredOutput": "infinite_llm.core.sampling_params",
    "RequestOutput": "infinite_llm.engine.outputs",
    "CompletionOutput": "infinite_llm.engine.outputs",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infinite_llm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
