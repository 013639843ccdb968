"""Continuous batching: admit waiting requests while KV slots and batch places allow, then make
each step from one decode token per running request plus prompt chunks up to a token budget."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_pool import KVPool
from .sequence import Sequence, Status


@dataclass
class Step:
    """Work of one forward pass: (sequence, start, end) position ranges; decode ranges have one
    position each."""

    prefill: list[tuple[Sequence, int, int]]
    decode: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, pool: KVPool, max_batch: int, max_waiting: int, prefill_chunk: int,
                 max_model_len: int) -> None:  # fmt: skip
        self.pool = pool
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # a running request's row in the runner's req_to_token and the cluster store's tables,
        # as SGLang's req_pool_idx
        self.free_request_slots = list(range(max_batch - 1, -1, -1))
        self.reused_tokens = 0  # prompt positions served from the prefix cache, in all

    def can_queue(self) -> bool:
        return len(self.waiting) < self.max_waiting + max(0, self.max_batch - len(self.running))

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def _token_budget(self, sequence: Sequence) -> int:
        """Slots a request needs beyond its cached prefix: prompt plus every token it may add."""
        most = min(sequence.request.sampling.max_tokens, self.max_model_len - sequence.prompt_len)
        return sequence.prompt_len + most - sequence.shared_len

    def _admit(self) -> None:
        size = self.pool.segment_size
        while self.waiting and len(self.running) < self.max_batch:
            sequence = self.waiting[0]
            prompt = sequence.request.prompt_token_ids
            # keep at least the last prompt token to compute: its logits give the first token
            sequence.shared = self.pool.match_prefix(prompt, (len(prompt) - 1) // size)
            slots = self.pool.allocate(self._token_budget(sequence))
            if slots is None:
                self.pool.unreference(sequence.shared)
                sequence.shared = []
                break
            self.waiting.popleft()
            sequence.own_slots = slots
            sequence.computed = sequence.shared_len
            sequence.request_slot = self.free_request_slots.pop()
            self.reused_tokens += sequence.shared_len
            sequence.status = Status.PREFILL
            self.running.append(sequence)

    def schedule(self) -> Step:
        self._admit()
        decode = [s for s in self.running if s.status is Status.DECODE]
        prefill, budget = [], self.prefill_chunk
        for sequence in self.running:
            if sequence.status is Status.PREFILL and budget > 0:
                end = min(sequence.prompt_len, sequence.computed + budget)
                prefill.append((sequence, sequence.computed, end))
                budget -= end - sequence.computed
        return Step(prefill, decode)

    def release(self, sequence: Sequence) -> None:
        """Free everything a finished or aborted request holds."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.pool.release(sequence.own_slots)
        self.pool.unreference(sequence.shared)
        if sequence.request_slot >= 0:
            self.free_request_slots.append(sequence.request_slot)
        sequence.own_slots, sequence.shared, sequence.request_slot = [], [], -1
        sequence.status = Status.FINISHED
