"""Run the API under uvicorn, draining on SIGTERM.

uvicorn alone closes its listening socket on SIGTERM, so new clients would see a
refused connection. Here the first SIGTERM (or SIGINT) starts a drain instead: the
socket stays open and new requests get 503, in-flight ones run until they finish or
the drain timeout aborts them (finish_reason "abort"), then uvicorn exits. A second
signal exits at once.

Connections: at most ``max_connections`` at once (uvicorn answers the rest 503), idle
connections (kept alive, or never used) closed after ``timeout_keep_alive``, the soft limit on open
files raised to the hard one at start, and a failing accept (out of file descriptors)
logged once per ``ACCEPT_LOG_INTERVAL_S`` with the number left unsaid, not once per try.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from infinite_llm.config import ServerConfig
from infinite_llm.server.api import ServerState, build_app

if TYPE_CHECKING:
    from infinite_llm.llm import LLM

logger = logging.getLogger(__name__)
ACCEPT_LOG_INTERVAL_S = 10.0


def raise_file_limit() -> int:
    """The soft limit on open files raised to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class IdleClosingProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, whose keep-alive timer also runs from the moment a
    connection opens: one that never sends a request is closed after
    ``timeout_keep_alive`` like one that went quiet after a response (uvicorn starts
    the timer only after a response, so idle sockets would hold file descriptors for
    ever). A request's first bytes cancel it, as they cancel the keep-alive timer."""

    def connection_made(self, transport) -> None:  # noqa: ANN001 - uvicorn's signature
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)


class AcceptErrorsOnce(logging.Filter):
    """asyncio logs every failed ``accept`` with a traceback, thousands a second when
    the process is out of file descriptors: one record per interval passes, saying
    how many were held back."""

    def __init__(self, interval_s: float = ACCEPT_LOG_INTERVAL_S,
                 clock=time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.last = -float("inf")
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = self.clock()
        if now - self.last < self.interval_s:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} ({self.held} more since the last report)"
        record.exc_info = None  # the same traceback every time: once is enough
        self.last, self.held = now, 0
        return True


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


def run_server(build: Callable[[], LLM], config: ServerConfig) -> int:
    """Serve the engine ``build`` returns, building it on the engine's own thread."""
    app = build_app(build, config)
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
    files = raise_file_limit()
    if files < config.max_connections + 64:
        logger.warning("%d open files allowed, fewer than --max-connections %d needs",
                       files, config.max_connections)
    accept_errors = AcceptErrorsOnce()
    logging.getLogger("asyncio").addFilter(accept_errors)
    server = _DrainingServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                       timeout_graceful_shutdown=5, lifespan="on",
                       limit_concurrency=config.max_connections,
                       timeout_keep_alive=config.timeout_keep_alive,
                       http=IdleClosingProtocol),
        state,
    )
    try:
        server.run()
    finally:
        logging.getLogger("asyncio").removeFilter(accept_errors)
        # Ray actors (and a private local Ray) must not outlive the server.
        state.engine.shutdown()
    return 0
