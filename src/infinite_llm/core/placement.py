"""Where a new request lives: its home instance, which schedules it and runs its
non-attention layers. A policy with one method, so a planner can take its place. No torch."""

from __future__ import annotations

from typing import Protocol

from infinite_llm.core.load import KVLoad
from infinite_llm.core.request import Request


class Placement(Protocol):
    def home(self, request: Request, alive: list[int], load: KVLoad) -> int:
        """The home of ``request`` among the ``alive`` instance ids."""
        ...


class LeastLoaded:
    """The live instance with the least KV committed (lowest id on ties)."""

    def home(self, request: Request, alive: list[int], load: KVLoad) -> int:
        return min(alive, key=lambda i: (load.of(i), i))
