"""Run the API under uvicorn, draining on SIGTERM.

uvicorn alone closes its listening socket on SIGTERM, so new clients would see a
refused connection. Here the first SIGTERM (or SIGINT) starts a drain instead: the
socket stays open and new requests get 503, in-flight ones run until they finish or
the drain timeout aborts them (finish_reason "abort"), then uvicorn exits. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from infinite_llm.config import ServerConfig
from infinite_llm.server.api import ServerState, build_app

if TYPE_CHECKING:
    from infinite_llm.llm import LLM

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        logger.info("shutting down: draining in-flight requests (at most %.0f s)",
                    self.state.config.drain_timeout)
        self.state.draining = True  # a plain flag: safe to set inside a signal handler
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.state.drain()
        self.should_exit = True


def run_server(llm: LLM, config: ServerConfig) -> int:
    app = build_app(llm, config)
    state: ServerState = app.state.server
    view = state.loop.view
    per_instance = view.instances[0].capacity * view.block_size
    logger.info(
        "KV capacity: %d tokens per instance x %d instance(s) = %d tokens in the pool; "
        "one request can hold up to %d; max_model_len %d",
        per_instance, len(view.instances), per_instance * len(view.instances),
        view.max_request_tokens, state.limits.max_model_len,
    )
    logger.info("serving %s on http://%s:%d", config.model_name, config.host, config.port)
    server = _DrainingServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                       timeout_graceful_shutdown=5, lifespan="on"),
        state,
    )
    try:
        server.run()
    finally:
        # Ray actors (and a private local Ray) must not outlive the server.
        llm.shutdown()
    return 0
