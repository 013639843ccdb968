"""Paged KV cache in SGLang's layout (per layer K and V [num_slots, H_kv, d], one slot per token)
and a prefix cache of full segments: a finished segment keeps its KV slots, and a later request
whose prompt starts with the same tokens reuses them, and with them the segment's clusters (the
cluster store, decode.ClusterSide, names a segment by its last KV slot and forgets it when
`on_free` reports that slot freed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class CachedSegment:
    """segment_size consecutive positions (aligned to 0) of some prompt and their KV slots.
    Requests using it hold a reference; unreferenced ones are evictable."""

    key: bytes
    slots: torch.Tensor  # [segment_size] int64
    references: int = 0
    last_used: int = 0


def segment_keys(token_ids, segment_size: int) -> list[bytes]:
    """Chain hashes of the full segments of a token sequence: each names its whole prefix."""
    keys, previous = [], b""
    for start in range(0, len(token_ids) - segment_size + 1, segment_size):
        chunk = ",".join(map(str, token_ids[start : start + segment_size])).encode()
        previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
        keys.append(previous)
    return keys


@dataclass
class KVPool:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    segment_size: int
    on_free: Callable[[list[int]], None] | None = None  # told of every slot freed
    k: list[torch.Tensor] = field(init=False)
    v: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_slots, self.num_kv_heads, self.head_dim)
        self.k = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))
        self._segments: dict[bytes, CachedSegment] = {}
        self._clock = 0

    @property
    def kv_bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def evictable_slots(self) -> int:
        return sum(self.segment_size for s in self._segments.values() if s.references == 0)

    def free_slots(self) -> int:
        """Slots a request could get now (free plus those of unreferenced cached segments)."""
        return len(self._free) + self.evictable_slots()

    def slots_in_use(self) -> int:
        return self.num_slots - self.free_slots()

    def allocate(self, count: int) -> list[int] | None:
        """count free slots, evicting least recently used unreferenced segments if needed;
        None (and nothing taken) when even that is not enough."""
        if count > self.free_slots():
            return None
        if count > len(self._free):
            for segment in sorted(self._segments.values(), key=lambda s: s.last_used):
                if segment.references == 0:
                    del self._segments[segment.key]
                    self.release(segment.slots.tolist())
                    if len(self._free) >= count:
                        break
        taken = self._free[-count:] if count else []
        del self._free[len(self._free) - count :]
        return taken

    def release(self, slots: list[int]) -> None:
        self._free.extend(slots)
        if self.on_free is not None and slots:
            self.on_free(slots)

    def match_prefix(self, token_ids, limit: int) -> list[CachedSegment]:
        """Cached segments that start token_ids, at most `limit` of them; each gains a reference."""
        found = []
        for key in segment_keys(token_ids, self.segment_size)[:limit]:
            segment = self._segments.get(key)
            if segment is None:
                break
            found.append(segment)
        self._touch(found, +1)
        return found

    def register(self, key: bytes, slots: list[int]) -> CachedSegment:
        """Hand a request's full segment to the cache (the request keeps one reference). If an
        equal segment is cached already, the request's slots are freed and that one is used."""
        segment = self._segments.get(key)
        if segment is not None:
            self.release(slots)
        else:
            segment = CachedSegment(key, torch.tensor(slots, dtype=torch.long))
            self._segments[key] = segment
        self._touch([segment], +1)
        return segment

    def unreference(self, segments: list[CachedSegment]) -> None:
        self._touch(segments, -1)

    def _touch(self, segments: list[CachedSegment], change: int) -> None:
        self._clock += 1
        for segment in segments:
            segment.references += change
            segment.last_used = self._clock
