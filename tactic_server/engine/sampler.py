"""Next-token choice from logits: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from .types import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [vocab] (any dtype; computed in float32 on the CPU). Whatever the
    parameters, it returns a token: one request's extreme values must not fail the batch."""
    logits = logits.float().cpu()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        ordered, order = probabilities.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        outside = ordered.cumsum(0) - ordered >= params.top_p
        outside[0] = False  # even a top_p that rounds to 0 in float32
        ordered[outside] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter_(0, order, ordered)
    if not torch.isfinite(probabilities).all() or probabilities.sum() <= 0:
        return int(torch.argmax(logits))  # e.g. every logit -inf after top-k of NaNs
    return int(torch.multinomial(probabilities, 1, generator=generator))
