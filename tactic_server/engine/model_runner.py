"""Runs one scheduled step through the model: lays the step's tokens out as one batch, writes
their KV, returns next-token logits, then clusters newly completed segments and hands full prompt
segments to the prefix cache."""

from __future__ import annotations

import time

import torch

from tactic_server.tactic.clustering import build_cluster_index

from .kv_pool import KVPool, segment_keys
from .models.llama import AttentionContext, KernelBatch, LlamaForCausalLM, SequenceSlice
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
        context = AttentionContext(slices, self.pool, self.tactic, self._kernel_batch(slices))
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

    def _kernel_batch(self, slices: list[SequenceSlice]) -> KernelBatch | None:
        """The device inputs of select_rows for this step's Tactic decodes (None without the
        kernels or without such decodes)."""
        if not self.pool.segment_pools:
            return None
        chosen = [p for p in slices if p.is_decode and p.sequence.request.tactic.enabled]
        if not chosen:
            return None
        max_len = max(p.end for p in chosen)
        max_segments = max(1, max(len(p.sequence.pool_segment_slots) for p in chosen))
        req_to_token = torch.zeros(len(chosen), max_len, dtype=torch.int32)
        req_to_segment = torch.zeros(len(chosen), max_segments, dtype=torch.int32)
        for i, part in enumerate(chosen):
            req_to_token[i, : part.end] = part.slots.cpu()
            segments = part.sequence.pool_segment_slots
            req_to_segment[i, : len(segments)] = torch.tensor(segments, dtype=torch.int32)
        return KernelBatch(
            slices=chosen,
            rows=torch.tensor([p.row for p in chosen], device=self.device),
            pool_indices=torch.arange(len(chosen), dtype=torch.int32, device=self.device),
            req_to_token=req_to_token.to(self.device),
            req_to_segment=req_to_segment.to(self.device),
            seq_lens=torch.tensor([p.end for p in chosen], dtype=torch.int32, device=self.device),
            clustered_segments=torch.tensor(
                [len(p.sequence.pool_segment_slots) for p in chosen], dtype=torch.int32,
                device=self.device,
            ),
            targets=torch.tensor([p.sequence.request.tactic.target for p in chosen],
                                 dtype=torch.float32, device=self.device),
            max_seq_len=max_len,
        )  # fmt: skip

    def _cluster_new_segments(self, sequence: Sequence) -> None:
        size = self.pool.segment_size
        done = len(sequence.clusters[0])
        if sequence.computed // size <= done:
            return
        started = time.perf_counter()
        config = self.tactic
        for segment in range(done, sequence.computed // size):
            slots = sequence.slots[segment * size : (segment + 1) * size].to(self.device)
            indexes = [build_cluster_index(k[slots], config) for k in self.pool.k]
            for layer, index in enumerate(indexes):
                sequence.clusters[layer].append(index)
            sequence.segment_slots.append(self.pool.store_segment(indexes, slots))
            self.clustered_segments += 1
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
            pool_slot = sequence.segment_slots.pop(0)
            sequence.shared.append(self.pool.register(keys[index], slots, clusters, pool_slot))
