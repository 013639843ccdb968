"""Argument checks at the edge of the algorithm: every public entry point calls these once."""

from __future__ import annotations

import math

import torch


def check_target(target: float) -> float:
    """The target attention mass P must be a number in (0, 1]."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")
    if not (0.0 < float(target) <= 1.0) or math.isnan(target):
        raise ValueError(f"target must be in (0, 1], got {target}")
    return float(target)


def check_query_keys(query: torch.Tensor, keys: torch.Tensor) -> None:
    """query [H_q, d], keys [seq_len, H_kv, d]: floating point, finite, H_q a multiple of H_kv."""
    if not isinstance(query, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise ValueError("query and keys must be torch tensors")
    if query.dim() != 2:
        raise ValueError(f"query must be [num_q_heads, head_dim], got shape {tuple(query.shape)}")
    if keys.dim() != 3:
        raise ValueError(
            f"keys must be [seq_len, num_kv_heads, head_dim], got shape {tuple(keys.shape)}"
        )
    if not (query.dtype.is_floating_point and keys.dtype.is_floating_point):
        raise ValueError(
            f"query and keys must be floating point, got {query.dtype} and {keys.dtype}"
        )
    num_q_heads, head_dim = query.shape
    seq_len, num_kv_heads, key_dim = keys.shape
    if seq_len == 0:
        raise ValueError("keys are empty: the context must hold at least one position")
    if head_dim != key_dim or head_dim == 0:
        raise ValueError(f"head_dim differs: query has {head_dim}, keys have {key_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of "
            f"num_kv_heads ({num_kv_heads})"
        )
    if not torch.isfinite(query).all():
        raise ValueError("query contains NaN or infinite values")
    if not torch.isfinite(keys).all():
        raise ValueError("keys contain NaN or infinite values")


def check_values(keys: torch.Tensor, values: torch.Tensor) -> None:
    """values [seq_len, H_kv, d_v] matching keys, finite."""
    if values.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"values must be [seq_len, num_kv_heads, d_v] matching keys {tuple(keys.shape[:2])}, "
            f"got {tuple(values.shape)}"
        )
    if not torch.isfinite(values).all():
        raise ValueError("values contain NaN or infinite values")
