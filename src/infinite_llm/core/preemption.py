"""Who gives way when blocks run out across instances: the oldest work always advances.

Instances schedule in the order of their oldest running request, so blocks go to the
oldest work first. A request that cannot grow preempts its own instance's newer
requests (the scheduler does that); when it is itself the newest there, this policy
preempts the newest request elsewhere that is newer than it and holds blocks, and
closes admission for the rest of the step. Without it, requests on different instances
that borrow from each other preempted one another forever. No torch.
"""

from __future__ import annotations

from collections.abc import Callable

from infinite_llm.core.instance import Instance
from infinite_llm.core.request import Request

_IDLE = 1 << 62


class OldestFirst:
    """The cluster's ``Arbiter``: ``preempt`` takes a request off its instance (blocks
    freed, the gManager told) on the policy's word."""

    def __init__(self, preempt: Callable[[Request], None]) -> None:
        self._preempt = preempt
        self._stuck = False

    def order(self, alive: list[Instance]) -> list[Instance]:
        """The order instances schedule in this step: oldest running request first,
        idle instances last. Starts the step: admission opens again."""
        self._stuck = False
        self._alive = alive

        def oldest(inst: Instance) -> tuple[int, int]:
            running = inst.scheduler.running
            return (min(r.arrival for r in running) if running else _IDLE, inst.instance_id)

        return sorted(alive, key=oldest)

    def preempt_newer(self, request: Request) -> bool:
        self._stuck = True
        newer = [
            r
            for inst in self._alive
            if inst.instance_id != request.home
            for r in inst.scheduler.running
            if r.arrival > request.arrival and r.block_table.num_blocks
        ]
        if not newer:
            return False
        self._preempt(max(newer, key=lambda r: r.arrival))
        return True

    def admission_open(self) -> bool:
        return not self._stuck
