"""The in-process transport: every instance lives in this process, so a call is direct.

The one transport verb is ``call(instance_id, method, *args)``: run ``method`` of that
instance's endpoint (its rManager) with these arguments. The Ray transport answers the
same verb with an actor call; callers never know which one they hold.
"""

from __future__ import annotations

from typing import Any


class LocalTransport:
    def __init__(self) -> None:
        self._endpoints: dict[int, Any] = {}

    def register(self, instance_id: int, endpoint: Any) -> None:
        if instance_id in self._endpoints:
            raise ValueError(f"instance {instance_id} is already registered")
        self._endpoints[instance_id] = endpoint

    def call(self, instance_id: int, method: str, *args: Any) -> Any:
        return getattr(self._endpoints[instance_id], method)(*args)
