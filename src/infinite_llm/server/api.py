"""The OpenAI-compatible HTTP API over one engine: the routes and ``build_app``.

``build_app(llm, config)`` returns a FastAPI app over an engine, or over a function
that builds one (called on the engine's thread: ``infinite-llm serve`` does this); its
lifespan stops the engine thread, so it runs under uvicorn or in-process alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from infinite_llm.config import ServerConfig
from infinite_llm.engine.host_memory import resident_bytes, trim_host_memory
from infinite_llm.server import protocol as p
from infinite_llm.server.cluster_view import cluster_json
from infinite_llm.server.dashboard import Dashboard
from infinite_llm.server.engine_loop import EngineLoop
from infinite_llm.server.errors import ApiError, error_body, install_error_handlers
from infinite_llm.server.generation import Generation
from infinite_llm.server.limits import Limits, conversation_chars
from infinite_llm.server.metrics import ServerMetrics
from infinite_llm.server.middleware import ApiKey, BodyLimit, Draining
from infinite_llm.server.prompts import completion_prompts, detokenize, encode, render_chat

if TYPE_CHECKING:
    from infinite_llm.engine.engine import LLMEngine
    from infinite_llm.llm import LLM

_ERRORS = {status: {"model": p.ErrorResponse} for status in (400, 401, 404, 408, 413, 503)}
_STATIC = Path(__file__).parent / "static"
# The dashboard's page may load only what this server serves.
_PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
# Bodies longer than this are parsed on a worker thread: on the event loop, parsing a
# 15 MB prompt's JSON would hold every other client while it runs.
_PARSE_OFF_LOOP_BYTES = 256 << 10


class _OffLoopJson(APIRoute):
    """A route whose large JSON bodies are parsed off the event loop (FastAPI then
    finds them parsed: Starlette keeps a request's parsed body)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            body = await request.body()
            if len(body) > _PARSE_OFF_LOOP_BYTES:
                try:  # Starlette's cache of the parsed body, which FastAPI reads
                    request._json = await asyncio.to_thread(json.loads, body)
                except ValueError:
                    pass  # FastAPI parses it again and answers with the error
            return await handler(request)

        return route


def _engine_of(llm: LLM | LLMEngine) -> LLMEngine:
    return getattr(llm, "engine", llm)


class ServerState:
    """The engine thread, the metrics and the shutdown flag of one server."""

    def __init__(self, build: Callable[[], LLMEngine], config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(config.model_name, lambda: self.loop.view)
        self.loop = EngineLoop(build, self.metrics)
        self.engine = engine = self.loop.engine
        self.dashboard = Dashboard(config.model_name, lambda: self.loop.view, self.metrics.recent)
        self.limits = Limits.of(config, engine.max_model_len, engine.capacity_tokens,
                                engine.tokenizer)
        # Tokenizing and rendering templates: off the event loop, two at a time.
        self.workers = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self.draining = False
        self.started = int(time.time())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on a worker thread, so that no client waits while it runs."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            raise ApiError(
                404, f"the model {name!r} does not exist; this server serves "
                f"{', '.join(self.config.served_model_names)}", "model", "model_not_found",
            )

    async def drain(self) -> None:
        """Refuse new requests; wait up to the drain timeout for the open ones, then
        abort what is left and wait (briefly) for those responses to go out."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        while self.loop.groups and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.loop.groups:
            self.loop.abort(None)
            deadline = time.monotonic() + 5.0
            while self.loop.groups and time.monotonic() < deadline:
                await asyncio.sleep(0.05)


def build_app(source: LLM | LLMEngine | Callable[[], LLM | LLMEngine],
              config: ServerConfig) -> FastAPI:
    build = source if callable(source) else lambda: source
    state = ServerState(lambda: _engine_of(build()), config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_sample_forever(state.dashboard)),
                 asyncio.create_task(_trim_when_idle(state))]
        yield
        for task in tasks:
            task.cancel()
        state.draining = True
        await asyncio.to_thread(state.loop.stop)
        state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="infinite-llm", version="0.1.0", lifespan=lifespan)
    app.router.route_class = _OffLoopJson
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes,
                       read_timeout=config.request_read_timeout)
    if config.api_key is not None:
        app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(Draining, is_draining=lambda: state.draining)  # outermost

    async def generate(body, prompts: list[list[int]], request: Request) -> Response:
        generation = Generation(body, prompts, config.model_name, state.tokenizer, state.limits)
        await generation.submit(state.loop)
        if body.stream:
            return generation.stream()
        result = await generation.response(request)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.limits.check_body(body)
        prompts = await state.off_loop(completion_prompts, body.prompt, state.tokenizer)
        return await generate(body, prompts, request)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.limits.check_body(body)
        prompt = await state.off_loop(render_chat, body.messages, state.tokenizer)
        return await generate(body, [prompt], request)

    @app.get("/v1/models", response_model=p.ModelList, responses=_ERRORS)
    async def models() -> p.ModelList:
        return p.ModelList(data=[
            p.ModelCard(id=name, created=state.started, root=config.model_path or name,
                        max_model_len=state.limits.max_model_len)
            for name in config.served_model_names
        ])

    @app.get("/health", responses={503: {"model": p.ErrorResponse}})
    async def health() -> Response:
        """200 while the engine serves (with the dead instances named when some died:
        the others still serve, and a load balancer should keep sending); 503 when it
        cannot serve (failed, every instance dead) or is shutting down."""
        if state.draining:
            return JSONResponse(error_body(503, "the server is shutting down"), status_code=503)
        if not state.loop.alive:
            why = f": {state.loop.error}" if state.loop.error else ""
            return JSONResponse(error_body(503, f"the engine is not running{why}"), status_code=503)
        view = state.loop.view
        if view.dead and len(view.dead) == len(view.instances):
            return JSONResponse(error_body(503, "every instance died"), status_code=503)
        if view.dead:
            return JSONResponse({"status": "degraded", "dead_instances": view.dead,
                                 "message": f"instance(s) {view.dead} died; the others serve"})
        return Response(status_code=200)

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        state.check_model(body.model)
        if body.messages is not None:
            state.limits.check_text(conversation_chars(body.messages), "messages")
            tokens = await state.off_loop(render_chat, body.messages, state.tokenizer)
        elif body.prompt is not None:
            state.limits.check_text(len(body.prompt))
            tokens = await state.off_loop(encode, body.prompt, state.tokenizer,
                                          body.add_special_tokens)
        else:
            raise ApiError(400, "give a prompt or messages", "prompt")
        return p.TokenizeResponse(count=len(tokens), max_model_len=state.limits.max_model_len,
                                  tokens=tokens)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=_ERRORS)
    async def detokenize_(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        state.check_model(body.model)
        vocab = state.engine.model_config.vocab_size
        if state.tokenizer is not None:
            vocab = min(vocab, state.tokenizer.vocab_size)
        return p.DetokenizeResponse(prompt=detokenize(body.tokens, state.tokenizer, vocab))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/cluster")
    async def cluster() -> dict:
        """The instances' blocks and the gManager's debt ledger, as of the last step."""
        return {"model": config.model_name, **cluster_json(state.loop.view)}

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> Response:
        """The live view (``server/static``); it holds no data: it reads
        ``/dashboard/feed``, which asks for the API key like every data route."""
        return FileResponse(_STATIC / "dashboard.html",
                            headers={"Content-Security-Policy": _PAGE_POLICY,
                                     "Cache-Control": "no-cache"})

    @app.get("/dashboard/feed")
    async def dashboard_feed() -> dict:
        """Everything ``/dashboard`` draws, as of the last step and sample."""
        return state.dashboard.feed()

    app.mount("/dashboard/static", StaticFiles(directory=_STATIC), name="dashboard-static")
    return app


# How often an idle server looks at its memory, and how much it must have grown since it
# last gave memory back to do so again.
TRIM_PERIOD_S = 5.0
TRIM_GROWTH_BYTES = 64 << 20


async def _trim_when_idle(state: ServerState) -> None:
    """The engine keeps freed host memory for its next step (``host_memory``); when no
    step ran for a whole period and the process grew since it last gave memory back,
    nothing will reuse it soon: it goes back (so a burst of large or refused requests
    leaves no lasting growth). A trim takes tens of milliseconds."""
    last_steps, after_trim = -1, None
    while True:
        await asyncio.sleep(TRIM_PERIOD_S)
        steps = state.loop.view.steps
        idle = steps == last_steps and not state.loop.groups
        last_steps = steps
        if idle and (after_trim is None or resident_bytes() > after_trim + TRIM_GROWTH_BYTES):
            await asyncio.to_thread(trim_host_memory)
            after_trim = resident_bytes()


async def _sample_forever(dashboard: Dashboard) -> None:
    while True:
        dashboard.sample()
        await asyncio.sleep(dashboard.period_s)
