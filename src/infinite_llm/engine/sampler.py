"""Batched next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random choices use the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` draws
from ``p``. The noise of a request with a seed comes from its own generator (on the
CPU, whatever the device), so its tokens do not depend on what else is in the batch.
Everything is computed where the logits are: on a GPU only the sampled tokens (and
the log-probs asked for) come back to the host. A request with a structured output
samples only among the tokens its grammar allows next (``engine.structured``); its
logprobs stay those of the model's raw distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import Chunk, SampledToken, StepPlan, StepResult

if TYPE_CHECKING:
    from infinite_llm.engine.structured import Grammars, Matcher


@dataclass(frozen=True)
class SampleRequest:
    """One row of logits to sample from."""

    request_id: str
    params: SamplingParams


class Sampler:
    """Samples for the requests the plans announce (their params kept until they end)."""

    def __init__(self, seed: int | None = None, grammars: Grammars | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # the batch's noise
        self._params: dict[str, SamplingParams] = {}
        self._request_generators: dict[str, torch.Generator] = {}
        self._grammars = grammars
        self._matchers: dict[str, Matcher] = {}

    def apply(self, plan: StepPlan) -> None:
        """Forget the requests that ended (params, generator, grammar), note the new ones."""
        for request_id in plan.finished:
            self._params.pop(request_id, None)
            self._request_generators.pop(request_id, None)
            self._matchers.pop(request_id, None)
        for new in plan.new_requests:
            self._params[new.request_id] = new.params
            # A request announced again (the survivors of a failure re-learn them all)
            # keeps its matcher: the tokens it has are the ones the matcher consumed.
            if new.params.structured_output is not None and new.request_id not in self._matchers:
                if self._grammars is None:
                    raise ValueError("structured outputs need the model's tokenizer")
                self._matchers[new.request_id] = self._grammars.matcher(
                    new.params.structured_output)

    @property
    def num_requests(self) -> int:
        """Requests whose sampling state is kept (announced and not yet ended)."""
        return len(self._params)

    def sample(self, logits: torch.Tensor, chunks: Sequence[Chunk]) -> StepResult:
        """One token per chunk that samples; ``logits`` has one row for each, in order."""
        rows = [SampleRequest(c.request_id, self._params[c.request_id]) for c in chunks if c.sample]
        return StepResult({row.request_id: t for row, t in zip(rows, self(logits, rows))})

    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> list[SampledToken]:
        """logits: (B, V) float32 on any device, one row per entry of ``rows``; every
        row sampled where the logits are, the tokens copied back once."""
        raw = logits
        constrained = [i for i, r in enumerate(rows) if r.request_id in self._matchers]
        if constrained:
            logits = self._masked(logits, rows, constrained)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        want = [r.params.logprobs for r in rows]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            chosen = self._sample_random(logits.index_select(0, index), [rows[i] for i in random_rows])
            tokens = tokens.index_copy(0, index, chosen)
        token_list = tokens.tolist()  # the step's one wait for the device
        for i in constrained:
            self._matchers[rows[i].request_id].accept(token_list[i])
        if all(k is None for k in want):
            return [SampledToken(t) for t in token_list]
        return self._with_logprobs(raw, tokens, token_list, want)

    def _masked(self, logits: torch.Tensor, rows: list[SampleRequest],
                constrained: list[int]) -> torch.Tensor:
        """``logits`` with the tokens each constrained row's grammar forbids at -inf."""
        from infinite_llm.engine.structured import apply_masks

        masks = self._grammars.masks([self._matchers[rows[i].request_id] for i in constrained])
        index = torch.tensor(constrained, device=logits.device)
        masked = logits.clone()
        masked[index] = apply_masks(logits.index_select(0, index), masks)
        return masked

    def _sample_random(self, logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in rows], device=device)
        logits = logits / temperature.unsqueeze(1)
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _filter_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(device))
        for i, row in enumerate(rows):
            if row.params.seed is None:
                continue
            if device.type == "cpu":
                noise[i].exponential_(generator=self._seeded(row))
            else:  # drawn on the CPU, so a seed gives the same noise on any device
                own = torch.empty(noise.shape[1]).exponential_(generator=self._seeded(row))
                noise[i] = own.to(device, non_blocking=True)
        return (probs / noise).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The batch's noise generator on ``device``, seeded with the engine's seed."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device)
            if self._seed is not None:
                generator.manual_seed(self._seed)
            else:
                generator.seed()
        return generator

    def _seeded(self, row: SampleRequest) -> torch.Generator:
        generator = self._request_generators.get(row.request_id)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(row.params.seed)
            self._request_generators[row.request_id] = generator
        return generator

    def _with_logprobs(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        token_list: list[int],
        want: list[int | None],
    ) -> list[SampledToken]:
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        k_max = max(k or 0 for k in want)
        top_values, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        if k_max:  # to the host once, not a row at a time
            top_values, top_ids = top_values.cpu(), top_ids.cpu()
        out = []
        for i, k in enumerate(want):
            if k is None:
                out.append(SampledToken(token_list[i]))
                continue
            top = {}
            if k:
                top = dict(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist()))
            out.append(SampledToken(token_list[i], chosen[i], top))
        return out


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k and top-p nucleus."""
    vocab, device = logits.shape[-1], logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=device).unsqueeze(1)
    drop = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, -torch.inf), dim=-1)
    # A token stays if the mass strictly before it is below p; the top one always stays
    # (a top_p below float32's smallest number would otherwise drop it too).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, device=device).unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
