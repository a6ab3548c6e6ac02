"""Per-layer tensor exchange among instance processes: one all-to-all over torch.distributed.

Every instance sends each peer one flat float32 buffer (possibly empty) and receives one
from each; the sizes are known on both sides from the step plan, so no size message is
needed. gloo on CPU (NCCL would serve GPUs the same way).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Exchange:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def __call__(self, send: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        """send[j]: the flat buffer for peer j; returns the buffer received from each peer."""
        send_sizes = [t.numel() for t in send]
        flat = torch.cat([t.reshape(-1).float() for t in send]) if sum(send_sizes) else torch.empty(0)
        recv = torch.empty(sum(recv_sizes))
        dist.all_to_all_single(recv, flat, recv_sizes, send_sizes)
        return list(recv.split(recv_sizes))
