"""Config, tokenizer and weights from a llama.cpp GGUF file (archs `llama` and `qwen2`).

Every tensor is dequantized to float32 with the `gguf` package's own kernels, renamed to Hugging
Face Llama names and, for `llama`, un-permuted, so the result equals what transformers loads from
the same file.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from infinite_llm.config import ModelConfig, RopeScaling
from infinite_llm.model.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<part>\w+)\.(?P<kind>weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors HF models do not have."""
    match = _TENSOR_NAME.fullmatch(gguf_name)
    if match is None:
        return None
    layer, part, kind = match.group("layer", "part", "kind")
    if layer is None:
        return f"{_GLOBAL_NAMES[part]}.{kind}" if part in _GLOBAL_NAMES else None
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row reorder for the `llama` arch.

    Its converter turns each head's rows from HF's rotate-half layout (first half, second half)
    into interleaved pairs, `w.reshape(h, 2, d // h // 2, ...).swapaxes(1, 2)`; this is the
    inverse, the same as transformers' `reverse_permute_weights`.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _Reader(gguf.GGUFReader):
    """GGUFReader parsing a plain ndarray view of its np.memmap: about 3x faster to open.

    The reader slices its buffer once per metadata value (~150k for a 49k vocabulary), and
    np.memmap's Python-level slicing hooks dominate that; a plain view of the same mapping has none.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "data" and isinstance(value, np.memmap):
            value = value.view(np.ndarray)
        super().__setattr__(name, value)


class GGUFFile:
    """A parsed GGUF file; tensors are dequantized only when `weights()` walks them."""

    def __init__(self, path: str) -> None:
        try:
            reader = _Reader(path)
            self.metadata: dict[str, Any] = {
                k: field.contents() for k, field in reader.fields.items()
            }
            self.arch: str = self.metadata["general.architecture"]
        except (ValueError, KeyError, IndexError, OSError) as error:
            # A truncated, corrupt or foreign file: gguf's own message names no file.
            raise ValueError(f"{path} is not a readable GGUF model file ({error})") from error
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"{path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        # Keep only the tensors (views on the memory-mapped file): the parsed metadata fields hold
        # hundreds of thousands of small arrays for the vocabulary.
        self._tensors = [t for t in reader.tensors if hf_tensor_name(t.name) is not None]
        ignored = [t.name for t in reader.tensors if hf_tensor_name(t.name) is None]
        if ignored:
            warnings.warn(
                f"{path}: ignoring GGUF tensors with no Hugging Face counterpart: {ignored}",
                stacklevel=2,
            )
        self.config = self._model_config()

    def _model_config(self) -> ModelConfig:
        meta, arch = self.metadata, self.arch
        heads = meta[f"{arch}.attention.head_count"]
        hidden = meta[f"{arch}.embedding_length"]
        rotary_dim = meta.get(f"{arch}.rope.dimension_count", hidden // heads)
        tensors = {t.name: t for t in self._tensors}
        tokens = meta.get("tokenizer.ggml.tokens")
        # Files without a vocabulary still have the embedding, whose GGUF dims are (hidden, vocab).
        vocab_size = len(tokens) if tokens else int(tensors["token_embd.weight"].shape[1])
        # llama.cpp stops on any end-of-generation token, not only on EOS.
        eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=meta[f"{arch}.feed_forward_length"],
            num_hidden_layers=meta[f"{arch}.block_count"],
            num_attention_heads=heads,
            num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
            head_dim=meta.get(f"{arch}.attention.key_length", rotary_dim),
            rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
            rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
            rope_scaling=self._rope_scaling(),
            max_position_embeddings=meta[f"{arch}.context_length"],
            # llama.cpp writes the output projection only when it is not the embedding matrix.
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
        )

    def _rope_scaling(self) -> RopeScaling:
        meta, arch = self.metadata, self.arch
        legacy_factor = meta.get(f"{arch}.rope.scale_linear")  # files from before rope.scaling.*
        kind = meta.get(f"{arch}.rope.scaling.type", "none" if legacy_factor is None else "linear")
        if kind == "none":
            return RopeScaling()
        if kind != "linear":
            raise ValueError(f"GGUF rope scaling {kind!r} is not supported (only 'linear')")
        factor = meta.get(f"{arch}.rope.scaling.factor", legacy_factor)
        return RopeScaling(rope_type="linear", factor=float(factor))

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the metadata describes; None for files without one (test files)."""
        if "tokenizer.ggml.model" not in self.metadata:
            return None
        return Tokenizer.from_gguf_metadata(self.metadata)

    @property
    def num_tensors(self) -> int:
        return len(self._tensors)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) pairs, one tensor dequantized at a time."""
        config = self.config
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        for tensor in self._tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            # GGUF lists dims fastest-first (ne0 = input features); numpy and torch are row-major.
            values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
            part = tensor.name.split(".")[-2]
            if self.arch == "llama" and part in heads:
                values = unpermute_rotary(values, heads[part])
            # Copy what is still a read-only view of the mapped file, so torch owns writable memory.
            values = np.require(values, dtype=np.float32, requirements=["C", "W"])
            yield hf_tensor_name(tensor.name), torch.from_numpy(values)
