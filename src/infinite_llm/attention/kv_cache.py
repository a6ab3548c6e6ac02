"""The KV tensors of one instance: the only object that holds them."""

from __future__ import annotations

import torch

from infinite_llm.config import CacheConfig, ModelConfig


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """How many blocks of K and V (all layers) fit the memory budget."""
    element = torch.tensor([], dtype=dtype).element_size()
    block_bytes = model.kv_bytes_per_token * cache.block_size * element
    return cache.kv_cache_memory // block_bytes


class KVCache:
    """K and V for every layer: (layers, num_blocks, block_size, kv_heads, head_dim) each."""

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (
            model.num_hidden_layers,
            num_blocks,
            block_size,
            model.num_key_value_heads,
            model.head_dim,
        )
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's K and V: (num_blocks, block_size, kv_heads, head_dim)."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens' k, v (N, kv_heads, head_dim) at flat slots block * block_size + offset."""
        k_cache, v_cache = self.layer(layer)
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def read_blocks(self, ids: list[int]) -> torch.Tensor:
        """K then V of blocks ``ids`` over every layer, flat float32: what a migration
        sends to another process."""
        index = torch.tensor(ids, dtype=torch.int64, device=self.k.device)
        return torch.cat([self.k.index_select(1, index).reshape(-1).float(),
                          self.v.index_select(1, index).reshape(-1).float()])

    def write_blocks(self, ids: list[int], flat: torch.Tensor) -> None:
        """The inverse of ``read_blocks``: blocks ``ids`` from a flat buffer."""
        index = torch.tensor(ids, dtype=torch.int64, device=self.k.device)
        k, v = flat.to(self.k.device).view(2, self.k.shape[0], len(ids), *self.k.shape[2:])
        self.k.index_copy_(1, index, k.to(self.k.dtype))
        self.v.index_copy_(1, index, v.to(self.v.dtype))

    def floats_per_block(self) -> int:
        """Floats one block takes in ``read_blocks``' layout (K and V, every layer)."""
        layers, _, block_size, heads, dim = self.k.shape
        return 2 * layers * block_size * heads * dim

    def copy_blocks(self, source: KVCache, src_ids: list[int], dst_ids: list[int]) -> None:
        """Blocks ``src_ids`` of ``source`` (every layer, K and V) into ``dst_ids`` here:
        a live migration's copy between two pools of this process."""
        src = torch.tensor(src_ids, dtype=torch.int64, device=source.k.device)
        dst = torch.tensor(dst_ids, dtype=torch.int64, device=self.k.device)
        self.k.index_copy_(1, dst, source.k.index_select(1, src).to(self.k.device))
        self.v.index_copy_(1, dst, source.v.index_select(1, src).to(self.v.device))
