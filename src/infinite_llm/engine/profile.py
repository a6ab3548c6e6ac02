"""Measure what a step costs on this machine: ``infinite-llm profile``.

For each (batch, context) of a grid, ``batch`` requests of ``context`` prompt tokens are
prefilled (not timed), then ``steps`` decode steps of the engine are timed one by one;
the median is the point. For each prefill length and number of prompts (that fit one
step's budget), ``steps`` steps that each compute that many fresh prompts whole are
timed: sequences bringing many tokens tell the per-token cost from the per-sequence
one, and several short prompts the cost of a token from that of attention. The fit (``core.cost_model.CostModel``)
is what the planner and the simulator load.
"""

from __future__ import annotations

import logging
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from infinite_llm.core.cost_model import CostModel, ProfilePoint
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.engine.engine import LLMEngine

logger = logging.getLogger(__name__)


def side_by_side(engine: LLMEngine) -> bool:
    """Whether the instances compute side by side, in processes of their own (Ray), so
    that a step lasts as long as the busiest one's share; in one process every
    instance's chunks are one forward."""
    return (getattr(engine.runner, "exchange_latency", None) is not None
            and len(engine.cluster.alive_instances) > 1)


def _busiest(engine: LLMEngine, requests: list) -> list:
    """The requests whose share sets the step: all of them in one process; where the
    instances run side by side, those of the instance with the most tokens."""
    if not side_by_side(engine):
        return requests
    homes: dict[int, list] = {}
    for r in requests:
        homes.setdefault(r.home, []).append(r)
    return max(homes.values(), key=lambda rs: (sum(r.num_tokens for r in rs), len(rs)))


