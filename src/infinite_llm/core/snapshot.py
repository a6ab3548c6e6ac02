"""What the cluster looks like from outside, as immutable values: every instance's
blocks, the gManager's debt ledger, per request its home and how many blocks each
owner holds, and what live migration and DGFM have done. The server, metrics and
benchmarks read these, never the internals. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.memory.gmanager import Ledger


@dataclass(frozen=True)
class InstanceSnapshot:
    instance_id: int
    alive: bool
    capacity: int  # blocks
    free: int
    used: int  # this instance's requests' KV, here
    lent: int  # remote debtors' KV, here
    borrowed: int  # this instance's requests' KV, on creditors
    running: int
    waiting: int
    preemptions: int
    host_capacity: int = 0  # of capacity, blocks in host memory
    host_free: int = 0
    migrated_out: int = 0  # blocks live migration and DGFM copied out of / into it
    migrated_in: int = 0
    computed_tokens: int = 0  # tokens computed for the requests whose home it is


@dataclass(frozen=True)
class RequestSnapshot:
    request_id: str
    home: int
    status: str  # waiting | running
    num_tokens: int
    num_computed_tokens: int
    blocks: tuple[tuple[int, int], ...]  # (owner, blocks of this request it holds)

    @property
    def owners(self) -> tuple[int, ...]:
        return tuple(owner for owner, _ in self.blocks)


@dataclass(frozen=True)
class MigrationEvent:
    """One migration switched into place or given up, or one leg of a cancelled debt
    cycle: ``blocks`` of ``request_id``'s KV from ``source`` to ``target``."""

    step: int  # the migrator's step count when it happened
    kind: str  # migrate (the planner's) | recall (DGFM's) | cycle (a cancelled cycle's leg)
    outcome: str  # moved | aborted
    request_id: str
    source: int
    target: int
    blocks: int


@dataclass(frozen=True)
class MigrationSnapshot:
    """Live migration, DGFM and the planner since the start."""

    in_flight: int  # migrations reserved and not yet switched
    moved_blocks: int  # switched into place (migrations and cancelled cycles)
    aborted: int  # migrations given up (request ended, lease ran out, instance died)
    recalls: int  # migrations DGFM started to bring blocks home (or up from host memory)
    cancelled_cycles: int
    copied_blocks: int = 0  # copies the runners made (aborted migrations' included)
    moved_bytes: int = 0  # what those copies moved, as the runners measured
    stall_s: float = 0.0  # seconds steps spent copying before they could compute
    rehomed: int = 0  # waiting requests the planner gave another home
    recent: tuple[MigrationEvent, ...] = ()  # the latest events, oldest first


@dataclass(frozen=True)
class ClusterSnapshot:
    block_size: int
    max_request_tokens: int
    instances: tuple[InstanceSnapshot, ...]
    requests: tuple[RequestSnapshot, ...]  # every unfinished request
    ledger: Ledger  # the gManager's view, as of the last heartbeat
    migration: MigrationSnapshot
    # Locality, summed over steps: blocks of KV the scheduled requests attended, and of
    # those the ones on an instance other than the request's home.
    attended_block_steps: int = 0
    remote_block_steps: int = 0
    computed_tokens: int = 0  # tokens the runners computed, recomputes after preemption included
    steps: int = 0  # steps scheduled since the start

    @property
    def remote_share(self) -> float:
        """Share of attended KV that lived away from its request's home (0 to 1)."""
        return self.remote_block_steps / self.attended_block_steps if self.attended_block_steps else 0.0

    @property
    def running(self) -> int:
        return sum(i.running for i in self.instances)

    @property
    def waiting(self) -> int:
        return sum(i.waiting for i in self.instances)

    @property
    def num_preemptions(self) -> int:
        return sum(i.preemptions for i in self.instances)

    @property
    def dead(self) -> list[int]:
        return [i.instance_id for i in self.instances if not i.alive]

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the live instances' blocks not free (0 to 1)."""
        alive = [i for i in self.instances if i.alive]
        capacity = sum(i.capacity for i in alive)
        return 1.0 - sum(i.free for i in alive) / capacity if capacity else 1.0

    @property
    def pools_full(self) -> bool:
        """Every live instance has every block free and nobody owes anybody."""
        return self.ledger.total_debt == 0 and all(
            i.free == i.capacity for i in self.instances if i.alive
        )
