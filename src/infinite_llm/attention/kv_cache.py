"""The KV tensors of one instance: the only object that holds them."""

from __future__ import annotations

import torch

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.kernels import gpu
from infinite_llm.memory.block_pool import Tiers


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> Tiers:
    """How many blocks of K and V (all layers) fit the device budget, and the host one."""
    element = torch.tensor([], dtype=dtype).element_size()
    block_bytes = model.kv_bytes_per_token * cache.block_size * element
    return Tiers(cache.kv_cache_memory // block_bytes, cache.host_kv_cache_memory // block_bytes)


class KVCache:
    """K and V for every layer: (layers, blocks, block_size, kv_heads, head_dim) each.

    The host tier's blocks follow the device ones in the same tensors: on a CPU-only
    machine both are host memory, and the tier is a separate budget. A cache built
    whole holds one more block after its pool's: the scratch, where a padded step's rows
    that are no sequence's write their k, v (``scratch_slot``; ``engine.decode_graphs``).
    Several instances' pools in one process are views of one such cache (``joined``)."""

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (model.num_hidden_layers, num_blocks + 1, block_size,
                 model.num_key_value_heads, model.head_dim)
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.base = 0  # this pool's first block in the cache it is a view of
        self.scratch: int | None = num_blocks  # the scratch block (a view has none)

    @staticmethod
    def joined(
        model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
        device: torch.device | str, pools: int,
    ) -> tuple[KVCache, dict[int, KVCache]]:
        """``pools`` pools of ``num_blocks`` blocks as views of one cache: the whole
        (pool i's blocks from ``i * num_blocks`` on, then the scratch) and each pool,
        which knows its ``base`` there. Attention over a sequence whose blocks are in
        several of them then reads the whole through one table."""
        whole = KVCache(model, pools * num_blocks, block_size, dtype, device)
        return whole, {i: whole._view(i * num_blocks, num_blocks) for i in range(pools)}

    def _view(self, base: int, num_blocks: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.block_size, view.base, view.scratch = self.block_size, base, None
        view.k = self.k[:, base : base + num_blocks]
        view.v = self.v[:, base : base + num_blocks]
        return view

    @property
    def scratch_slot(self) -> int:
        """A flat slot no pool's block holds: the scratch block's first."""
        if self.scratch is None:
            raise ValueError("a view of a joined cache has no scratch block: its whole has")
        return self.scratch * self.block_size

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's K and V: (num_blocks, block_size, kv_heads, head_dim)."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens' k, v (N, kv_heads, head_dim) at flat slots block * block_size + offset."""
        k_cache, v_cache = self.layer(layer)
        if gpu.triton_takes(k_cache):  # both in one launch
            gpu.write_kv(k_cache, v_cache, slots, k, v)
            return
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, ids: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of blocks ``ids``, every layer: (layers, len(ids), ...) each."""
        index = torch.tensor(list(ids), dtype=torch.int64, device=self.k.device)
        return self.k.index_select(1, index), self.v.index_select(1, index)

    def scatter(self, ids: tuple[int, ...] | list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V of blocks ``ids`` from ``gather``'s shapes (any device or dtype)."""
        index = torch.tensor(list(ids), dtype=torch.int64, device=self.k.device)
        self.k.index_copy_(1, index, k.to(self.k.device, self.k.dtype))
        self.v.index_copy_(1, index, v.to(self.v.device, self.v.dtype))

    def read_blocks(self, ids: tuple[int, ...] | list[int]) -> torch.Tensor:
        """``gather`` as one flat float32 buffer, K then V: what a migration sends to
        another process."""
        k, v = self.gather(ids)
        return torch.cat([k.reshape(-1).float(), v.reshape(-1).float()])

    def write_blocks(self, ids: tuple[int, ...] | list[int], flat: torch.Tensor) -> None:
        """The inverse of ``read_blocks``."""
        k, v = flat.view(2, self.k.shape[0], len(ids), *self.k.shape[2:])
        self.scatter(ids, k, v)

    def floats_per_block(self) -> int:
        """Floats one block takes in ``read_blocks``' layout (K and V, every layer)."""
        layers, _, block_size, heads, dim = self.k.shape
        return 2 * layers * block_size * heads * dim
