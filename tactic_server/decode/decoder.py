"""One Tactic decode step over a paged KV pool in SGLang's layout (req_to_token, per-layer K and V
[num_slots, H_kv, d]), for either engine: which rows select (tactic.config.selects) and which
attend to everything, the per-step inputs of the kernels (built once, shared by all layers), each
layer's attention, and the statistics summed on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tactic_server.kernels.decode_attention import (
    dense_rows,
    sparse_decode,
    sparse_decode_balanced,
)
from tactic_server.kernels.selection import select_rows
from tactic_server.tactic.config import TacticConfig, selects

from .clusters import DENSE_LAYER_STEPS, LAST_RATIO, STATS, ClusterSide
from .cost import DecodeCostModel, MeasuredPaths


@dataclass
class Rows:
    """A subset of the batch's rows in the kernels' compact layout (request i of the subset is
    row i of req_to_token)."""

    rows: torch.Tensor  # [n] int64 rows of the batch
    request_slots: torch.Tensor  # [n] int64 SGLang req_pool_indices
    req_to_token: torch.Tensor  # [n, max_seq_len] int32
    seq_lens: torch.Tensor  # [n] int32
    max_seq_len: int

    @property
    def compact(self) -> torch.Tensor:
        return torch.arange(self.rows.shape[0], dtype=torch.int32, device=self.rows.device)


@dataclass
class TacticRows(Rows):
    targets: torch.Tensor = None  # [n] float32
    req_to_segment: torch.Tensor = None  # [n, max_segments] int32
    clustered: torch.Tensor = None  # [n] int32
    # per layer (indptr, estimated_mass), None where the layer decoded these rows dense
    selections: list = field(default_factory=list)
    # cluster layers whose attention was flat: they decode these rows over every position
    # (full_indptr, full_indices), this step, instead of selecting
    dense_layers: frozenset = frozenset()
    full_indptr: torch.Tensor = None
    full_indices: torch.Tensor = None


@dataclass
class DenseRows(Rows):
    indptr: torch.Tensor = None
    indices: torch.Tensor = None


@dataclass
class DecodePlan:
    tactic: TacticRows | None
    dense: DenseRows | None


class TacticDecoder:
    """num_kv_heads: this rank's KV heads. combine_ranks, with tensor parallelism, turns each
    rank's per-request statistics [n, 5] into their mean over the ranks (a collective: every
    rank calls it at the same step), so any rank's sums describe all heads.
    cost_model (None: always select) predicts per decode batch whether selecting pays
    (`selection_pays`), from the selected ratios the engine observed (`observe`), and
    MeasuredPaths checks the prediction against the step periods the engine lives (the faster
    path measured wins; the other is probed now and then); bytes_per_token: K and V bytes of
    one position in one layer on this rank; probe_every: the steps before the first probe of
    the path not taken.
    The model also decides per layer (`dense_layers`): in a batch that selects, a layer whose
    requests' last selected ratios there say selecting would not pay (flat attention on that
    layer) decodes dense, except at every layer_probe_every-th such decision, when every layer
    selects, so that the flat layers' ratios stay measured. CUDA-graph plans (`graph_plan`)
    select on every layer."""

    def __init__(
        self,
        side: ClusterSide,
        config: TacticConfig,
        num_kv_heads: int,
        combine_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cost_model: DecodeCostModel | None = None,
        bytes_per_token: int = 0,
        probe_every: int = 16,
        clock: Callable[[], float] | None = None,
        layer_probe_every: int = 32,
        pdl: bool = True,
    ) -> None:
        self.side = side
        # the kernels launched dependently (select_rows' pdl; CUDA from Hopper on, else ignored)
        self.pdl = pdl
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.combine_ranks = combine_ranks
        self.cost_model = cost_model
        self.bytes_per_token = bytes_per_token
        self.expected_ratio: dict[int, float] = {}  # request slot -> its last selected ratio
        self.expected_layers: dict[int, np.ndarray] = {}  # request slot -> the same per layer
        self.dense_layers: frozenset[int] = frozenset()  # the next plan's flat layers
        self.layer_probe_every = layer_probe_every
        self.layer_decisions = 0  # decisions that found a flat layer
        # with tensor parallelism the ranks' clocks would split their paths: the model decides
        self.measured = MeasuredPaths(first_probe=probe_every, measure=combine_ranks is None,
                                      **({"clock": clock} if clock else {}))  # fmt: skip

    def observe(self, request_slot: int, stats_row) -> None:
        """A request's running sums as the engine read them back (a row of side.stats): its
        last selecting step's ratio is what the cost model expects of its next (0, selecting,
        until one has run), and per layer (the request's last ratio there; 0: never selected,
        the request's ratio stands in)."""
        self.expected_ratio[request_slot] = float(stats_row[LAST_RATIO])
        layers = np.asarray(stats_row[STATS:], dtype=np.float64)
        if layers.any():
            self.expected_layers[request_slot] = layers
        else:  # none yet (a new request in the slot): not the slot's last request's
            self.expected_layers.pop(request_slot, None)

    def selection_pays(self, seq_lens_cpu: list[int], slots_cpu: list[int]) -> bool:
        """Whether this decode batch's selecting requests (contexts, request slots) should
        select, or decode dense (the fallback). Called once per decode step with selecting
        requests; `interrupt` for the engine's other steps. The batch selects where any layer
        pays; the layers that do not are the next plan's dense_layers."""
        self.dense_layers = frozenset()
        if not seq_lens_cpu:
            self.interrupt()
            return True
        if self.cost_model is None:
            return True
        selected = self._selected_tokens(seq_lens_cpu, slots_cpu)
        pays = self.cost_model.pays_each(seq_lens_cpu, selected, self.bytes_per_token)
        chosen = self.measured.choose(len(seq_lens_cpu), any(pays))
        # where the periods overruled a model that found no layer paying, every layer selects
        if chosen and any(pays) and not all(pays):
            self.layer_decisions += 1
            if self.layer_decisions % self.layer_probe_every:
                self.dense_layers = frozenset(i for i, p in enumerate(pays) if not p)
        return chosen

    def _selected_tokens(self, seq_lens_cpu: list[int], slots_cpu: list[int]) -> np.ndarray:
        """Per cluster layer, the positions the batch is expected to select there: each
        request's last ratio on that layer (its ratio where it has none), times its length."""
        ratios = np.array([self.expected_ratio.get(slot, 0.0) for slot in slots_cpu])
        per_layer = np.zeros((len(slots_cpu), len(self.side.pools)))
        for row, slot in enumerate(slots_cpu):
            if (layers := self.expected_layers.get(slot)) is not None:
                per_layer[row] = layers
        per_layer = np.where(per_layer > 0, per_layer, ratios[:, None]).clip(0.0, 1.0)
        return np.asarray(seq_lens_cpu, dtype=np.float64) @ per_layer

    def interrupt(self) -> None:
        """A step that was no decode of selecting requests: the next period is not measured."""
        self.measured.interrupt()

    def plan(
        self,
        req_to_token: torch.Tensor,
        request_slots: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: list[int],
        targets_cpu: list[float],
        batch_rows: list[int] | None = None,
        dense_too: bool = False,
        fallback: bool = False,
    ) -> DecodePlan | None:
        """The decode of the given requests (request_slots, seq_lens [n] on the device, their
        lengths and targets on the host), request i at row batch_rows[i] of the step's batch
        (default i). None when no row selects, unless dense_too (an engine without a dense
        decode of its own): the caller's dense path runs. fallback (selection_pays said no):
        the rows that would select decode dense, and their statistics count the step as one
        that read every position. The tactic rows decode the decoder's dense_layers (set by
        selection_pays) dense."""
        chosen = [i for i, target in enumerate(targets_cpu) if selects(target)]
        if fallback and chosen:
            rows = torch.tensor(chosen, dtype=torch.long, device=seq_lens.device)
            self.count_fallback(request_slots[rows], [seq_lens_cpu[i] for i in chosen])
            chosen = []
        if not chosen and not dense_too:
            return None
        others = [i for i, target in enumerate(targets_cpu) if not selects(target) or fallback]
        batch_rows = list(range(len(targets_cpu))) if batch_rows is None else batch_rows
        rows = (batch_rows, req_to_token, request_slots, seq_lens, seq_lens_cpu)
        tactic = None
        if chosen:
            tactic = self._rows(TacticRows, chosen, *rows)
            self._selection_inputs(tactic, req_to_token)
            if self.dense_layers:
                tactic.dense_layers = self.dense_layers
                tactic.full_indptr, tactic.full_indices = dense_rows(
                    tactic.req_to_token, tactic.compact, tactic.seq_lens, self.num_kv_heads,
                    tactic.max_seq_len,
                )  # fmt: skip
        dense = None
        if others:
            dense = self._rows(DenseRows, others, *rows)
            dense.indptr, dense.indices = dense_rows(
                dense.req_to_token, dense.compact, dense.seq_lens, self.num_kv_heads,
                dense.max_seq_len,
            )  # fmt: skip
        return DecodePlan(tactic, dense)

    def graph_plan(
        self, req_to_token: torch.Tensor, request_slots: torch.Tensor, seq_lens: torch.Tensor,
        max_seq_len: int,
    ) -> DecodePlan:  # fmt: skip
        """Every row through selection (a target >= 1 selects every position), everything
        sized from max_seq_len, the graph's context bound, and computed on the device from the
        batch's tensors: what a CUDA graph captures and replays. Rows SGLang pads a graph's
        batch with (length 1, any request slot) attend to one position and add no
        statistics."""
        device = seq_lens.device
        slots = request_slots.long()
        tactic = TacticRows(rows=torch.arange(slots.shape[0], device=device), request_slots=slots,
                            req_to_token=req_to_token[slots, :max_seq_len],
                            seq_lens=seq_lens.int(), max_seq_len=max_seq_len)  # fmt: skip
        self._selection_inputs(tactic, req_to_token)
        return DecodePlan(tactic, None)

    def _selection_inputs(self, tactic: TacticRows, req_to_token: torch.Tensor) -> None:
        """The rows' targets and segment tables, over the full segments of the cached context
        (the new token's K is written by this step), up to the rows' max_seq_len."""
        tactic.targets = self.side.targets[tactic.request_slots]
        tactic.req_to_segment, tactic.clustered = self.side.segment_table(
            req_to_token, tactic.request_slots, tactic.seq_lens - 1,
            (tactic.max_seq_len - 1) // self.side.segment_size,
        )  # fmt: skip

    def _rows(self, kind, chosen, batch_rows, req_to_token, request_slots, seq_lens,
              seq_lens_cpu):  # fmt: skip
        device = seq_lens.device
        entries = torch.tensor(chosen, dtype=torch.long, device=device)
        rows = torch.tensor([batch_rows[i] for i in chosen], dtype=torch.long, device=device)
        slots = request_slots[entries].long()
        max_len = max(seq_lens_cpu[i] for i in chosen)
        return kind(rows=rows, request_slots=slots, req_to_token=req_to_token[slots, :max_len],
                    seq_lens=seq_lens[entries].int(), max_seq_len=max_len)  # fmt: skip

    def attend(
        self, plan: DecodePlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        layer: int, out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention output [batch, H_q, d] of one layer (q [batch, H_q, d]) at the plan's rows,
        written into `out` when given (its other rows are left as they are)."""
        out = torch.empty_like(q) if out is None else out
        if (tactic := plan.tactic) is not None:
            queries = q[tactic.rows].to(k_cache.dtype).contiguous()
            if layer in tactic.dense_layers:  # flat here: every position, no selection
                indptr, indices = tactic.full_indptr, tactic.full_indices
                tactic.selections.append(None)
            else:
                selected = select_rows(
                    queries, k_cache, self.side.pools[layer], tactic.req_to_segment,
                    tactic.req_to_token, tactic.compact, tactic.seq_lens,
                    tactic.targets, tactic.max_seq_len, self.config, tactic.clustered,
                    pdl=self.pdl,
                )  # fmt: skip
                indptr, indices = selected.indptr, selected.indices
                tactic.selections.append((selected.indptr, selected.estimated_mass))
            # the selected rows differ in length: their tokens shared evenly among programs
            attended = sparse_decode_balanced(queries, k_cache, v_cache, indptr, indices,
                                              pdl=self.pdl)  # fmt: skip
            out[tactic.rows] = attended.to(q.dtype)
        if (dense := plan.dense) is not None:
            queries = q[dense.rows].to(k_cache.dtype).contiguous()
            out[dense.rows] = sparse_decode(queries, k_cache, v_cache, dense.indptr, dense.indices,
                                            dense.max_seq_len).to(q.dtype)  # fmt: skip
        return out

    def finish(self, plan: DecodePlan) -> None:
        """Add this step's means over layers and KV heads to the request slots' running sums
        (device only)."""
        tactic = plan.tactic
        if tactic is None or not tactic.selections:
            return
        rows = tactic.rows.shape[0]
        picked = [entry for entry in tactic.selections if entry is not None]
        selected = None
        if picked:
            indptr = torch.stack([indptr for indptr, _ in picked])
            lengths = (indptr[:, 1:] - indptr[:, :-1]).view(len(picked), rows, -1)
            attended = lengths.float().mean(dim=2)  # [layers that selected, n]
            mass = torch.stack([m for _, m in picked]).mean(dim=2)
        if len(picked) < len(tactic.selections):  # flat layers read every position
            selected = [entry is not None for entry in tactic.selections]
            full = tactic.seq_lens.float()
            measured = iter(zip(attended, mass, strict=True)) if picked else iter(())
            layers = [next(measured) if s else (full, torch.ones_like(full)) for s in selected]
            attended = torch.stack([a for a, _ in layers])
            mass = torch.stack([m for _, m in layers])
        # only rows that select (a graph's batch also holds dense rows and padding)
        counted = (tactic.seq_lens > 1) & selects(tactic.targets)
        self.add_statistics(tactic.request_slots, tactic.seq_lens, attended, mass, counted,
                            selected)  # fmt: skip
        tactic.selections.clear()

    def add_statistics(self, request_slots: torch.Tensor, seq_lens: torch.Tensor,
                       attended: torch.Tensor, mass: torch.Tensor, counted: torch.Tensor,
                       selected: list[bool] | None = None) -> None:  # fmt: skip
        """One decode step of n requests: attended tokens and estimated mass [L, n] per layer
        (means over KV heads), into the running sums of the rows in `counted` [n] (selected
        ratio, estimated mass and attended tokens, each a mean over the layers; steps), and
        each layer's ratio into the rows' per-layer columns where the layer selected
        (`selected` [L], default all; the others decoded dense and count as layer-steps)."""
        layer_ratios = (attended / seq_lens.float()).T  # [n, L]
        attended, mass = attended.mean(dim=0), mass.mean(dim=0)
        ratio = attended / seq_lens.float()
        dense_layers = 0 if selected is None else selected.count(False)
        step = torch.stack([ratio, mass, attended, torch.ones_like(ratio),
                            torch.zeros_like(ratio), torch.full_like(ratio, dense_layers)],
                           dim=1)  # fmt: skip
        step = torch.cat([step, layer_ratios], dim=1) * counted[:, None]
        if self.combine_ranks is not None:
            step = self.combine_ranks(step)
        self._add_step(request_slots, step, counted, selected)

    def count_fallback(self, request_slots: torch.Tensor | list[int],
                       lengths_cpu: list[int]) -> None:  # fmt: skip
        """A dense-fallback step of these requests (slots on the device or the host, their
        lengths on the host): every position read, all the mass covered (no collective: every
        rank counts the same). Built on the host and added by one copy and one index_add (it
        was a dozen small launches): a fallback step should cost what a dense request's does,
        and at batch 1 the host's work is much of a step."""
        if not lengths_cpu:
            return
        stats = self.side.stats
        pinned = stats.is_cuda
        lengths = torch.tensor(lengths_cpu, dtype=stats.dtype)
        ones = torch.ones_like(lengths)
        step = torch.stack([ones, ones, lengths, ones, ones], dim=1)
        step = (step.pin_memory() if pinned else step).to(stats.device, non_blocking=True)
        slots = torch.as_tensor(request_slots, dtype=torch.long)
        if slots.device != stats.device:
            slots = (slots.pin_memory() if pinned else slots).to(stats.device, non_blocking=True)
        stats[:, :5].index_add_(0, slots, step)

    def _add_step(self, request_slots: torch.Tensor, step: torch.Tensor, counted: torch.Tensor,
                  layers: list[bool] | None = None) -> None:  # fmt: skip
        """step [n, 6 + L]: its first five columns and its dense layer-steps into the sums;
        where counted, its ratio becomes the slot's last, and its per-layer ratios (columns 6
        on) the slot's per-layer ones, on the `layers` that selected (default all)."""
        stats = self.side.stats
        stats[:, :5].index_add_(0, request_slots, step[:, :5])
        stats[:, DENSE_LAYER_STEPS].index_add_(0, request_slots, step[:, 5])
        last = stats[request_slots, LAST_RATIO]
        stats[request_slots, LAST_RATIO] = torch.where(counted, step[:, 0], last)
        keep = counted[:, None]
        if layers is not None:
            keep = keep & torch.tensor(layers, device=counted.device)[None, :]
        per_layer = stats[request_slots, STATS:]
        stats[request_slots, STATS:] = torch.where(keep, step[:, 6:], per_layer)
