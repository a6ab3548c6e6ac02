"""What one instance's step costs, as measured by ``infinite-llm profile``: the model the
planner and the simulator predict with. Never guessed constants: a ``CostModel`` is
loaded from the file a profile wrote. No torch.

    T(b, S, x, n) = fixed + per_token * b + per_context_token * S + per_remote * x
                    + per_sequence * n

b: tokens computed in the step (the non-attention work, W(b) / f(b) with throughput
f(b) = b / (fixed + per_token * b), which grows with the batch), S: the (query, key)
pairs the step's attention scores, at throughput g = 1 / per_context_token (a decode
token attends to its whole context; a prefill chunk of n tokens after p computed ones
scores n * p + n (n + 1) / 2), x: (sequence, remote owner) pairs whose partials cross
between instances each layer (at most 1 for a profile taken on Ray, where one exchange
a layer serves them all: ``exchange_once_a_step``), n: sequences in the step (sampling and per-sequence
work; in a decode step n = b, and only prefill points, where one sequence brings many
tokens, tell the two apart).
"""

from __future__ import annotations

import json
import statistics
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path


@dataclass(frozen=True)
class ProfilePoint:
    """One measured configuration: the median step of ``batch`` sequences computing
    ``tokens`` tokens (None: one each, a decode step), ``decodes`` of which decode one
    token (None: all of them in a decode step, none in a step of prompts; a mixed step,
    a prompt's chunk beside decodes, says how many), whose attention scores
    ``context_tokens`` (query, key) pairs."""

    batch: int
    context_tokens: int
    step_s: float
    tokens: int | None = None
    engine_s: float | None = None  # of step_s, the engine's own work (not the runner's)
    # Measured in several rounds (``profile --rounds``): each round's step, of which
    # ``step_s`` is the median.
    round_s: tuple[float, ...] = ()
    # Where instances run side by side: the same step once one of its requests' KV spans
    # two instances, one (sequence, remote owner) pair exchanging every layer.
    spread_s: float | None = None
    decodes: int | None = None

    @property
    def computed(self) -> int:
        return self.batch if self.tokens is None else self.tokens

    @property
    def decoding(self) -> int:
        """Of the step's sequences, those decoding one token."""
        if self.decodes is not None:
            return self.decodes
        return self.batch if self.tokens is None else 0


