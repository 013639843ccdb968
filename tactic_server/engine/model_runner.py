"""Runs one scheduled step: lays the step's tokens out as one batch, plans its attention once (the
decodes the kernels run through the shared Tactic decoder, the rest in torch), runs the model,
adds the step's Tactic statistics and reads them back once, and samples the next tokens; then
clusters the segments the step completed and hands full prompt segments to the prefix cache."""

from __future__ import annotations

import time

import torch
from tactic_server.kernels.decode_attention import dense_rows

from tactic_server.decode import ClusterSide, DecodePlan, TacticDecoder, cost
from tactic_server.decode.clusters import DENSE_LAYER_STEPS
from tactic_server.decode.decoder import DenseRows
from tactic_server.tactic.config import TacticConfig, selects

from .attention import SequenceSlice, StepContext
from .kv_pool import KVPool, segment_keys
from .models import CausalLM
from .sampler import SampledToken, sample
from .scheduler import Step
from .sequence import Sequence
from .types import EngineObserver, TacticUsage


class ModelRunner:
    """backend "triton": decodes through the kernels (Tactic by select_rows, dense over every
    position), the evaluation's baselines in torch; "torch": every decode in torch, Tactic by
    its reference (tactic.selection.plan_tactic) over the same cluster store. max_requests:
    the scheduler's request slots (rows of req_to_token). Clusters are kept for the model's
    global layers only (Tactic selects there; sliding-window layers attend to their window).
    dense_fallback: the kernels' decode batches decode dense where this GPU's cost model says
    selecting would not pay (decode/cost.py; no model on a CPU: they always select)."""

    def __init__(self, model: CausalLM, pool: KVPool, tactic: TacticConfig, device,
                 backend: str, max_requests: int, max_model_len: int,
                 dense_fallback: bool = True) -> None:  # fmt: skip
        self.model = model
        self.pool = pool
        self.device = torch.device(device)
        self.kernels = backend == "triton"
        self.global_layers = model.config.global_layers
        self.side = ClusterSide(pool.num_slots, len(self.global_layers), pool.num_kv_heads,
                                pool.head_dim, pool.dtype, self.device, tactic,
                                max_requests)  # fmt: skip
        pool.on_free = lambda slots: self.side.invalidate(torch.tensor(slots))
        cost_model = cost.for_device(self.device) if dense_fallback and self.kernels else None
        self.decoder = TacticDecoder(
            self.side, tactic, pool.num_kv_heads, cost_model=cost_model,
            bytes_per_token=2 * pool.num_kv_heads * pool.head_dim * pool.dtype.itemsize,
        )  # fmt: skip
        # SGLang's ReqToTokenPool: row r holds the KV slots of the request in request slot r
        self.req_to_token = torch.zeros(max_requests, max_model_len, dtype=torch.int32,
                                        device=self.device)  # fmt: skip
        self._owners: list[Sequence | None] = [None] * max_requests
        self.observer: EngineObserver | None = None

    @property
    def clustered_segments(self) -> int:
        """Segments clustered (per layer set), in all."""
        return self.side.clustered

    def run(self, step: Step) -> dict[Sequence, SampledToken]:
        """The next token of every sequence whose next token this step decides."""
        token_ids, positions, slices, wanted = [], [], [], []
        ranges = [(s, len(s.token_ids) - 1, len(s.token_ids)) for s in step.decode]
        for sequence, start, end in ranges + step.prefill:
            slices.append(SequenceSlice(sequence, start, end, len(token_ids), sequence.slots[:end]))
            token_ids.extend(sequence.token_ids[start:end])
            positions.extend(range(start, end))
            if end == len(sequence.token_ids):  # the last known token: its logits pick the next
                wanted.append((sequence, len(token_ids) - 1))
        if step.prefill:  # the dense fallback measures the periods of decode-only steps
            self.decoder.interrupt()
        context = self._plan(slices)
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            context,
            torch.tensor([row for _, row in wanted], dtype=torch.long, device=self.device),
        )
        self._statistics(context)
        for part in slices:
            part.sequence.computed = part.end
        self._cluster_new_segments([part.sequence for part in slices])
        return {sequence: sample(logits[i], sequence.request.sampling, sequence.generator,
                                 sequence.output_token_ids)
                for i, (sequence, _) in enumerate(wanted)}  # fmt: skip

    def _plan(self, slices: list[SequenceSlice]) -> StepContext:
        """The step's attention, decided once for all layers."""
        for part in slices:
            sequence = part.sequence
            if self._owners[sequence.request_slot] is not sequence:  # its first step
                self._owners[sequence.request_slot] = sequence
                self.side.start_request(sequence.request_slot, sequence.request.tactic.target_mass)
        self._write_table(slices)
        new_slots = torch.cat([part.slots[part.start :] for part in slices]).to(self.device)
        context = StepContext(slices, self.pool.k, self.pool.v, new_slots, self.side,
                              self.decoder, self.req_to_token)  # fmt: skip
        kernels = []
        for part in slices:
            tactic = part.sequence.request.tactic
            if part.is_decode and self.kernels and tactic.method == "tactic":
                kernels.append(part)
                continue
            part.slots = part.slots.to(self.device)  # the kernels read req_to_token instead
            if part.selects and tactic.method == "tactic":
                part.segments = self.side.leading_segments(
                    self.req_to_token, part.sequence.request_slot, part.end)  # fmt: skip
            context.torch_slices.append(part)
        context.plan = self._kernel_plan(kernels) if kernels else None
        if kernels and self.model.config.sliding_layers:
            context.window_plan = self._window_rows(kernels)
        return context

    def _write_table(self, slices: list[SequenceSlice]) -> None:
        """req_to_token up to each slice's end, from where its sequence's row may be stale
        (its new positions, or the whole row once a shared prefix replaced its slots): one
        copy to the device for the step."""
        rows, columns, slots = [], [], []
        for part in slices:
            sequence = part.sequence
            first = min(sequence.table_from, part.start)
            rows.extend([sequence.request_slot] * (part.end - first))
            columns.extend(range(first, part.end))
            slots.append(part.slots[first : part.end])
            sequence.table_from = part.end
        where = torch.tensor([rows, columns], dtype=torch.long).to(self.device)
        self.req_to_token[where[0], where[1]] = torch.cat(slots).int().to(self.device)

    def _kernel_plan(self, chosen: list[SequenceSlice]) -> DecodePlan:
        seq_lens = [part.end for part in chosen]
        targets = [part.sequence.request.tactic.target_mass for part in chosen]
        slots = [part.sequence.request_slot for part in chosen]
        selecting = [i for i, target in enumerate(targets) if selects(target)]
        pays = self.decoder.selection_pays([seq_lens[i] for i in selecting],
                                           [slots[i] for i in selecting])  # fmt: skip
        return self.decoder.plan(
            self.req_to_token, torch.tensor(slots, device=self.device),
            torch.tensor(seq_lens, dtype=torch.int32, device=self.device), seq_lens, targets,
            batch_rows=[part.row for part in chosen], dense_too=True, fallback=not pays,
        )  # fmt: skip

    def _window_rows(self, chosen: list[SequenceSlice]) -> DenseRows:
        """The decodes' last sliding_window positions (what a sliding-window layer reads) as
        dense rows over a table of those positions' slots."""
        window = self.model.config.sliding_window
        starts = [max(0, part.end - window) for part in chosen]
        lengths = [part.end - start for part, start in zip(chosen, starts, strict=True)]
        width = max(lengths)
        request_slots = torch.tensor([part.sequence.request_slot for part in chosen],
                                     device=self.device)  # fmt: skip
        columns = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            width, device=self.device)  # fmt: skip
        columns = columns.clamp(max=self.req_to_token.shape[1] - 1)  # past a row's end: unread
        table = self.req_to_token[request_slots[:, None], columns]  # [n, width]
        seq_lens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        compact = torch.arange(len(chosen), dtype=torch.int32, device=self.device)
        indptr, indices = dense_rows(table, compact, seq_lens, self.pool.num_kv_heads, width)
        rows = torch.tensor([part.row for part in chosen], dtype=torch.long, device=self.device)
        return DenseRows(rows=rows, request_slots=request_slots, req_to_token=table,
                         seq_lens=seq_lens, max_seq_len=width, indptr=indptr,
                         indices=indices)  # fmt: skip

    def _statistics(self, context: StepContext) -> None:
        """The step's selections into the running sums (device), then one read of the sums of
        every request that selected."""
        if context.plan is not None:
            self.decoder.finish(context.plan)
        selecting = context.torch_selecting
        if selecting:
            # the reference's counts may sit on the host (the kernels' never do)
            attended = torch.stack([torch.stack(layer) for layer in context.torch_attended])
            mass = torch.stack([torch.stack(layer) for layer in context.torch_mass])
            attended, mass = attended.to(self.device), mass.to(self.device)
            self.decoder.add_statistics(
                torch.tensor([part.sequence.request_slot for part in selecting],
                             device=self.device),
                torch.tensor([part.end for part in selecting], device=self.device),
                attended, mass, torch.ones(len(selecting), dtype=torch.bool, device=self.device),
            )  # fmt: skip
        chosen = [part.sequence for part in context.slices if part.selects]
        if not chosen:
            return
        slots = torch.tensor([sequence.request_slot for sequence in chosen], device=self.device)
        for sequence, row in zip(chosen, self.side.stats[slots].tolist(), strict=True):
            self.decoder.observe(sequence.request_slot, row)
            ratio, mass, attended, steps, dense_steps = row[:5]
            if steps > 0:
                sequence.usage = TacticUsage(ratio / steps, mass / steps, attended / steps,
                                             int(steps), int(dense_steps),
                                             round(row[DENSE_LAYER_STEPS]))  # fmt: skip

    def _cluster_new_segments(self, sequences: list[Sequence]) -> None:
        """The full segments of selecting requests, once computed (a dense request's are
        clustered when a selecting one first reads them, e.g. through a shared prefix)."""
        chosen = [s for s in sequences if s.request.tactic.kernels
                  and s.computed // self.pool.segment_size > s.clustered]  # fmt: skip
        if not chosen:
            return
        started, before = time.perf_counter(), self.side.clustered
        entries = [(s.request_slot, s.clustered, s.computed) for s in chosen]
        k_buffers = [self.pool.k[layer] for layer in self.global_layers]
        counts = self.side.cluster_requests(entries, self.req_to_token, k_buffers)
        for sequence, count in zip(chosen, counts, strict=True):
            sequence.clustered = count
        if self.observer is not None and self.side.clustered > before:
            self.observer.on_clustering(time.perf_counter() - started)

    def share_prompt_segments(self, sequence: Sequence) -> None:
        """Once a prompt is computed, its full segments join the prefix cache, so a later
        request starting with the same tokens skips them (and finds their clusters). Where an
        equal segment was cached already, the request moves to its slots."""
        size = self.pool.segment_size
        keys = segment_keys(sequence.request.prompt_token_ids, size)
        for index in range(len(sequence.shared), len(keys)):
            slots, sequence.own_slots = sequence.own_slots[:size], sequence.own_slots[size:]
            segment = self.pool.register(keys[index], slots)
            if segment.slots.tolist() != slots:
                sequence.table_from = min(sequence.table_from, index * size)
                sequence.clustered = min(sequence.clustered, index)
            sequence.shared.append(segment)
