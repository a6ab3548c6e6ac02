"""A roofline step-cost model: what one instance's step would take on hardware the
simulator does not have, from the model's shape and the device's data-sheet numbers.

Each part of a step takes the longer of its arithmetic (FLOPs at the reachable fraction
of peak) and its memory traffic (bytes at the reachable fraction of HBM bandwidth); the
parts run one after another. Tensor parallelism over G GPUs splits both FLOPs and bytes
G ways and adds two all-reduces of the activations per layer. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.core.cost_model import CostModel
from infinite_llm.sim.hardware import DeviceSpec, ModelShape

_PARTIAL_BYTES = 4  # a DistAttention partial (sums and running max) travels as float32
_ALLREDUCES_PER_LAYER = 2  # after the attention output projection and after the MLP


@dataclass(frozen=True)
class Roofline:
    """Step times and KV capacity of one instance: ``model`` split over
    ``gpus_per_instance`` GPUs of kind ``device`` by tensor parallelism, with
    ``overhead_s`` of the engine's own bookkeeping (measured elsewhere) in every step."""

    model: ModelShape
    device: DeviceSpec
    gpus_per_instance: int = 1
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        g = self.gpus_per_instance
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"gpus_per_instance must be a positive integer, got {g!r}")
        if not self.overhead_s >= 0:
            raise ValueError(f"overhead_s must be >= 0, got {self.overhead_s!r}")

    @property
    def _flops_per_s(self) -> float:
        """FLOP/s the instance's GPUs reach together."""
        d = self.device
        return self.gpus_per_instance * d.peak_flops * d.compute_efficiency

    @property
    def _bytes_per_s(self) -> float:
        """HBM bytes per second the instance's GPUs reach together."""
        d = self.device
        return self.gpus_per_instance * d.memory_bytes_per_s * d.memory_efficiency

    def _link(self, same_node: bool) -> tuple[float, float]:
        """(latency in s, bytes per s) of one message: NVLink within a node, else the
        network."""
        d = self.device
        if same_node:
            return d.intra_node_latency_s, d.intra_node_bytes_per_s
        return d.inter_node_latency_s, d.inter_node_bytes_per_s

    def _allreduce_terms(self) -> tuple[float, float]:
        """The tensor-parallel all-reduces of a step as (seconds per step, seconds per
        token): a ring all-reduce of ``tokens * hidden`` activations moves
        2 (G - 1) / G of them over each GPU's link; none with a single GPU."""
        g = self.gpus_per_instance
        if g == 1:
            return 0.0, 0.0
        latency, bandwidth = self._link(same_node=g <= self.device.gpus_per_node)
        count = _ALLREDUCES_PER_LAYER * self.model.layers
        token_bytes = self.model.hidden * self.model.dtype_bytes
        return count * latency, count * 2 * (g - 1) / g * token_bytes / bandwidth

    def allreduce_s(self, tokens: int) -> float:
        """Seconds a step of ``tokens`` tokens spends in tensor-parallel all-reduces."""
        per_step, per_token = self._allreduce_terms()
        return per_step + per_token * tokens if tokens > 0 else 0.0

    def exchange_s(self, same_node: bool) -> float:
        """Seconds one (sequence, remote owner) pair adds to a step under DistAttention:
        per layer the query and the new token's key and value go out, and the partial
        (heads * (head_dim + 1) float32 values: weighted sums and their normalizer) comes
        back, two messages over NVLink (``same_node``) or the network."""
        m = self.model
        latency, bandwidth = self._link(same_node)
        out_bytes = (m.heads + 2 * m.kv_heads) * m.head_dim * m.dtype_bytes
        back_bytes = m.heads * (m.head_dim + 1) * _PARTIAL_BYTES
        return m.layers * (2 * latency + (out_bytes + back_bytes) / bandwidth)

    def step_time(
        self, tokens: int, pairs: int, keys: int, sequences: int,
        remote_pairs: int = 0, remote_same_node: bool = True,
    ) -> float:
        """Seconds of one step computing ``tokens`` tokens of ``sequences`` sequences,
        whose attention scores ``pairs`` (query, key) pairs and reads ``keys`` keys' K
        and V from memory (a decode at context c: pairs = keys = c; a prefill chunk of n
        tokens after p: pairs = n p + n (n + 1) / 2, keys = p + n), ``remote_pairs`` of
        whose (sequence, remote owner) pairs exchange partials with another instance
        (on the same node when ``remote_same_node``). ``sequences`` costs nothing apart:
        per-sequence work is in ``overhead_s``. Without tokens of its own an instance
        only serves attention over its KV (to other instances' queries); an empty step
        costs 0."""
        for name, value in (("tokens", tokens), ("pairs", pairs), ("keys", keys),
                            ("sequences", sequences), ("remote_pairs", remote_pairs)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        m = self.model
        attention = max(pairs * m.attention_flops_per_pair / self._flops_per_s,
                        keys * m.kv_bytes_per_token / self._bytes_per_s)
        if tokens == 0:  # no tokens of its own: it only serves attention over its KV
            return attention
        linear = max(tokens * m.matmul_flops_per_token / self._flops_per_s,
                     m.weight_bytes / self._bytes_per_s)
        return (self.overhead_s + linear + attention + self.allreduce_s(tokens)
                + remote_pairs * self.exchange_s(remote_same_node))

    def long_decode_attention_s(self, context: int, shards: int, ring: bool) -> float:
        """Attention of one decode token whose ``context`` keys are spread evenly over
        ``shards`` instances like this one (they fill nodes in order; links as
        ``exchange_s``). DistAttention (``ring`` False): the query goes out to every
        shard at once, each reads its share of the KV, the partials come back and
        merge; one round of messages per layer. RingAttention (``ring`` True), at its
        best for a single query: the query and its running partial travel the ring,
        each shard adding its share in turn (passing the KV instead would move
        gigabytes over links far slower than memory); the shards work one after
        another. Both read the same bytes; the ring serialises them."""
        if context < 1 or shards < 1:
            raise ValueError(f"context and shards must be >= 1, got {context}, {shards}")
        m = self.model
        per_shard = -(-context // shards) * m.kv_bytes_per_token / self._bytes_per_s
        per_node = max(1, self.device.gpus_per_node // self.gpus_per_instance)
        latency, bandwidth = self._link(same_node=shards <= per_node)
        out_bytes = m.heads * m.head_dim * m.dtype_bytes
        back_bytes = m.heads * (m.head_dim + 1) * _PARTIAL_BYTES
        hop = latency + (out_bytes + back_bytes) / bandwidth  # a query with its partial
        if shards == 1:
            return per_shard
        if ring:
            return shards * per_shard + (shards - 1) * hop * m.layers
        return per_shard + 2 * hop * m.layers

    def kv_capacity_tokens(
        self, memory_utilization: float = 0.9, activation_reserve_bytes: int = 0,
    ) -> int:
        """Tokens of KV cache the instance's GPUs hold: the ``memory_utilization``
        fraction of their memory, less the weights and ``activation_reserve_bytes``."""
        if not 0 < memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization!r}")
        if activation_reserve_bytes < 0:
            raise ValueError(f"activation_reserve_bytes must be >= 0, "
                             f"got {activation_reserve_bytes!r}")
        usable = self.gpus_per_instance * self.device.memory_bytes * memory_utilization
        needed = self.model.weight_bytes + activation_reserve_bytes
        if needed >= usable:
            raise ValueError(
                f"{self.model.name} does not fit on {self.gpus_per_instance} x "
                f"{self.device.name}: weights {self.model.weight_bytes} bytes (plus "
                f"{activation_reserve_bytes} reserved) > {usable:.0f} usable bytes "
                f"({memory_utilization} of memory)")
        return int((usable - needed) // self.model.kv_bytes_per_token)

    def cost_model(self) -> CostModel:
        """A linear ``CostModel`` of decode steps for the cluster's planner: the weights'
        read and the all-reduces' latencies per step, a token's matrix products and
        all-reduce bytes per token, a context token's K and V read per context token,
        and the cross-node exchange per remote pair (conservative: it may be on NVLink).

        It sums the linear layers' memory and compute time, the no-overlap bound, where
        ``step_time`` takes the larger of the two (the full-overlap bound); so it
        overestimates decode steps somewhat, small batches included, and at most twice
        (the most near the roofline's ridge, where both times are alike). Attention FLOPs
        are left out: a decode step's attention reads each key once and is memory-bound."""
        m = self.model
        per_step, per_token = self._allreduce_terms()
        return CostModel(
            fixed_s=self.overhead_s + m.weight_bytes / self._bytes_per_s + per_step,
            per_token_s=m.matmul_flops_per_token / self._flops_per_s + per_token,
            per_context_token_s=m.kv_bytes_per_token / self._bytes_per_s,
            per_remote_s=self.exchange_s(same_node=False),
            source={"roofline": self.device.name, "model": m.name,
                    "gpus_per_instance": self.gpus_per_instance},
        )
