"""Runs one scheduled step through the model: lays the step's tokens out as one batch, writes
their KV, returns next-token logits, then clusters newly completed segments and hands full prompt
segments to the prefix cache."""

from __future__ import annotations

import time

import torch
from tactic_server.kernels.decode_attention import dense_rows

from tactic_server.tactic.clustering import build_cluster_index

from .kv_pool import KVPool, segment_keys
from .models.llama import (
    AttentionContext,
    DenseDecodes,
    LlamaForCausalLM,
    SequenceSlice,
    TacticDecodes,
)
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
            slices.append(SequenceSlice(sequence, start, end, len(token_ids), sequence.slots[:end]))
            token_ids.extend(sequence.token_ids[start:end])
            positions.extend(range(start, end))
            if end == len(sequence.token_ids):  # the last known token: its logits pick the next
                wanted.append((sequence, len(token_ids) - 1))
        new_slots = torch.cat([part.slots[part.start :] for part in slices])
        context = AttentionContext(slices, self.pool, self.tactic, new_slots.to(self.device))
        if self.pool.segment_pools:  # the kernels decode: Tactic by select_rows, dense in full
            decodes = [part for part in slices if part.is_decode]
            tactic = [part for part in decodes if part.sequence.request.tactic.kernels]
            dense = [part for part in decodes if not part.sequence.request.tactic.selects]
            context.tactic_decodes = self._tactic_decodes(tactic) if tactic else None
            context.dense_decodes = self._dense_decodes(dense) if dense else None
        for part in context.torch_slices:  # the kernels read req_to_token instead
            part.slots = part.slots.to(self.device)
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            context,
            torch.tensor([row for _, row in wanted], dtype=torch.long, device=self.device),
        )
        if (batch := context.tactic_decodes) is not None:  # one read of the layers' sums
            layers = len(self.pool.k)
            for part, sums in zip(batch.slices, batch.layer_sums(), strict=True):
                part.sequence.tally.add(*sums, steps=layers)
        for part in slices:
            part.sequence.computed = part.end
            self._cluster_new_segments(part.sequence)
        return {sequence: logits[i] for i, (sequence, _) in enumerate(wanted)}

    def _req_to_token(self, chosen) -> tuple[torch.Tensor, torch.Tensor, int]:
        """req_to_token [n, max_len] int32 and seq_lens [n] int32 on the device for the slices
        (their slots still on the host), built on the host and copied once."""
        max_len = max(part.end for part in chosen)
        req_to_token = torch.zeros(len(chosen), max_len, dtype=torch.int32)
        for i, part in enumerate(chosen):
            req_to_token[i, : part.end] = part.slots
        seq_lens = torch.tensor([part.end for part in chosen], dtype=torch.int32)
        return req_to_token.to(self.device), seq_lens.to(self.device), max_len

    def _rows(self, chosen) -> torch.Tensor:
        return torch.tensor([part.row for part in chosen], device=self.device)

    def _tactic_decodes(self, chosen) -> TacticDecodes:
        """The device inputs of select_rows for this step's Tactic decodes."""
        req_to_token, seq_lens, max_len = self._req_to_token(chosen)
        segments = [part.sequence.pool_segment_slots for part in chosen]
        req_to_segment = torch.zeros(len(chosen), max(1, max(map(len, segments))),
                                     dtype=torch.int32)  # fmt: skip
        for i, slots in enumerate(segments):
            req_to_segment[i, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
        device = self.device
        return TacticDecodes(
            slices=chosen,
            rows=self._rows(chosen),
            seq_lens=seq_lens,
            max_seq_len=max_len,
            pool_indices=torch.arange(len(chosen), dtype=torch.int32, device=device),
            req_to_token=req_to_token,
            req_to_segment=req_to_segment.to(device),
            clustered_segments=torch.tensor(
                list(map(len, segments)), dtype=torch.int32, device=device
            ),  # fmt: skip
            targets=torch.tensor(
                [part.sequence.request.tactic.target for part in chosen],
                dtype=torch.float32,
                device=device,
            ),  # fmt: skip
        )

    def _dense_decodes(self, chosen) -> DenseDecodes:
        """Every position of every KV head, as CSR rows shared by all layers of the step."""
        req_to_token, seq_lens, max_len = self._req_to_token(chosen)
        pool_indices = torch.arange(len(chosen), dtype=torch.int32, device=self.device)
        indptr, indices = dense_rows(req_to_token, pool_indices, seq_lens, self.pool.num_kv_heads,
                                     max_len)  # fmt: skip
        return DenseDecodes(chosen, self._rows(chosen), seq_lens, max_len,
                            indptr, indices)  # fmt: skip

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
