"""Seeded synthetic decode workloads: one query step over a context, with heads of different
shapes, so that the share of tokens needed for P ranges from about 1% to most of the context.

- topics: documents (contiguous runs) about a few topics, RoPE applied; each query head asks about
  one or two topics with its own sharpness.
- needles: a topic background with a few planted keys aligned to the query.
- needles_isotropic: the same needles in isotropic noise, which no clustering can order: the
  hard case for centroids (recall must hold; overshoot is expected to be high).
- recency_sink: RoPE phase alignment makes recent tokens score high; position 0 is a strong sink.
- flat: isotropic keys and a weak query: attention spread over nearly everything.
- anisotropic_topics: overlapping topics (they share a common direction) in keys whose noise
  differs from dimension to dimension, as real keys' does; a query head mixes two to four topics.
- mixed_topics: the topic context, each query head asking about four to eight topics at once, so
  its mass spreads over many clusters of several topics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import WORKLOAD_KINDS

ROPE_BASE = 10000.0


@dataclass(frozen=True)
class Workload:
    name: str
    query: torch.Tensor  # [H_q, d]
    keys: torch.Tensor  # [seq_len, H_kv, d]
    values: torch.Tensor  # [seq_len, H_kv, d]
    # [H_kv, d/2]: clustering.query_moments of the queries before the decode steps (what a
    # server sees of them at prefill, and query-weighted clustering reads)
    query_moments: torch.Tensor | None = None


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """[d/2] rotation frequencies of the HF (rotate_half) layout: dims j and j + d/2 form a pair."""
    return ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rope(vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate vectors [n, ..., d] at integer positions [n] (float64 angles for long contexts)."""
    head_dim = vectors.shape[-1]
    angles = positions.double()[:, None] * rope_frequencies(head_dim)[None, :]
    shape = (angles.shape[0],) + (1,) * (vectors.dim() - 2) + (head_dim // 2,)
    cos, sin = angles.cos().float().reshape(shape), angles.sin().float().reshape(shape)
    first, second = vectors[..., : head_dim // 2], vectors[..., head_dim // 2 :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def _log_uniform(generator, low: float, high: float, count: int) -> torch.Tensor:
    draw = torch.rand(count, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + draw * (math.log(high) - math.log(low))).float()


def _group_scale(generator, low: float, high: float, num_kv_heads: int, group: int) -> torch.Tensor:
    """[H_kv, group, 1] scales: log-uniform per KV head, within 20% across its query heads (the
    heads of a GQA group tend to be alike, so the group's union stays as sparse as its heads)."""
    per_group = _log_uniform(generator, low, high, num_kv_heads)[:, None, None]
    return per_group * _log_uniform(generator, 0.8, 1.2, num_kv_heads * group).reshape(
        num_kv_heads, group, 1
    )


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def _pair_profile(head_dim: int, low_period: float, high_period: float) -> torch.Tensor:
    """[d] weights that keep the RoPE pairs whose period lies in [low_period, high_period]."""
    periods = 2 * math.pi / rope_frequencies(head_dim)
    keep = ((periods >= low_period) & (periods <= high_period)).float()
    return torch.cat([keep, keep]).float()


def _topic_context(generator, seq_len, num_kv_heads, head_dim, overlap=0.0, anisotropic=False):
    """Keys [seq_len, H_kv, d] of documents (runs of 16-256 positions) about 32 topics, RoPE
    applied, and the topic directions [H_kv, 32, d] (pre-RoPE). overlap: weight of a direction
    all topics share; anisotropic: the noise is quiet along the topics' pairs and loud, with a
    scale of its own, along every other dimension (as in Gemma's keys, where queries point along
    dimensions in which a cluster's keys hardly vary), instead of 0.6 everywhere."""
    # semantic directions live mostly in slowly rotating RoPE pairs, as in trained models
    profile = 0.25 + _pair_profile(head_dim, 4 * seq_len, math.inf)
    num_topics = 32
    topics = _unit(torch.randn(num_kv_heads, num_topics, head_dim, generator=generator) * profile)
    if overlap:  # drawn only here, so the other workloads keep their tensors
        shared = _unit(torch.randn(num_kv_heads, 1, head_dim, generator=generator) * profile)
        topics = _unit(topics + overlap * shared)
    topics = topics * math.sqrt(head_dim)
    position_topic = torch.empty(num_kv_heads, seq_len, dtype=torch.long)
    start = 0
    while start < seq_len:
        end = min(seq_len, start + int(torch.randint(16, 257, (1,), generator=generator)))
        position_topic[:, start:end] = torch.randint(
            num_topics, (num_kv_heads, 1), generator=generator
        )
        start = end
    keys = torch.gather(topics, 1, position_topic[..., None].expand(-1, -1, head_dim)).transpose(
        0, 1
    )
    noise_scale = 0.6
    if anisotropic:
        loudness = _log_uniform(generator, 0.5, 2.0, num_kv_heads * head_dim)
        noise_scale = torch.where(profile > 1, 0.15, loudness.reshape(num_kv_heads, head_dim))
    keys = keys + noise_scale * torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
    return apply_rope(keys, torch.arange(seq_len)), topics


def _topic_query(generator, topics, group, sharpness_range, seq_len, mixed=2):
    """[H_kv, group, d]: each query head asks about a mix of `mixed` topics, RoPE at seq_len."""
    num_kv_heads, num_topics, head_dim = topics.shape
    asked = torch.randint(num_topics, (num_kv_heads, group, mixed), generator=generator)
    weights = torch.rand(num_kv_heads, group, mixed, 1, generator=generator) ** 2
    chosen = torch.gather(
        topics[:, None].expand(-1, group, -1, -1), 2, asked[..., None].expand(-1, -1, -1, head_dim)
    )
    noise = 0.3 * torch.randn(num_kv_heads, group, head_dim, generator=generator)
    direction = _unit((chosen * weights).sum(dim=2) + noise)
    query = direction * _group_scale(generator, *sharpness_range, num_kv_heads, group)
    query = apply_rope(query.reshape(1, -1, head_dim), torch.tensor([seq_len]))[0]
    return query.reshape(num_kv_heads, group, head_dim)


def _topics(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    keys, topics = _topic_context(generator, seq_len, num_kv_heads, head_dim)
    query = _topic_query(generator, topics, num_q_heads // num_kv_heads, (6.0, 40.0), seq_len)
    return query.reshape(num_q_heads, head_dim), keys


def _anisotropic_topics(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    keys, topics = _topic_context(generator, seq_len, num_kv_heads, head_dim, overlap=0.8,
                                  anisotropic=True)  # fmt: skip
    mixed = int(torch.randint(2, 5, (1,), generator=generator))
    query = _topic_query(generator, topics, num_q_heads // num_kv_heads, (6.0, 40.0), seq_len,
                         mixed)  # fmt: skip
    return query.reshape(num_q_heads, head_dim), keys


def _mixed_topics(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    keys, topics = _topic_context(generator, seq_len, num_kv_heads, head_dim)
    mixed = int(torch.randint(4, 9, (1,), generator=generator))
    query = _topic_query(generator, topics, num_q_heads // num_kv_heads, (10.0, 40.0), seq_len,
                         mixed)  # fmt: skip
    return query.reshape(num_q_heads, head_dim), keys


def _plant_needles(generator, keys, query, score_range):
    """Add 1-16 needles per KV head: keys along a direction the group's queries share, each
    scoring score_range[0]..score_range[1] above what the rest of its key gives."""
    seq_len, num_kv_heads, head_dim = keys.shape
    direction = _unit(torch.randn(num_kv_heads, head_dim, generator=generator))
    pull = math.sqrt(head_dim)
    jitter = 0.2 * torch.randn(query.shape, generator=generator)
    query = query + _unit(direction[:, None, :] + jitter / math.sqrt(head_dim)) * pull
    for head in range(num_kv_heads):
        count = int(torch.randint(1, 17, (1,), generator=generator))
        positions = torch.randperm(seq_len, generator=generator)[:count]
        low, high = score_range
        needle_score = low + (high - low) * torch.rand(count, 1, generator=generator)
        keys[positions, head] += needle_score * direction[head] * math.sqrt(head_dim) / pull
    return query, keys


def _needles(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    keys, topics = _topic_context(generator, seq_len, num_kv_heads, head_dim)
    query = _topic_query(generator, topics, num_q_heads // num_kv_heads, (1.0, 6.0), seq_len)
    query, keys = _plant_needles(generator, keys, query, (4.0, 11.0))
    return query.reshape(num_q_heads, head_dim), keys


def _needles_isotropic(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    group = num_q_heads // num_kv_heads
    keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
    # background scores are N(0, spread^2) with no structure a clustering could exploit
    spread = _group_scale(generator, 0.2, 0.8, num_kv_heads, group)
    background = _unit(torch.randn(num_kv_heads, group, head_dim, generator=generator))
    query, keys = _plant_needles(
        generator, keys, background * spread * math.sqrt(head_dim), (5.0, 12.0)
    )
    return query.reshape(num_q_heads, head_dim), keys


def _recency_sink(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    group = num_q_heads // num_kv_heads
    # pairs that dephase over tens to thousands of positions give a decaying recency bump
    profile = _pair_profile(head_dim, 8.0, 4096.0)
    shared = _unit(torch.randn(num_kv_heads, head_dim, generator=generator) * profile)
    keys = shared[None] * math.sqrt(head_dim) + 0.8 * torch.randn(
        seq_len, num_kv_heads, head_dim, generator=generator
    )
    keys = apply_rope(keys, torch.arange(seq_len))
    sink_direction = _unit(torch.randn(num_kv_heads, head_dim, generator=generator))
    keys[0] = sink_direction * math.sqrt(head_dim) * 3.0
    sharpness = _group_scale(generator, 2.0, 12.0, num_kv_heads, group)
    sink_pull = _group_scale(generator, 0.5, 4.0, num_kv_heads, group)
    query = shared[:, None, :] * sharpness
    query = apply_rope(query.reshape(1, num_q_heads, head_dim), torch.tensor([seq_len]))[0]
    query = query.reshape(num_kv_heads, group, head_dim) + sink_direction[:, None, :] * sink_pull
    return query.reshape(num_q_heads, head_dim), keys


def _flat(generator, seq_len, num_q_heads, num_kv_heads, head_dim):
    keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
    spread = _log_uniform(generator, 0.05, 0.6, num_q_heads)[:, None]
    query = (
        _unit(torch.randn(num_q_heads, head_dim, generator=generator))
        * spread
        * math.sqrt(head_dim)
    )
    return query, keys


_GENERATORS = {
    "topics": _topics,
    "needles": _needles,
    "needles_isotropic": _needles_isotropic,
    "recency_sink": _recency_sink,
    "flat": _flat,
    "anisotropic_topics": _anisotropic_topics,
    "mixed_topics": _mixed_topics,
}


def generate_workload(
    kind: str,
    seq_len: int = 8192,
    num_q_heads: int = 16,
    num_kv_heads: int = 4,
    head_dim: int = 128,
    seed: int = 0,
) -> Workload:
    """One decode query and its context; the same arguments give the same tensors."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown workload {kind!r}; choose one of {', '.join(WORKLOAD_KINDS)}")
    if num_q_heads % num_kv_heads or head_dim % 2 or seq_len < 1:
        raise ValueError(
            "need num_q_heads divisible by num_kv_heads, an even head_dim, seq_len >= 1"
        )
    generator = torch.Generator().manual_seed(seed * 1009 + WORKLOAD_KINDS.index(kind))
    query, keys = _GENERATORS[kind](generator, seq_len, num_q_heads, num_kv_heads, head_dim)
    values = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
    return Workload(kind, query.contiguous(), keys.contiguous(), values)
