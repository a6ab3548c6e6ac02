"""The exact merge of MicroAttention partials: DistAttention's arithmetic.

For partials over disjoint key sets, ``lse = logsumexp_j lse_j`` and
``out = sum_j exp(lse_j - lse) * out_j``. A partial with ``lse = -inf`` (it saw no key)
contributes nothing, so merging with it is the identity.
"""

from __future__ import annotations

import torch


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[(out_j, lse_j), ...]`` with out (..., H, D) and lse (..., H) into one pair."""
    if not parts:
        raise ValueError("merge needs at least one (out, lse) partial")
    if len(parts) == 1:
        return parts[0]
    outs = torch.stack([out for out, _ in parts])  # (J, ..., H, D)
    lses = torch.stack([lse for _, lse in parts])  # (J, ..., H)
    lse = torch.logsumexp(lses, dim=0)
    # Where every partial is empty lse is -inf; subtract 0 there so weights are exp(-inf)=0.
    weights = torch.exp(lses - torch.where(torch.isinf(lse), 0.0, lse))
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse
