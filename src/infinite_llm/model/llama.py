"""A Llama-family decoder in plain PyTorch; attention is one call handed in per step.

Tokens of all scheduled requests are flattened into one sequence of ``N`` tokens; the
model never sees request boundaries. Those live in the ``attend`` callable, which writes
each token's k, v into the KV cache and computes attention over the right blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from infinite_llm.config import ModelConfig
from infinite_llm.kernels.elementwise import kernels_for
from infinite_llm.model.rope import RotaryEmbedding, apply_rotary


class Attend(Protocol):
    """Attention of one layer: q (N, H, D), k and v (N, KVH, D) -> out (N, H, D)."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One pass (PyTorch's bfloat16 rms_norm is a dozen small ops): they add up to
        # milliseconds per decode step.
        if kernels := kernels_for(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the next norm in one
        pass where a kernel takes them, both tensors overwritten (they are the step's own)."""
        kernels = kernels_for(x)
        if kernels and x.is_contiguous() and residual.is_contiguous():
            kernels.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self(residual), residual


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matrix product: one weight read and one op per layer.
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads sit side by side: rotate them in one go.
        rotated = self.num_heads + self.num_kv_heads
        if kernels := kernels_for(qkv):
            kernels.rotary_(qkv, cos, sin, rotated)
            qk = qkv[:, :rotated]
        else:
            qk = apply_rotary(qkv[:, :rotated], cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        out = attend(self.layer, q, k, qkv[:, rotated:])
        return self.o_proj(out.reshape(n, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.gate_up_proj, "applies_silu_and_mul", False):
            # The CPU kernel's gated product: silu(gate) * up in one pass.
            return self.down_proj(self.gate_up_proj(x))
        gate_up = self.gate_up_proj(x)
        if kernels := kernels_for(gate_up):
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, still to be added to the residual stream (the
        embeddings, with no residual yet, for the first layer). Returns this layer's
        output and the residual stream, so that each add goes into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, cos, sin, attend)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attend)
        if residual is None:
            return self.norm(x)
        return self.norm.add_and_norm(x, residual)[0]


# Checkpoint tensors that are stored in one fused parameter: name -> (fused name, shard).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final hidden states (N, hidden) of the flattened tokens."""
        return self.model(input_ids, positions, attend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) in, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            module = parts[-2]
            if module in _FUSED:
                fused, shard = _FUSED[module]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                offset, size = self._shard_range(fused, shard)
                params[target].narrow(0, offset, size).copy_(tensor)
                loaded.add(f"{target}#{shard}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            params[name].copy_(tensor)
            loaded.add(name)
        self._check_complete(params, loaded)

    def _shard_range(self, fused: str, shard: int) -> tuple[int, int]:
        c = self.config
        if fused == "qkv_proj":
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            return [(0, q), (q, kv), (q + kv, kv)][shard]
        return shard * c.intermediate_size, c.intermediate_size

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            shards = {"qkv_proj": 3, "gate_up_proj": 2}.get(parts[-2])
            if shards is None:
                if name not in loaded:
                    missing.append(name)
            else:
                missing += [f"{name}#{i}" for i in range(shards) if f"{name}#{i}" not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(missing[:8])}")
