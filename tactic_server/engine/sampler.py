"""Next-token choice from logits: the request's logit bias and repetition penalties, then greedy,
temperature, top-k, top-p, per-request seeds; and the log-probabilities the request asked for."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .types import SamplingParams, TokenLogprob


class SampledToken(NamedTuple):
    token_id: int
    logprob: TokenLogprob | None  # None unless the request asked for logprobs


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    output_token_ids: list[int],
) -> SampledToken:
    """One token from logits [vocab] (any dtype; computed in float32 on the CPU) of a request
    that generated output_token_ids so far. Whatever the parameters, it returns a token: one
    request's extreme values must not fail the batch. Its log-probabilities are the model's own
    (log_softmax of the logits as they came), not those of the adjusted distribution."""
    logits = logits.float().cpu()
    token_id = _choose(_adjusted(logits, params, output_token_ids), params, generator)
    if params.logprobs is None:
        return SampledToken(token_id, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, min(params.logprobs, logprobs.numel())) if params.logprobs else None
    alternatives = () if top is None else tuple(
        zip(top.indices.tolist(), top.values.tolist(), strict=True)
    )  # fmt: skip
    return SampledToken(token_id, TokenLogprob(token_id, float(logprobs[token_id]), alternatives))


def _adjusted(
    logits: torch.Tensor, params: SamplingParams, output_token_ids: list[int]
) -> torch.Tensor:
    """OpenAI's logit_bias and penalties: mu[j] + bias[j] - c[j] * frequency_penalty
    - (c[j] > 0) * presence_penalty, where c[j] counts token j in the output so far."""
    if params.logit_bias:
        token_ids, biases = zip(*params.logit_bias, strict=True)
        logits = logits.index_add(0, torch.tensor(token_ids), torch.tensor(biases))
    if (params.frequency_penalty or params.presence_penalty) and output_token_ids:
        counts = torch.bincount(torch.tensor(output_token_ids), minlength=logits.numel())
        counts = counts[: logits.numel()].float()
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).float()
    return logits


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
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
