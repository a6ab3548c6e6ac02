"""The HTTP server's configuration, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """What the server needs beyond the engine.

    ``served_model_names``: the names clients may ask for; the first is the one
    responses carry. ``api_key``: when set, every /v1, /tokenize and /detokenize call
    must send ``Authorization: Bearer <key>``. ``max_body_bytes``: larger request bodies
    get a 413. ``drain_timeout``: seconds a shutdown waits for in-flight requests before
    aborting them.
    """

    served_model_names: tuple[str, ...]
    model_path: str = ""
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names needs at least one non-empty name")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