@dataclass(frozen=True)
class CostModel:
    fixed_s: float
    per_token_s: float
    per_context_token_s: float
    per_remote_s: float = 0.0
    per_sequence_s: float = 0.0
    # Of a step, what the engine itself spends outside the runner (scheduling, updating,
    # outputs): the median over the decode points. Part of the fit's time already; a
    # model of other hardware (``sim.roofline``) adds it to its computed times.
    engine_s: float = 0.0
    # Where it was measured, and on what: kept with the fit so a file says what it is.
    source: dict[str, object] = field(default_factory=dict)
    points: tuple[ProfilePoint, ...] = ()
    # Every price times these (decode steps, steps of prompts; ``scaled``).
    scale: tuple[float, float] = (1.0, 1.0)
    # Where instances share one machine side by side (Ray actors on this host): a step
    # in which one instance computes while the others idle, as a share of the same step
    # beside busy neighbours (decode steps, steps of prompts; measured by ``profile``).
    alone: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_token_s", "per_context_token_s", "per_remote_s",
                     "per_sequence_s", "engine_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not all(f > 0 for f in (*self.scale, *self.alone)):
            raise ValueError(f"scale and alone must be > 0, got {self.scale} and {self.alone}")

    def step_time(
        self, tokens: int, context_tokens: int, remote_pairs: int = 0,
        sequences: int | None = None, decodes: int | None = None, alone: bool = False,
    ) -> float:
        """Seconds of one step computing ``tokens`` tokens of ``sequences`` sequences
        (None: one token each, a decode step), ``decodes`` of which decode one token
        (None: all of them when each computes one, else none), whose attention scores
        ``context_tokens`` (query, key) pairs (a decode step: its contexts' sum).
        ``alone``: the only instance of the machine computing in this step."""
        n = tokens if sequences is None else sequences
        d = (n if n == tokens else 0) if decodes is None else decodes
        line = self.line(tokens, context_tokens, remote_pairs, n)
        if tokens <= 0:
            return line
        # The line, corrected by what the measured points say it misses where the step
        # is like them (the cost is not linear on every machine): a decode step by the
        # decode grid's residual; a step of prompts by the prefill points' ratio
        # (prompts x tokens a prompt); a prompt's chunk beside decodes by the mixed
        # points' ratio (decodes x the chunks' tokens).
        if d == n == tokens and self._decode_residuals:
            line += _interpolate(self._decode_residuals, tokens, context_tokens / tokens)
        elif d == 0 and self._prefill_ratios:
            line *= _interpolate(self._prefill_ratios, n, tokens / n)
        elif 0 < d < n and self._mixed_ratios:
            line *= _interpolate(self._mixed_ratios, d, tokens - d)
        return line * self._share(self.scale, tokens, d) * (
            self._share(self.alone, tokens, d) if alone else 1.0)

    @staticmethod
    def _share(factors: tuple[float, float], tokens: int, decodes: int) -> float:
        """A (decode, prompts) pair of factors, weighed by the step's tokens."""
        return (decodes * factors[0] + (tokens - decodes) * factors[1]) / tokens

    @property
    def exchange_once_a_step(self) -> bool:
        """Whether remote pairs cost ``per_remote_s`` once a step however many there are
        (a profile of instances side by side, as on Ray: every one joins one exchange a
        layer whenever any sequence crosses), else each."""
        return bool(self.source.get("per_instance"))

    def line(self, tokens: int, context_tokens: float, remote_pairs: int = 0,
             sequences: int | None = None) -> float:
        """The fitted line alone, without the measured points' corrections."""
        n = tokens if sequences is None else sequences
        exchanges = min(remote_pairs, 1) if self.exchange_once_a_step else remote_pairs
        return (self.fixed_s + self.per_token_s * tokens + self.per_sequence_s * n
                + self.per_context_token_s * context_tokens + self.per_remote_s * exchanges)

    @cached_property
    def _decode_residuals(self) -> list[tuple[int, list[tuple[float, float]]]]:
        """(batch, [(context per sequence, measured - line)...]) over the decode points,
        by batch; empty unless two batches or more were measured (a batch's row may
        stop short of the longest context where its KV did not fit: held there)."""
        rows: dict[int, list[tuple[float, float]]] = {}
        for p in self.points:
            if p.tokens is None and p.batch > 0:
                line = self.line(p.batch, p.context_tokens)
                rows.setdefault(p.batch, []).append((p.context_tokens / p.batch, p.step_s - line))
        if len(rows) < 2:
            return []
        return sorted((b, sorted(r)) for b, r in rows.items())

    @cached_property
    def _prefill_ratios(self) -> list[tuple[int, list[tuple[float, float]]]]:
        """(prompts, [(tokens a prompt, measured / line)...]) over the prefill points,
        by prompts; a ratio, not a difference, because a step of prompts scales beyond
        the points (a step of several instances' prompts in one forward)."""
        rows: dict[int, list[tuple[float, float]]] = {}
        for p in self.points:
            if p.tokens is not None and p.batch > 0 and p.decoding == 0:
                line = self.line(p.tokens, p.context_tokens, 0, p.batch)
                rows.setdefault(p.batch, []).append((p.tokens / p.batch, p.step_s / line))
        return sorted((b, sorted(r)) for b, r in rows.items())

    @cached_property
    def _mixed_ratios(self) -> list[tuple[int, list[tuple[float, float]]]]:
        """(decodes, [(the chunks' tokens, measured / line)...]) over the mixed points,
        by decodes; points of one (decodes, chunk tokens) at several contexts keep
        their median ratio."""
        ratios: dict[tuple[int, int], list[float]] = {}
        for p in self.points:
            if p.tokens is not None and 0 < p.decoding < p.batch:
                line = self.line(p.tokens, p.context_tokens, 0, p.batch)
                ratios.setdefault((p.decoding, p.tokens - p.decoding), []).append(p.step_s / line)
        rows: dict[int, list[tuple[float, float]]] = {}
        for (d, chunk), r in ratios.items():
            rows.setdefault(d, []).append((chunk, statistics.median(r)))
        return sorted((d, sorted(r)) for d, r in rows.items())

    def decode_rate(self, batch: int, context_tokens: int, remote_pairs: int = 0) -> float:
        """Output tokens per second of a decode step of ``batch`` requests (0 when idle)."""
        if batch <= 0:
            return 0.0
        return batch / self.step_time(batch, context_tokens, remote_pairs)

    @staticmethod
    def fit(points: list[ProfilePoint], source: dict[str, object] | None = None) -> CostModel:
        """Least squares of step time on (1, tokens, context tokens, sequences) in
        relative terms (every point's error as a share of its time),
        coefficients kept non-negative (a negative one is dropped and the rest
        refitted). Without a point computing more tokens than sequences (decode steps
        only), tokens and sequences are one column, all in ``per_token_s``. A remote
        pair costs the median of what spreading a request added to the points timed
        both ways (``spread_s``; none: 0)."""
        if len(points) < 3:
            raise ValueError(f"a fit needs at least 3 measured points, got {len(points)}")
        columns = [0, 1, 2, 3] if any(p.computed != p.batch for p in points) else [0, 1, 2]
        while True:
            # Relative residuals (each row divided by its step time): a 5 s prefill point
            # must not outweigh a 30 ms decode point, the steps a simulation has most of.
            coef = _least_squares(
                [[(1.0, float(p.computed), float(p.context_tokens), float(p.batch))[c] / p.step_s
                  for c in columns] for p in points],
                [1.0 for _ in points],
            )
            negative = [c for c, v in zip(columns, coef) if v < 0]
            if not negative:
                break
            columns.remove(negative[0])
        full = dict.fromkeys([0, 1, 2, 3], 0.0)
        full.update(zip(columns, coef))
        engine = sorted(p.engine_s for p in points if p.engine_s is not None)
        # A remote pair: what spreading one request added to the measured steps (median).
        added = [p.spread_s - p.step_s for p in points if p.spread_s is not None]
        remote = max(0.0, statistics.median_high(added)) if added else 0.0
        return CostModel(full[0], full[1], full[2], per_remote_s=remote, per_sequence_s=full[3],
                         engine_s=engine[len(engine) // 2] if engine else 0.0,
                         source=dict(source or {}), points=tuple(points))

    def scaled(self, decode: float, prompts: float | None = None) -> CostModel:
        """The same machine running slower (or faster): decode steps ``decode`` times
        their price, steps of prompts ``prompts`` times (default: ``decode``), a step
        mixing both by its tokens' shares. What a probe timed beside a later run says
        of that run's minutes (``infinite_llm.engine.profile.probe``); the two differ
        where the machine's neighbours take memory bandwidth but not compute, or the
        other way round."""
        prompts = decode if prompts is None else prompts
        return replace(self, scale=(decode * self.scale[0], prompts * self.scale[1]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        points = tuple(ProfilePoint(**{**p, "round_s": tuple(p.get("round_s", ()))})
                       for p in data.pop("points", ()))
        return CostModel(**{**data, "scale": tuple(data.get("scale", (1.0, 1.0))),
                            "alone": tuple(data.get("alone", (1.0, 1.0)))}, points=points)


def _along(row: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through ``row``'s (x, y), held at its ends."""
    xs = [p[0] for p in row]
    k = bisect_right(xs, x)
    if k == 0:
        return row[0][1]
    if k == len(row):
        return row[-1][1]
    (x0, y0), (x1, y1) = row[k - 1], row[k]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1


def _interpolate(grid: list[tuple[int, list[tuple[float, float]]]], batch: int,
                 context: float) -> float:
    """The residual at (``batch``, ``context`` per sequence): along context in the two
    batch rows around it, then linearly between them; held at the grid's edges."""
    row = [(b, _along(points, context)) for b, points in grid]
    return _along(row, batch)


def _least_squares(rows: list[list[float]], y: list[float]) -> list[float]:
    """Solve the normal equations (a handful of columns) by Gauss-Jordan elimination."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * v for r, v in zip(rows, y)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda k: abs(a[k][col]))
        if abs(a[pivot][col]) < 1e-30:
            raise ValueError("the measured points do not determine the fit")
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for k in range(n):
            if k != col:
                factor = a[k][col] / a[col][col]
                a[k] = [x - factor * z for x, z in zip(a[k], a[col])]
                b[k] -= factor * b[col]
    return [b[i] / a[i][i] for i in range(n)]
