"""How much KV each instance's unfinished requests may come to need: the load that
placement balances. One writer (the cluster, when a request is queued or leaves an
instance), so the counts cannot drift. No torch."""

from __future__ import annotations

from infinite_llm.core.request import Request


class KVLoad:
    """Tokens of KV committed per instance: every unfinished request counts its prompt
    plus every token it may still generate, from the moment it is queued on its home."""

    def __init__(self) -> None:
        self._tokens: dict[int, int] = {}

    def add(self, request: Request) -> None:
        self._tokens[request.home] = self.of(request.home) + request.max_total_tokens

    def remove(self, request: Request) -> None:
        self._tokens[request.home] = self.of(request.home) - request.max_total_tokens

    def of(self, instance_id: int) -> int:
        return self._tokens.get(instance_id, 0)
