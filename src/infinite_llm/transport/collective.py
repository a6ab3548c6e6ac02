"""Per-layer tensor exchange among instance processes: one all-to-all over torch.distributed.

Every instance sends each peer one flat float32 buffer (possibly empty) and receives one
from each; the sizes are known on both sides from the step plan, so no size message is
needed. NCCL moves GPU tensors directly when every instance has a GPU of its own; gloo
moves CPU tensors, and GPU tensors staged through the CPU when instances share a GPU
(one NCCL group cannot hold two ranks on one device).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_for(device: torch.device, own_gpu: bool) -> str:
    """The process-group backend for instances on ``device``."""
    return "nccl" if device.type == "cuda" and own_gpu else "gloo"


class Exchange:
    def __init__(
        self, rank: int, world_size: int, device: torch.device = torch.device("cpu"),
        backend: str = "gloo", instances: list[int] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        # The instance id of each rank, to name the peers when an exchange breaks.
        self.instances = instances if instances is not None else list(range(world_size))
        self.device = device
        # Where the buffers must be for the backend to move them.
        self.wire = device if backend == "nccl" else torch.device("cpu")
        self.waiting = False  # in an exchange, waiting on peers (read by heartbeats)

    def __call__(self, send: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        """send[j]: the flat buffer for peer j (on ``device``); returns the buffer received
        from each peer, on ``device``."""
        send_sizes = [t.numel() for t in send]
        parts = [t.reshape(-1).float() for t in send if t.numel()]
        flat = torch.cat(parts) if parts else torch.empty(0, device=self.device)
        recv = torch.empty(sum(recv_sizes), device=self.wire)
        self.waiting = True
        try:
            dist.all_to_all_single(recv, flat.to(self.wire), recv_sizes, send_sizes)
        except (RuntimeError, dist.DistBackendError) as error:
            peers = [i for r, i in enumerate(self.instances) if r != self.rank]
            raise ExchangeFailed(
                f"instance {self.instances[self.rank]}'s exchange with instance(s) {peers} "
                f"broke: {error}") from error
        finally:
            self.waiting = False
        return list(recv.to(self.device).split(recv_sizes))


class ExchangeFailed(RuntimeError):
    """A per-layer exchange broke: a peer died, stopped, or its connection failed."""