def _decode_fits(engine: LLMEngine, batch: int, context: int, steps: int,
                 spread: bool = False, chunks: Sequence[int] = ()) -> bool:
    """Whether a decode point's requests' KV (prompt, outputs, a block each of
    headroom, and the largest of its mixed points' prompts) fits the cache, and each
    mixed point's chunk fits one step beside the decodes: one that outgrows either
    would time preemptions or split chunks, not steps."""
    block = engine.config.cache.block_size
    outputs = decode_max_tokens(engine, batch, context, steps, spread, len(chunks))
    need = batch * (-(-(context + outputs) // block) + 1)
    need += -(-(max(chunks, default=0) + 1) // block) + 1 if chunks else 0
    return (need * block <= engine.capacity_tokens
            and batch + max(chunks, default=0) <= engine.config.scheduler.max_num_batched_tokens)


# A spread point moves this many blocks of one request to another instance.
SPREAD_BLOCKS = 8


def decode_max_tokens(engine: LLMEngine, batch: int, context: int, steps: int,
                      spread: bool = False, chunks: int = 0) -> int:
    """Outputs each request of a decode point may need: one a step while the others'
    prompts are still being prefilled (the prompts of a batch beyond one step's token
    budget take several steps, and the first ones decode meanwhile), then a warm step
    and the timed ones, ``steps`` more for each of ``chunks`` mixed points. With fewer,
    early requests would finish before the timing and the point would time a smaller
    batch."""
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_steps = -(-(batch * context) // max(1, budget - batch)) + 1  # decodes take budget
    spread_steps = 0
    if spread:  # the move (within the migrator's blocks a step), a warm step, timed again
        per_step = max(1, engine.config.pooling.migration_tokens_per_step
                       // engine.config.cache.block_size)
        spread_steps = -(-SPREAD_BLOCKS // per_step) + 2 + steps
    return prefill_steps + steps * (1 + chunks) + spread_steps + 2


def measure(engine: LLMEngine, batch: int, context: int, steps: int, seed: int = 0,
            spread: bool = False, chunks: Sequence[int] = ()) -> list[ProfilePoint]:
    """The median decode step of ``batch`` requests with ``context``-token prompts (as
    a point: the busiest instance's share, where instances run side by side); every
    request decodes in every timed step (checked). Then, for each of ``chunks``, the
    median step of the same decodes beside a fresh prompt of that many tokens computed
    whole (a mixed point: the prompt's instance's share). With ``spread`` (2 instances
    or more), the decode steps are timed again once some blocks of one request have
    moved to another instance (a live migration), so that one (sequence, remote owner)
    pair exchanges its query and partial every layer: ``spread_s``. The decode point
    first, then the mixed points in the order of ``chunks``."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(
        max_tokens=decode_max_tokens(engine, batch, context, steps, spread, len(chunks)),
        temperature=0, ignore_eos=True)
    requests = [
        engine.add_request([rng.randrange(vocab) for _ in range(context)], params)
        for _ in range(batch)
    ]
    try:
        while any(r.num_computed_tokens < context for r in requests):
            engine.step()
        engine.step()  # the first decode step (warm)
        share = _busiest(engine, requests)
        times, contexts, engine_s = _time_decodes(engine, share, batch, steps)
        point = ProfilePoint(len(share), int(statistics.median(contexts)),
                             statistics.median(times), engine_s=statistics.median(engine_s))
        mixed = [_time_mixed(engine, requests, chunk, steps, rng) for chunk in chunks]
        if spread and _spread_one(engine, share[0]):
            engine.step()  # the first step across (warm)
            point = replace(point, spread_s=statistics.median(
                _time_decodes(engine, share, batch, steps)[0]))
        return [point, *mixed]
    finally:
        for request in requests:
            engine.abort_request(request.request_id)


def _time_mixed(engine: LLMEngine, decoding: list, chunk: int, steps: int,
                rng: random.Random) -> ProfilePoint:
    """``steps`` steps, each of the ``decoding`` requests beside a fresh prompt of
    ``chunk`` tokens computed whole (checked): the median, as the prompt's instance's
    share (all of it in one process)."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    times, shares = [], []
    for _ in range(steps):
        prompt = engine.add_request([rng.randrange(vocab) for _ in range(chunk)], params)
        share = ([r for r in decoding if r.home == prompt.home] if side_by_side(engine)
                 else decoding)
        contexts = sum(r.num_tokens for r in share)
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        shares.append((len(share), contexts))
        if prompt.num_computed_tokens != chunk or len(outputs) != len(decoding) + 1:
            engine.abort_request(prompt.request_id)
            raise RuntimeError(f"a mixed point's prompt of {chunk} tokens was not computed "
                               f"whole beside {len(decoding)} decodes in one step")
    # The median step; its share's decodes and their contexts as in that step.
    k = sorted(range(steps), key=times.__getitem__)[steps // 2]
    d, contexts = shares[k]
    return ProfilePoint(d + 1, contexts + chunk * (chunk + 1) // 2, times[k],
                        tokens=d + chunk, decodes=d)


def _time_decodes(engine: LLMEngine, share: list, batch: int, steps: int
                  ) -> tuple[list[float], list[int], list[float]]:
    """``steps`` decode steps of all ``batch`` requests: each one's seconds, the
    share's context and the engine's own seconds."""
    times, contexts, engine_s = [], [], []
    for _ in range(steps):
        contexts.append(sum(r.num_tokens for r in share))
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        engine_s.append(times[-1] - engine.last_execute_s)
        if len(outputs) != batch:
            raise RuntimeError(f"a decode point of {batch} requests timed a step in which "
                               f"{len(outputs)} decoded")
    return times, contexts, engine_s


def _spread_one(engine: LLMEngine, request) -> bool:
    """Move up to ``SPREAD_BLOCKS`` of ``request``'s first blocks from its home to
    another instance, stepping until the move is done; whether its KV now spans two
    instances (False where no other instance took the blocks)."""
    cluster = engine.cluster
    count = min(SPREAD_BLOCKS, request.block_table.blocks_by_owner()[request.home] - 1)
    others = [i.instance_id for i in cluster.alive_instances if i.instance_id != request.home]
    if count < 1 or not others or not cluster.migrate(request.request_id, 0, count, others[0]):
        logger.warning("profile: no spread point (a request over %d tokens could not "
                       "move %d blocks to another instance)", request.num_tokens, count)
        return False
    while request.request_id in cluster.migrator.active:
        engine.step()
    return len(request.block_table.owners()) == 2


def measure_prefill(
    engine: LLMEngine, tokens: int, steps: int, prompts: int = 1, seed: int = 0
) -> ProfilePoint:
    """The median step that computes ``prompts`` fresh requests' whole ``tokens``-token
    prompts at once."""
    budget = engine.config.scheduler.max_num_batched_tokens
    if tokens * prompts > budget:
        raise ValueError(
            f"a prefill of {prompts} x {tokens} tokens does not fit one step's budget "
            f"({budget} tokens)"
        )
    # Each prompt with its one output token, and a block of headroom each.
    block = engine.config.cache.block_size
    need = prompts * (-(-(tokens + 1) // block) + 1) * block
    if need > engine.capacity_tokens:
        raise ValueError(
            f"a prefill of {prompts} x {tokens} tokens needs KV for {need} tokens at once; "
            f"the KV cache holds {engine.capacity_tokens}: raise --kv-cache-memory"
        )
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times, shares = [], []
    for k in range(steps + 1):  # the first one warms up
        requests = [
            engine.add_request([rng.randrange(vocab) for _ in range(tokens)], params)
            for _ in range(prompts)
        ]
        share = len(_busiest(engine, requests))
        start = time.perf_counter()
        engine.step()
        if k:
            times.append(time.perf_counter() - start)
            shares.append(share)
        if any(r.num_computed_tokens != tokens for r in requests):
            raise RuntimeError(f"{prompts} prompts of {tokens} tokens took more than one step")
        while engine.has_unfinished_requests():
            engine.step()
    # Causal attention over each prompt: token i scores i keys. The point: the busiest
    # instance's prompts, where instances run side by side.
    n = max(shares)
    return ProfilePoint(n, n * tokens * (tokens + 1) // 2, statistics.median(times),
                        tokens=n * tokens)


# The probe: one request decoding and one prompt computed, small enough for any engine
# a profile prices, and one sequence so that it runs on one instance however many the
# engine has (decode: batch, context; prefill: prompt tokens).
PROBE_DECODE = (1, 256)
PROBE_PREFILL = 512


def _probe_fits(engine: LLMEngine, copies: int, steps: int) -> bool:
    """Whether ``copies`` of the probe's decode request, and then of its prompt, fit
    ``engine``'s KV cache, its model and one step."""
    batch, context = PROBE_DECODE
    block = engine.config.cache.block_size
    return (_decode_fits(engine, copies * batch, context, steps)
            and copies * (-(-(PROBE_PREFILL + 1) // block) + 1) * block <= engine.capacity_tokens
            and PROBE_PREFILL < engine.max_model_len
            and copies * PROBE_PREFILL <= engine.config.scheduler.max_num_batched_tokens)


def probe(engine: LLMEngine, steps: int = 8) -> tuple[float, float] | None:
    """The probe's (decode step, prefill step) seconds on ``engine`` now; None where
    its KV cache, its model or a step cannot hold it."""
    batch, context = PROBE_DECODE
    if not _probe_fits(engine, 1, steps):
        return None
    return (measure(engine, batch, context, steps)[0].step_s,
            measure_prefill(engine, PROBE_PREFILL, max(1, steps // 2)).step_s)


def probe_together(engine: LLMEngine, steps: int = 8) -> tuple[float, float] | None:
    """The probe's steps with every instance computing one of its kind at once (one
    request decoding, one prompt each), where instances run side by side: its ratio
    to ``probe`` is what a step gains when its neighbours idle (``CostModel.alone``).
    None where it cannot run so (one instance, or a placement that put two on one)."""
    if not side_by_side(engine):
        return None
    n = len(engine.cluster.alive_instances)
    batch, context = PROBE_DECODE
    if not _probe_fits(engine, n, steps):
        return None
    decode = measure(engine, n * batch, context, steps)[0]
    prefill = measure_prefill(engine, PROBE_PREFILL, max(1, steps // 2), prompts=n)
    if decode.batch != batch or prefill.batch != 1:
        return None
    return decode.step_s, prefill.step_s


def profile(
    engine: LLMEngine, batches: Sequence[int], contexts: Sequence[int], steps: int,
    model: str = "", prefills: Sequence[int] = (), prefill_prompts: Sequence[int] = (1,),
    rounds: int = 1, mixed_chunks: Sequence[int] = (),
) -> CostModel:
    """Every (batch, context) of the grid measured, then fitted; with ``mixed_chunks``,
    each decode point's requests also decode beside a fresh prompt of each of those
    lengths (mixed points). Where instances run in processes of their own
    (``exchange_latency`` on the runner, 2 or more instances), every decode point is
    timed again with one of its requests spread over two instances (``measure``'s
    ``spread``): what that adds is ``per_remote_s``; and the probe is timed with
    every instance busy too, to price a step whose neighbours idle (``alone``). With
    ``rounds`` > 1 the whole grid is measured that many times over, one round after
    another, and each point is the median of its rounds: a machine whose speed drifts
    from one minute to the next is then priced by its typical minute, not by the one
    a point happened to fall in."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    grid = [(b, s) for b in batches for s in contexts]
    # A point whose requests' KV (prompt, outputs, a block each of headroom) outgrows
    # the cache would time preemptions, not steps: left out, and said so; one whose
    # mixed points do not fit is timed without them.
    spread = side_by_side(engine)
    fits = [(b, s) for b, s in grid if _decode_fits(engine, b, s, steps, spread)]
    for b, s in sorted(set(grid) - set(fits)):
        logger.warning("profile: %d requests of %d tokens do not fit the KV cache "
                       "(%d tokens): left out", b, s, engine.capacity_tokens)
    chunks = {(b, s): tuple(mixed_chunks) if _decode_fits(engine, b, s, steps, spread,
                                                          mixed_chunks) else ()
              for b, s in fits}
    for b, s in sorted(k for k, c in chunks.items() if mixed_chunks and not c):
        logger.warning("profile: %d requests of %d tokens leave no room for a prompt of "
                       "%d tokens beside them: no mixed points", b, s, max(mixed_chunks))
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_grid = [(n, k) for k in prefill_prompts for n in prefills if n * k <= budget]
    measured: list[list[ProfilePoint]] = []
    probes: list[tuple[float, float]] = []
    together: list[tuple[float, float]] = []
    for r in range(rounds):
        if rounds > 1:
            logger.info("profile: round %d of %d", r + 1, rounds)
        if (seconds := probe(engine)) is not None:
            probes.append(seconds)
            together.append(probe_together(engine))
        measured.append([p for b, s in fits
                         for p in measure(engine, b, s, steps, spread=spread,
                                          chunks=chunks[b, s])]
                        + [measure_prefill(engine, n, steps, k) for n, k in prefill_grid])
    points = [_median_of_rounds(list(same)) for same in zip(*measured)]
    source = {
        "model": model,
        "dtype": engine.config.dtype,
        "device": engine.config.device,
        "backend": engine.config.parallel.backend,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps_per_point": steps,
        "rounds": rounds,
        # Points (and so the fit) are one instance's share of a step: where instances run
        # side by side, the busiest one's; price each instance apart (simulate --parallel).
        "per_instance": side_by_side(engine),
    }
    if probes:  # the probe's decode and prefill seconds in each round (``probe``)
        source["probe_s"] = [list(p) for p in probes]
    # The probe with every instance busy, beside each round's probe alone: the ratio.
    pairs = [(a, b) for a, b in zip(probes, together) if b is not None]
    if pairs:
        source["probe_together_s"] = [list(b) for _, b in pairs]
    fit = CostModel.fit(points, source)
    if pairs:
        fit = replace(fit, alone=tuple(
            statistics.median(a[k] / b[k] for a, b in pairs) for k in (0, 1)))
    if not spread or any(p.spread_s is not None for p in points):
        return fit
    # No request could be spread (no instance took the blocks): the exchange alone,
    # timed between idle instances, prices a remote pair (a floor: no step waits on it).
    exchange = engine.runner.exchange_latency
    config = engine.model_config
    # Out: a query and the new k, v; back: a partial (output and log-sum-exp per head).
    out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    back = config.num_attention_heads * (config.head_dim + 1)
    return replace(fit, per_remote_s=config.num_hidden_layers * (exchange(out) + exchange(back)))


def _median_of_rounds(rounds: list[ProfilePoint]) -> ProfilePoint:
    """One point measured in several rounds: the median round (its context as
    measured), each round's time kept in ``round_s``."""
    if len(rounds) == 1:
        return rounds[0]
    median = sorted(rounds, key=lambda p: p.step_s)[len(rounds) // 2]
    # What spreading added, round by round (both timed in the same minute), at its median.
    added = [p.spread_s - p.step_s for p in rounds if p.spread_s is not None]
    spread_s = median.step_s + statistics.median_high(added) if added else None
    return replace(median, round_s=tuple(p.step_s for p in rounds), spread_s=spread_s)
