"""Runs one scheduled step through the model: lays the step's tokens out as one batch, writes
their KV, returns next-token logits, then clusters newly completed segments and hands full prompt
segments to the prefix cache."""

from __future__ import annotations

import time

import torch

from tactic_server.tactic.clustering import build_cluster_index

from .kv_pool import KVPool, segment_keys
from .models.llama import AttentionContext, LlamaForCausalLM, SequenceSlice
from .scheduler import Step
from .sequence import Sequence
from .types import EngineObserver


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, tactic, device) -> None:
        self.model = model
        self.pool = pool
        self.tactic = tactic
        self.device = torch.device(device)
        self.observer: EngineObserver | None = None
        self.clustered_segments = 0  # segments clustered (per layer set), in all

    def run(self, step: Step) -> dict[Sequence, torch.Tensor]:
        """Logits [vocab] for every sequence whose next token this step decides."""
        token_ids, positions, slices, wanted = [], [], [], []
        ranges = [(s, len(s.token_ids) - 1, len(s.token_ids)) for s in step.decode]
        for sequence, start, end in ranges + step.prefill:
            slices.append(SequenceSlice(sequence, start, end, len(token_ids),
                                        sequence.slots[:end].to(self.device)))  # fmt: skip
            token_ids.extend(sequence.token_ids[start:end])
            positions.extend(range(start, end))
            if end == len(sequence.token_ids):  # the last known token: its logits pick the next
                wanted.append((sequence, len(token_ids) - 1))
        context = AttentionContext(slices, self.pool, self.tactic)
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            context,
            torch.tensor([row for _, row in wanted], dtype=torch.long, device=self.device),
        )
        for part in slices:
            part.sequence.computed = part.end
            self._cluster_new_segments(part.sequence)
        return {sequence: logits[i] for i, (sequence, _) in enumerate(wanted)}

    def _cluster_new_segments(self, sequence: Sequence) -> None:
        size = self.pool.segment_size
        done = len(sequence.clusters[0])
        if sequence.computed // size <= done:
            return
        started = time.perf_counter()
        config = self.tactic
        for segment in range(done, sequence.computed // size):
            slots = sequence.slots[segment * size : (segment + 1) * size].to(self.device)
            for layer in range(self.pool.num_layers):
                sequence.clusters[layer].append(
                    build_cluster_index(self.pool.k[layer][slots], config)
                )
        if self.observer is not None:
            self.observer.on_clustering(time.perf_counter() - started)

    def share_prompt_segments(self, sequence: Sequence) -> None:
        """Once a prompt is computed, its full segments (and their clusters) join the prefix
        cache, so a later request starting with the same tokens skips them."""
        size = self.pool.segment_size
        keys = segment_keys(sequence.request.prompt_token_ids, size)
        for index in range(len(sequence.shared), min(len(keys), len(sequence.clusters[0]))):
            slots, sequence.own_slots = sequence.own_slots[:size], sequence.own_slots[size:]
            clusters = [layer_clusters[index] for layer_clusters in sequence.clusters]
            sequence.shared.append(self.pool.register(keys[index], slots, clusters))
