"""One request inside the engine: its tokens, where its KV lives, and its Tactic statistics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .kv_pool import CachedSegment
from .types import GenerationRequest, TacticUsage, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: sequences key dictionaries
class Sequence:
    request: GenerationRequest
    token_ids: list[int]
    status: Status = Status.WAITING
    shared: list[CachedSegment] = field(default_factory=list)  # prefix segments from the cache
    own_slots: list[int] = field(default_factory=list)  # slots of the positions after them
    computed: int = 0  # positions whose KV is in the cache
    # its row in the runner's req_to_token and in the cluster store's targets and statistics,
    # while running (-1 before); req_to_token holds its slots from position 0 to table_from
    request_slot: int = -1
    table_from: int = 0
    clustered: int = 0  # leading full segments whose clusters the store has
    usage: TacticUsage | None = None  # means over its decode steps so far
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, if asked

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

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
    def shared_len(self) -> int:
        return sum(segment.slots.numel() for segment in self.shared)
