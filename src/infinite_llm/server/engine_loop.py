"""The engine thread and its bridge to asyncio.

The engine is not thread-safe, so one background thread owns it, from its building on:
the thread that builds an engine is the one whose OpenMP thread pool the engine's
kernels set up, and a second pool (an engine built in one thread, stepped in another)
puts more OpenMP threads than cores on the machine; libgomp then spins only briefly
before sleeping, and every parallel region of a step pays a wake-up (decode steps ~1.3x
slower on two cores). Once built, the thread takes commands
(add, abort, stop) from a thread-safe queue, steps the engine while any request is
unfinished, blocks on the queue when idle, and hands each ``RequestOutput`` to the
asyncio queue of the HTTP request it belongs to (``call_soon_threadsafe``, once per
step for all of them). Requests that arrive while others run join the next step's
batch. After every step and every batch of commands it publishes a ``ClusterSnapshot``.

If a step raises, the engine is dead: every open request gets the error, later
submissions get ``EngineDeadError``, and /health says 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.snapshot import ClusterSnapshot
from infinite_llm.engine.outputs import RequestOutput
from infinite_llm.server.metrics import RequestTimes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from infinite_llm.engine.engine import LLMEngine
    from infinite_llm.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or a step failed)."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams


@dataclass(frozen=True)
class _Add:
    requests: list[EngineRequest]
    group: RequestGroup
    done: asyncio.Future
    arrival: float


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str] | None  # None: every open request


_STOP = object()


@dataclass
class _Sink:
    """Where one engine request's outputs go: its group's queue, at its index."""

    group: RequestGroup
    index: int
    times: RequestTimes


class RequestGroup:
    """The engine requests of one HTTP request (n samples of each prompt) and their
    outputs, in the order the engine produced them."""

    def __init__(self, owner: EngineLoop, request_ids: list[str]) -> None:
        self.owner = owner
        self.request_ids = request_ids
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) pairs until every request has finished."""
        while self._unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise EngineDeadError(f"the engine failed: {item}") from item
            index, output = item
            if output.finished:
                self._unfinished.discard(index)
            yield index, output

    def close(self) -> None:
        """Abort what has not finished (a client that went away); idempotent."""
        if self._unfinished:
            self.owner.abort([self.request_ids[i] for i in self._unfinished])
            self._unfinished.clear()
        self.owner.groups.discard(self)


class EngineLoop:
    """Builds the engine on a thread of its own (``build``; its error, if any, is
    raised here) and then steps it on that thread until ``stop``."""

    engine: LLMEngine

    def __init__(self, build: Callable[[], LLMEngine],
                 metrics: ServerMetrics | None = None) -> None:
        self.metrics = metrics
        self.groups: set[RequestGroup] = set()  # open on the asyncio side
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "closed" against enqueueing
        self._closed = False
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, built),
                                        name="engine-loop", daemon=True)
        self._thread.start()
        built.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error

    # -- the asyncio side -------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs and end the thread."""
        with self._lock:
            if not self._closed:
                self._commands.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def view(self) -> ClusterSnapshot:
        return self._view

    async def submit(self, requests: list[EngineRequest]) -> RequestGroup:
        """Queue requests, all or none: raises the engine's ValueError if one is bad."""
        group = RequestGroup(self, [r.request_id for r in requests])
        done = group.loop.create_future()
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine is not running")
            self._commands.put(_Add(requests, group, done, time.monotonic()))
        try:
            await done
        except asyncio.CancelledError:
            self.abort(group.request_ids)
            raise
        self.groups.add(group)
        return group

    def abort(self, request_ids: list[str] | None = None) -> None:
        """Abort these requests (None: all); their groups receive the final outputs."""
        self._commands.put(_Abort(request_ids))

    # -- the engine thread ------------------------------------------------------------

    def _run(self, build: Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = build()
            self._view = self.engine.snapshot()
        except BaseException as error:  # noqa: BLE001 - raised again by the constructor
            self.error = error
            self._closed = True
            return
        finally:
            built.set()
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                self._view = self.engine.snapshot()
        except BaseException as error:  # noqa: BLE001 - any failure kills the engine
            logger.exception("the engine loop failed; the server is no longer healthy")
            self.error = error
            self._close(error)
            return
        self._close(None)

    def _handle_commands(self, block: bool) -> bool:
        """Run the queued commands (waiting for one if ``block``); False on stop."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        stop = False
        for command in commands:
            if command is _STOP:
                stop = True  # what came with it still runs; _close then aborts it
            elif isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_ids)
        return not stop

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            for r in command.requests:
                self.engine.add_request(r.prompt, r.params, r.request_id)
                added.append(r.request_id)
        except Exception as error:  # noqa: BLE001 - handed to the caller, state rolled back
            for request_id in added:
                self.engine.abort_request(request_id)
            _call_soon(command.group.loop, _settle, command.done, error)
            return
        for index, request_id in enumerate(added):
            self._sinks[request_id] = _Sink(command.group, index, RequestTimes(command.arrival))
        _call_soon(command.group.loop, _settle, command.done, None)

    def _abort(self, request_ids: list[str] | None) -> None:
        ids = list(self._sinks) if request_ids is None else request_ids
        outputs = [out for rid in ids if (out := self.engine.abort_request(rid)) is not None]
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if self.metrics is not None:
                self.metrics.on_output(sink.times, output, now)
            if output.finished:
                del self._sinks[output.request_id]
            batches.setdefault(sink.group.loop, []).append((sink.group.queue, (sink.index, output)))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _close(self, error: BaseException | None) -> None:
        """Stop taking commands; end every open request (abort, or the error)."""
        with self._lock:
            self._closed = True
        pending = []
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in pending:
            if isinstance(command, _Add):
                _call_soon(command.group.loop, _settle, command.done,
                           EngineDeadError("the engine is not running"))
        if error is None:
            try:
                self._abort(None)
                self._view = self.engine.snapshot()
                return
            except Exception as failure:  # noqa: BLE001
                error = failure
        for sink in self._sinks.values():
            _call_soon(sink.group.loop, _put_all, [(sink.group.queue, error)])
        self._sinks.clear()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop has closed: nobody is listening
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the submitter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
