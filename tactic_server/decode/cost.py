"""When selection pays: a per-batch cost model of one layer's decode attention, dense against
Tactic (selection, then attention over the selected share), so that a batch whose contexts are
short or whose attention is flat decodes dense instead of paying for a selection that saves
nothing (the dense fallback).

The model is a roofline with latency floors, in the bytes a layer's decode reads:
  dense  = dense_floor + dense_per_byte * K+V bytes of the batch's contexts
  select = select_floor + select_per_row * batch + select_per_byte * K bytes of the contexts
  attend = smax(attend_floor, attend_per_byte * K+V bytes selected) + attend_per_row * batch
with smax(a, b) = (a^4 + b^4)^(1/4), a smooth max. Dense is a sum, not a max: its fixed cost
(launch, split and merge, about 0.02 ms) adds to its streaming time, which at 32k batch 1 runs
at two thirds of the bandwidth (a max fitted to 32k and longer contexts put a floor of 0.06 ms
under every shorter one, and so sent 4k-8k batches to selection where dense is faster). Its
constants are fitted (`fit`) to the records of benchmarks/decode_attention.py on one device and
kept here by device name; the selected share of a request is the one its last selecting step
measured (a request not seen yet is assumed to select little, so its first step selects and
measures it).

The model is fitted on one layer shape (a Llama-3.1-8B layer: 8 KV heads of 128); on another
(one KV head, say, where FlashInfer's dense decode is far from the bandwidth the model assumes)
it can be wrong. So the engine also measures (`MeasuredPaths`): the period of its decode steps
on either path, per batch size; once both are known, the faster one wins over the model's
prediction, and the other is probed for a few steps at intervals that double while it stays
slower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

logger = logging.getLogger(__name__)

FIT_PARAMETERS = ("dense_floor_ms", "dense_ms_per_gb", "select_floor_ms", "select_ms_per_row",
                  "select_ms_per_gb", "attend_floor_ms", "attend_ms_per_gb",
                  "attend_ms_per_row")  # fmt: skip


def smooth_max(a, b):
    return (a**4 + b**4) ** 0.25


@dataclass(frozen=True)
class DecodeCostModel:
    """Milliseconds of one layer's decode attention over a batch (see the module docstring).
    margin: selection must be predicted to take at most this share of the dense time (the
    model is within about 10% of the measured times; a wrong pick near the break-even point
    then costs little)."""

    dense_floor_ms: float
    dense_ms_per_gb: float
    select_floor_ms: float
    select_ms_per_row: float
    select_ms_per_gb: float
    attend_floor_ms: float
    attend_ms_per_gb: float
    attend_ms_per_row: float
    margin: float = 0.9
    source: str = ""

    def dense_ms(self, kv_bytes: float) -> float:
        return self.dense_floor_ms + self.dense_ms_per_gb * kv_bytes / 1e9

    def tactic_ms(self, batch: int, kv_bytes: float, selected_bytes):
        """selected_bytes: a number, or an array of them (one time each)."""
        # selection reads the keys' side only (centroids, and the keys it scores exactly)
        select = self.select_floor_ms + self.select_ms_per_row * batch
        select += self.select_ms_per_gb * kv_bytes / 2e9
        attend = smooth_max(self.attend_floor_ms, self.attend_ms_per_gb * selected_bytes / 1e9)
        return select + attend + self.attend_ms_per_row * batch

    def pays(self, seq_lens: Sequence[int], ratios: Sequence[float], bytes_per_token: int) -> bool:
        """Whether selecting beats dense for a batch of contexts seq_lens whose requests select
        the given shares; bytes_per_token: K and V bytes of one position in one layer."""
        pairs = zip(seq_lens, ratios, strict=True)
        selected = float(sum(n * min(max(r, 0.0), 1.0) for n, r in pairs))
        return self.pays_each(seq_lens, [selected], bytes_per_token)[0]

    def pays_each(self, seq_lens: Sequence[int], selected_tokens: Sequence[float],
                  bytes_per_token: int) -> list[bool]:  # fmt: skip
        """pays for each entry of selected_tokens (the batch's selected positions in all, e.g.
        one entry per layer), the dense time computed once."""
        kv_bytes = float(sum(seq_lens)) * bytes_per_token
        selected_bytes = np.asarray(selected_tokens, dtype=np.float64) * bytes_per_token
        tactic = self.tactic_ms(len(seq_lens), kv_bytes, selected_bytes)
        return (tactic <= self.margin * self.dense_ms(kv_bytes)).tolist()


def fit(records: Sequence[dict], bytes_per_token: int, dense_key: str = "dense_ms",
        source: str = "") -> DecodeCostModel:  # fmt: skip
    """Least squares on relative error over benchmark records (context, batch,
    selected_fraction, select_ms, attend_ms and dense_key: the dense path the engine falls back
    to), in float64 on the CPU."""
    t = torch.tensor
    batch = t([float(r["batch"]) for r in records], dtype=torch.float64)
    kv_gb = t([float(r["batch"] * r["context"]) for r in records], dtype=torch.float64)
    kv_gb = kv_gb * bytes_per_token / 1e9
    selected_gb = kv_gb * t([float(r["selected_fraction"]) for r in records], dtype=torch.float64)
    dense = t([float(r[dense_key]) for r in records], dtype=torch.float64)
    select = t([float(r["select_ms"]) for r in records], dtype=torch.float64)
    attend = t([float(r["attend_ms"]) for r in records], dtype=torch.float64)

    def solve(initial, predict, measured):
        # positive parameters through their logs; relative error, so short cells count as much
        log_p = torch.log(t(initial, dtype=torch.float64)).requires_grad_()
        optimizer = torch.optim.LBFGS([log_p], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (((predict(log_p.exp()) - measured) / measured) ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return log_p.detach().exp().tolist()

    d = solve([0.02, 0.3], lambda p: p[0] + p[1] * kv_gb, dense)
    s = solve([0.03, 0.003, 0.2], lambda p: p[0] + p[1] * batch + p[2] * kv_gb / 2, select)
    a = solve([0.02, 1.0, 0.001],
              lambda p: smooth_max(p[0], p[1] * selected_gb) + p[2] * batch, attend)  # fmt: skip
    return DecodeCostModel(*d, *s, *a, source=source)


# Fitted by `python benchmarks/fit_cost_model.py <the runs> --variant exact_fraction_0` (from
# benchmarks/results; Llama-3.1-8B layer: 8 KV heads of 128, bf16; the fallback is our dense
# decode kernel, Tactic's times those of the selection without the exact top, the default):
# H200: decode_attention_exact_programs_53cba0b_h200.json,
# decode_attention_exact0_128k_10_30_53cba0b_h200.json and
# decode_attention_exact0_32k_256k_53cba0b_h200.json:
# 16 of 16 cells picked the faster path, over our dense kernel and over FlashInfer's
# (cost_model_exact0_53cba0b_h200.txt; the fit with the exact top sent 32k batch 1 to dense for
# 1.24-1.29x what selecting takes)
_H200 = DecodeCostModel(
    dense_floor_ms=0.020545555,
    dense_ms_per_gb=0.226565156,
    select_floor_ms=0.022693392,
    select_ms_per_row=0.001283881,
    select_ms_per_gb=0.040000196,
    attend_floor_ms=0.016897256,
    attend_ms_per_gb=0.262521187,
    attend_ms_per_row=0.0012197,
    source="benchmarks/results/decode_attention_*_53cba0b_h200.json (2026-12-07, "
    "no exact top)",
)
# H100: decode_attention_table_88e6ab9_h100.json (the full table as the server selects and
# attends): 20 of 20 cells picked the faster path over our dense kernel and over FlashInfer's
# (cost_model_88e6ab9_h100.txt; the fit before it, with the exact top, 19 and 16 of 20: it sent
# 32k batch 1 to FlashInfer for up to 1.68x what selecting takes). Neither run has a cell below
# 32k; the H200's dense line predicts 0.028 ms at 8k batch 1, where the 2026-12-02 run measured
# our kernel at 0.029 (decode_attention_h200.json), and the engine's measured periods
# (MeasuredPaths) overrule a wrong prediction anyway.
_H100 = DecodeCostModel(
    dense_floor_ms=0.021697839,
    dense_ms_per_gb=0.316835164,
    select_floor_ms=0.024512069,
    select_ms_per_row=0.001144441,
    select_ms_per_gb=0.043126679,
    attend_floor_ms=0.018008747,
    attend_ms_per_gb=0.387931805,
    attend_ms_per_row=0.00116771,
    source="benchmarks/results/decode_attention_table_88e6ab9_h100.json (2026-12-07, "
    "no exact top)",
)
# each GPU's "/flashinfer" model: the same run against FlashInfer's dense decode
# (`--dense-key flashinfer_dense_ms`), what the SGLang plugin falls back to over SGLang's
# FlashInfer backend; its selection and attention constants are the run's own
MODELS: dict[str, DecodeCostModel] = {
    "H200": _H200,
    "H200/flashinfer": replace(
        _H200, dense_floor_ms=0.024347515, dense_ms_per_gb=0.221530237,
        source="benchmarks/results/decode_attention_*_53cba0b_h200.json (2026-12-07), "
        "flashinfer_dense_ms",
    ),  # fmt: skip
    "H100": _H100,
    "H100/flashinfer": replace(
        _H100, dense_floor_ms=0.025402624, dense_ms_per_gb=0.31420542,
        source="benchmarks/results/decode_attention_table_88e6ab9_h100.json (2026-12-07), "
        "flashinfer_dense_ms",
    ),  # fmt: skip
}


def for_device(device: torch.device | str, dense: str = "kernel") -> DecodeCostModel | None:
    """The model fitted on this GPU's kind (by the name CUDA gives it), the nearest one on
    another Hopper GPU, None on a CPU (the torch path has no selection launches to amortise:
    it always selects). dense: the path a fallback takes, "kernel" (ours) or "flashinfer"
    (SGLang's FlashInfer backend); another (SGLang's slower Triton decode) takes ours, which
    makes the fallback rarer than it could be, never wrongly taken."""
    device = torch.device(device)
    if device.type != "cuda" or not MODELS:
        return None
    name = torch.cuda.get_device_name(device)
    kind = next((key for key in MODELS if "/" not in key and key in name), "H200")
    # FA3 has no fit of its own yet: its decode ran within 15% of FlashInfer's either way on the
    # H100 (benchmarks/results/sglang_h100.md), nearer than our kernel's
    dense = "flashinfer" if dense == "fa3" else dense
    return MODELS.get(f"{kind}/{dense}", MODELS[kind])


def describe(model: DecodeCostModel) -> dict:
    return asdict(model)


class MeasuredPaths:
    """Which decode path is faster as the engine lives it: the period between consecutive
    decode steps of one batch size, attributed to the path of the earlier step and kept as an
    exponential mean per (batch size, path). A step right after a switch of path is not
    measured (its period still holds the other path's work, with overlapped scheduling too),
    nor a period a non-decode step came into (`interrupt`). Until both paths are measured for
    a batch size, the model's prediction decides; the path not preferred is probed for
    probe_steps steps after every `interval` steps of that batch size, which starts at
    first_probe and doubles (up to max_interval) each time a probe confirms the preference:
    per batch size, so that one whose paths were never measured is probed soon even where
    another's probes have backed off (H100, trained 13M at 128k: batch 1's grew past a whole
    run of batch 8, which never measured its dense path and selected though slower).
    measure=False (tensor parallelism: every rank must take the same path, and their clocks
    differ) leaves the model's prediction alone to decide, probes still at the same steps on
    every rank."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, first_probe: int = 16,
                 probe_steps: int = 3, max_interval: int = 512, alpha: float = 0.3,
                 measure: bool = True) -> None:  # fmt: skip
        self.clock = clock
        self.measure = measure
        self.first_probe, self.probe_steps = first_probe, probe_steps
        self.max_interval, self.alpha = max_interval, alpha
        self.periods: dict[tuple[int, bool], float] = {}  # (batch, selects) -> seconds
        self.last: tuple[float, int, bool, int] | None = None  # time, batch, path, run
        self.intervals: dict[int, int] = {}  # batch -> steps between its probes
        self.since_probe: dict[int, int] = {}  # batch -> its steps since its last probe
        self.probing = 0  # steps the running probe still takes
        self.probe_preferred: bool | None = None
        self.probe_batch = 0  # the batch size the running probe measures

    def interrupt(self) -> None:
        """A step that is not a decode of this kind came between: no period to measure."""
        self.last = None

    def preferred(self, batch: int, predicted: bool) -> bool:
        selecting, dense = self.periods.get((batch, True)), self.periods.get((batch, False))
        if selecting is None or dense is None:
            return predicted
        return selecting <= dense

    def _log_probe(self, batch: int, preferred: bool) -> None:
        """What a probe leaves the choice with (INFO; as often as probes run, which back off):
        the two paths' periods of this batch size, and the path taken from here."""
        selecting, dense = self.periods.get((batch, True)), self.periods.get((batch, False))
        shown = ["not measured" if p is None else f"{p * 1e3:.3f} ms" for p in (selecting, dense)]
        logger.info("tactic decode paths, batch %d: selecting %s, dense %s a step; %s next "
                    "(probe again in %d steps)", batch, *shown,
                    "selecting" if preferred else "dense", self.intervals[batch])  # fmt: skip

    def choose(self, batch: int, predicted: bool) -> bool:
        """This decode step's path (True: select), given the cost model's prediction."""
        now = self.clock() if self.measure else 0.0
        if self.measure and self.last is not None and self.last[1] == batch and self.last[3] > 0:
            key = (batch, self.last[2])
            period = now - self.last[0]
            old = self.periods.get(key)
            self.periods[key] = period if old is None else old + self.alpha * (period - old)
        preferred = self.preferred(batch, predicted)
        if self.probing:  # the path the probe set out to measure, whatever it measured so far
            self.probing -= 1
            choice = not self.probe_preferred
            if not self.probing:  # the probe's last step: back off while the preference holds
                held = self.probe_preferred == preferred
                interval = self.intervals.get(self.probe_batch, self.first_probe)
                self.intervals[self.probe_batch] = (min(2 * interval, self.max_interval) if held
                                                    else self.first_probe)  # fmt: skip
                self._log_probe(self.probe_batch, preferred)
        else:
            since = self.since_probe.get(batch, 0) + 1
            choice = preferred
            if since >= self.intervals.get(batch, self.first_probe):
                since, self.probing = 0, self.probe_steps - 1
                self.probe_preferred, self.probe_batch = preferred, batch
                choice = not preferred
            self.since_probe[batch] = since
        same = self.last is not None and self.last[1] == batch and self.last[2] == choice
        self.last = (now, batch, choice, self.last[3] + 1 if same else 0)
        return choice
