"""One request inside the engine: its tokens, where its KV lives, its Tactic clusters per layer,
and what it has streamed so far."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import torch

from tactic_server.tactic.clustering import ClusterIndex, concatenate_segments

from .kv_pool import CachedSegment
from .types import GenerationRequest


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class TacticTally:
    """Running sums over decode steps x layers for the usage report."""

    steps: int = 0
    selected_ratio: float = 0.0
    estimated_mass: float = 0.0
    attended_tokens: float = 0.0

    def add(
        self, selected_ratio: float, estimated_mass: float, attended_tokens: float, steps: int = 1
    ) -> None:
        """Sums over `steps` (decode step, layer) pairs."""
        self.steps += steps
        self.selected_ratio += selected_ratio
        self.estimated_mass += estimated_mass
        self.attended_tokens += attended_tokens


@dataclass(eq=False)  # identity: sequences key dictionaries
class Sequence:
    request: GenerationRequest
    token_ids: list[int]
    num_layers: int
    status: Status = Status.WAITING
    shared: list[CachedSegment] = field(default_factory=list)  # prefix segments from the cache
    own_slots: list[int] = field(default_factory=list)  # slots of the positions after them
    segment_slots: list[int] = field(default_factory=list)  # ClusterPool slots of own segments
    computed: int = 0  # positions whose KV is in the cache
    clusters: list[list[ClusterIndex]] = field(default_factory=list)  # per layer, per segment
    tally: TacticTally = field(default_factory=TacticTally)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    joined: dict[int, ClusterIndex] = field(default_factory=dict)  # per layer, all segments

    def __post_init__(self) -> None:
        if not self.clusters:
            self.clusters = [[] for _ in range(self.num_layers)]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def slots(self) -> torch.Tensor:
        """int64 KV slot of every position, those reserved for future tokens included, shared
        prefix first."""
        parts = [segment.slots for segment in self.shared]
        parts.append(torch.tensor(self.own_slots, dtype=torch.long))
        return torch.cat(parts)

    @property
    def pool_segment_slots(self) -> list[int]:
        """ClusterPool slot of every clustered segment, shared prefix first."""
        return [segment.pool_slot for segment in self.shared] + self.segment_slots

    @property
    def shared_len(self) -> int:
        return sum(segment.slots.numel() for segment in self.shared)

    def cluster_index(self, layer: int, seq_len: int) -> ClusterIndex | None:
        """This layer's clusters of all full segments so far, for a context of seq_len."""
        segments = self.clusters[layer]
        if not segments:
            return None
        joined = self.joined.get(layer)
        if joined is None or joined.clustered_len != len(segments) * segments[0].clustered_len:
            joined = self.joined[layer] = concatenate_segments(segments, seq_len)
        return dataclasses.replace(joined, seq_len=seq_len)
