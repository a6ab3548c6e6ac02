"""One instance as the bookkeeping sees it: its rManager and its scheduler. No torch."""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.core.scheduler import Scheduler
from infinite_llm.memory.rmanager import RManager


@dataclass
class Instance:
    """One replica's memory bookkeeping and scheduling (its tensors live in a runner)."""

    instance_id: int
    rmanager: RManager
    scheduler: Scheduler
