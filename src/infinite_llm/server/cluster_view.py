"""What the cluster looks like from outside: an immutable snapshot of request counts,
every instance's blocks and the gManager's debt ledger.

The engine is not thread-safe, so only the engine thread takes snapshots (after every
step and every batch of commands); /metrics and /v1/cluster read the latest one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infinite_llm.engine.engine import LLMEngine


@dataclass(frozen=True)
class InstanceView:
    instance_id: int
    alive: bool
    capacity: int  # blocks
    free: int
    used: int  # this instance's requests' KV, here
    lent: int  # remote debtors' KV, here
    borrowed: int  # this instance's requests' KV, on creditors
    running: int
    waiting: int


@dataclass(frozen=True)
class ClusterView:
    block_size: int
    max_request_tokens: int
    num_preemptions: int
    instances: tuple[InstanceView, ...]
    ledger: dict[str, Any]  # the gManager's view, as JSON: total debt, per-instance entries

    @property
    def running(self) -> int:
        return sum(i.running for i in self.instances)

    @property
    def waiting(self) -> int:
        return sum(i.waiting for i in self.instances)

    @property
    def dead(self) -> list[int]:
        return [i.instance_id for i in self.instances if not i.alive]

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the live instances' blocks not free (0 to 1)."""
        alive = [i for i in self.instances if i.alive]
        capacity = sum(i.capacity for i in alive)
        return 1.0 - sum(i.free for i in alive) / capacity if capacity else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "max_request_tokens": self.max_request_tokens,
            "num_requests_running": self.running,
            "num_requests_waiting": self.waiting,
            "num_preemptions": self.num_preemptions,
            "kv_cache_usage": self.kv_cache_usage,
            "instances": [asdict(i) for i in self.instances],
            "ledger": self.ledger,
        }


def take_view(engine: LLMEngine) -> ClusterView:
    """Read the cluster's state; call only from the thread that owns the engine."""
    cluster = engine.cluster
    ledger = cluster.ledger()
    instances = tuple(
        InstanceView(
            instance_id=inst.instance_id,
            alive=inst.instance_id not in cluster.dead,
            capacity=inst.rmanager.capacity,
            free=inst.rmanager.num_free,
            used=inst.rmanager.num_used,
            lent=inst.rmanager.num_lent,
            borrowed=sum(inst.rmanager.borrowed_from.values()),
            running=len(inst.scheduler.running),
            waiting=len(inst.scheduler.waiting),
        )
        for inst in cluster.instances
    )
    return ClusterView(
        block_size=engine.block_size,
        max_request_tokens=engine.capacity_tokens,
        num_preemptions=cluster.num_preemptions,
        instances=instances,
        ledger={
            "total_debt": ledger.total_debt,
            "instances": {
                str(iid): {
                    "capacity": entry.capacity,
                    "free": entry.free,
                    "lent_to": {str(k): v for k, v in entry.lent_to.items()},
                    "borrowed_from": {str(k): v for k, v in entry.borrowed_from.items()},
                }
                for iid, entry in ledger.instances.items()
            },
        },
    )
