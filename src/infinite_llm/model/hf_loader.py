"""Config, tokenizer and weights from a Hugging Face model directory (`save_pretrained` layout)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from infinite_llm.config import ModelConfig, RopeScaling
from infinite_llm.model.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_SCALING_FIELDS = (
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from transformers 5's `rope_parameters` or the older two fields."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    fields = {k: params[k] for k in _ROPE_SCALING_FIELDS if params.get(k) is not None}
    return float(theta), RopeScaling(rope_type=kind, **fields)


class HFDirectory:
    """A model directory with config.json and safetensors (or one pytorch_model.bin) weights."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        config = _read_json(self.path / "config.json")
        if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{path}: model_type {config.get('model_type')!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.config = self._model_config(config)
        self._files = sorted(self.path.glob("*.safetensors")) or [self.path / "pytorch_model.bin"]
        if not self._files[0].is_file():
            raise ValueError(f"{path}: no *.safetensors or pytorch_model.bin weights")
        self._names = {f: list(filter(self._wanted, self._file_names(f))) for f in self._files}

    def _model_config(self, config: dict[str, Any]) -> ModelConfig:
        heads = config["num_attention_heads"]
        theta, scaling = _rope(config)
        # generation_config.json often lists more stop tokens (Llama 3 Instruct's <|eot_id|>).
        generation = _read_json(self.path / "generation_config.json")
        eos = _token_ids(config.get("eos_token_id")) + _token_ids(generation.get("eos_token_id"))
        return ModelConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases and its config does not say so.
            attention_bias=config["model_type"] == "qwen2" or config.get("attention_bias", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )

    def _wanted(self, name: str) -> bool:
        # Old checkpoints store rotary caches; tied checkpoints sometimes store lm_head anyway.
        if name.endswith("rotary_emb.inv_freq"):
            return False
        return not (self.config.tie_word_embeddings and name == "lm_head.weight")

    @staticmethod
    def _file_names(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", mmap=True, weights_only=True))

    def tokenizer(self) -> Tokenizer | None:
        return Tokenizer.from_directory(self.path)

    @property
    def num_tensors(self) -> int:
        return sum(len(names) for names in self._names.values())

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file, names in self._names.items():
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name).float()
            else:
                # mmap keeps the file on disk; tensors are read as they are cast.
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                for name in names:
                    yield name, state.pop(name).float()
