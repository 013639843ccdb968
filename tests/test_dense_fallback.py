"""The dense fallback: the cost model (decode/cost.py) fits known timings back, picks the faster
path on the runs it was fitted to, and the decoder and the embedded engine decode dense where
it says selecting would not pay: the same tokens as dense, the steps counted as reading every
position and reported in usage and /metrics, a probe step after a long fallback streak."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tactic_server.decode import ClusterSide, TacticDecoder
from tactic_server.decode.clusters import DENSE_LAYER_STEPS, LAST_RATIO, STATS
from tactic_server.decode.cost import (
    FIT_PARAMETERS,
    MODELS,
    DecodeCostModel,
    MeasuredPaths,
    fit,
    for_device,
    smooth_max,
)
from tactic_server.engine.types import GenerationRequest, TacticParams
from tactic_server.tactic import TacticConfig
from tactic_server.testing.tiny_model import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fit_cost_model import evaluate, timed_records, with_path  # noqa: E402
from test_engine import DENSE, GREEDY, collect, make_engine, prompt_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_BYTES = 8 * 128 * 2 * 2
KNOWN = DecodeCostModel(0.03, 0.25, 0.035, 0.003, 0.09, 0.018, 0.3, 0.001)
NEVER = dataclasses.replace(KNOWN, select_floor_ms=1e6)  # selecting never pays
ALWAYS = dataclasses.replace(KNOWN, dense_floor_ms=1e6)  # it always does


def synthetic_records(m: DecodeCostModel) -> list[dict]:
    """Timings as the model's formulas give them (cost.py's docstring), over a grid of cells."""
    records = []
    for context in (8192, 32768, 131072, 262144):
        for batch in (1, 4, 16):
            for fraction in (0.01, 0.1, 0.3):
                kv_gb = batch * context * LLAMA_BYTES / 1e9
                select = (
                    m.select_floor_ms + m.select_ms_per_row * batch + m.select_ms_per_gb * kv_gb / 2
                )
                attend = (smooth_max(m.attend_floor_ms, m.attend_ms_per_gb * kv_gb * fraction)
                          + m.attend_ms_per_row * batch)  # fmt: skip
                records.append({"context": context, "batch": batch, "selected_fraction": fraction,
                                "dense_ms": m.dense_ms(kv_gb * 1e9), "select_ms": select,
                                "attend_ms": attend})  # fmt: skip
    return records


def test_fit_recovers_the_timings_of_a_known_model():
    records = synthetic_records(KNOWN)
    fitted = fit(records, LLAMA_BYTES)
    for record in records:
        kv = record["batch"] * record["context"] * LLAMA_BYTES
        assert fitted.dense_ms(kv) == pytest.approx(record["dense_ms"], rel=0.02)
        tactic = fitted.tactic_ms(record["batch"], kv, kv * record["selected_fraction"])
        measured = record["select_ms"] + record["attend_ms"]
        assert tactic == pytest.approx(measured, rel=0.05)


# the runs each registered model was fitted to (cost.py), Tactic timed as the server selects
# (no exact top): the H200's as the exact_fraction_0 variant of each cell
FITTED_RUNS = {
    "H200": (["decode_attention_exact_programs_53cba0b_h200.json",
              "decode_attention_exact0_128k_10_30_53cba0b_h200.json",
              "decode_attention_exact0_32k_256k_53cba0b_h200.json"], "exact_fraction_0"),
    "H100": (["decode_attention_table_88e6ab9_h100.json"], None),
}  # fmt: skip


def timed_cells(*runs: str) -> list[dict]:
    """The records of benchmarks/results runs that timed selection (not the clustering ones)."""
    return timed_records(ROOT / "benchmarks/results" / run for run in runs)


def fitted_records(name: str) -> list[dict]:
    """The cells a registered model was fitted to, with the selection the server runs."""
    names, variant = FITTED_RUNS[name]
    return [with_path(r, "attend_ms", None, variant) for r in timed_cells(*names)]


@pytest.mark.parametrize("name", ["H200", "H100"])
@pytest.mark.parametrize("dense", ["kernel", "flashinfer"])
def test_the_model_picks_the_faster_path_on_the_runs_it_was_fitted_to(name, dense):
    """Refitted on the selection without the exact top: right in every cell of those runs
    over our dense kernel and over FlashInfer's (the fits with the exact top sent 32k batch 1
    to dense for 1.24-1.68x what selecting takes there)."""
    model = MODELS[name if dense == "kernel" else f"{name}/{dense}"]
    records = fitted_records(name)
    assert {"H200": "53cba0b_h200", "H100": "88e6ab9_h100"}[name] in model.source
    dense_key = "dense_ms" if dense == "kernel" else "flashinfer_dense_ms"
    rows = evaluate(model, records, LLAMA_BYTES, dense_key)
    assert len(rows) == {"H200": 16, "H100": 20}[name]
    assert all(row["right"] for row in rows), [r for r in rows if not r["right"]]
    assert all(getattr(model, field) > 0 for field in FIT_PARAMETERS)


@pytest.mark.parametrize("name", ["H200", "H100"])
def test_flat_attention_decodes_dense_and_sparse_long_contexts_select(name):
    """Where every position is needed selection is pure cost: dense from 32k on at batch 1 and
    16; at 128k batch 16 with 1% needed, selection (the run's 7.6-10.3x)."""
    model = MODELS[name]
    for context in (32768, 131072):
        for batch in (1, 16):
            assert not model.pays([context] * batch, [1.0] * batch, LLAMA_BYTES)
    assert model.pays([131072] * 16, [0.01] * 16, LLAMA_BYTES)


def test_without_the_exact_top_selection_is_what_the_h200_fit_saw():
    """The H200 runs timed both selections in each cell; the fit takes the one the server runs
    (no exact top, a third faster), not the cell's own."""
    names, variant = FITTED_RUNS["H200"]
    for cell, record in zip(timed_cells(*names), fitted_records("H200"), strict=True):
        assert record["select_ms"] == cell[f"variant_{variant}"]["select_ms"] < cell["select_ms"]


def test_short_contexts_decode_dense_where_dense_is_fast():
    """Dense as a fixed cost plus streaming: fitted to 32k and longer only, the H200 line still
    predicts our dense kernel at 8k batch 1 as the 2026-12-02 run measured it (0.029 ms; a
    smooth max fitted so put a 0.048-ms floor there), so 8k batch 1 decodes dense, as that
    run found faster at every share needed (selection alone took 0.04 ms there)."""
    model = MODELS["H200"]
    short = [r["dense_ms"] for r in timed_cells("decode_attention_h200.json")
             if r["context"] == 8192 and r["batch"] == 1]  # fmt: skip
    assert len(short) == 4  # one a share needed
    for measured in short:
        assert model.dense_ms(8192 * LLAMA_BYTES) == pytest.approx(measured, rel=0.1)
    for needed in (0.01, 0.1, 0.3):
        assert not model.pays([8192], [needed], LLAMA_BYTES)


@pytest.mark.parametrize("gpu,dense,fitted", [
    ("NVIDIA H100 80GB HBM3", "kernel", "H100"),
    ("NVIDIA H100 80GB HBM3", "fa3", "H100/flashinfer"),
    ("NVIDIA H200", "flashinfer", "H200/flashinfer"),
    ("NVIDIA A100-SXM4-80GB", "kernel", "H200"),
])  # fmt: skip
def test_each_gpu_kind_gets_its_own_fit(monkeypatch, gpu, dense, fitted):
    """for_device picks the fit by the name CUDA gives the GPU (the H200's where none is
    fitted), and FlashInfer's dense times for FA3 too."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    assert for_device("cuda", dense) is MODELS[fitted]


def test_flat_attention_falls_back_and_the_other_path_is_probed():
    side = ClusterSide(64, 1, 2, 16, torch.float32, "cpu", TacticConfig(segment_size=32), 4)
    decoder = TacticDecoder(side, side.config, 2, cost_model=MODELS["H200"],
                            bytes_per_token=LLAMA_BYTES, probe_every=3)  # fmt: skip
    decoder.measured.measure = False  # the model alone (the periods: the next tests)
    long = [131072]
    assert decoder.selection_pays(long, [1])  # not seen yet: it selects and measures
    row = [0.0] * 6
    row[5] = 0.997  # flat: its last selecting step read nearly everything
    decoder.observe(1, row)
    # the third decision probes the other path for 3 steps; the probe confirmed the model, so
    # the next comes at the sixth decision after it
    paths = [decoder.selection_pays(long, [1]) for _ in range(12)]
    assert paths == [False, True, True, True] + [False] * 5 + [True] * 3
    row[5] = 0.01
    decoder.observe(1, row)
    assert decoder.selection_pays(long, [1])
    assert not decoder.selection_pays([4096], [2])  # short: the selection's floor dominates


class Clock:
    """Decode steps that take `period[path]` seconds: the engine's clock as MeasuredPaths reads
    it, advanced by the path each step took."""

    def __init__(self, select_s: float, dense_s: float) -> None:
        self.now, self.cost = 0.0, {True: select_s, False: dense_s}

    def __call__(self) -> float:
        return self.now

    def run(self, paths, steps: int, predicted: bool, batch: int = 1) -> list[bool]:
        taken = []
        for _ in range(steps):
            choice = paths.choose(batch, predicted)
            self.now += self.cost[choice]
            taken.append(choice)
        return taken


def test_measured_periods_overrule_a_wrong_model_and_probes_back_off():
    """The model says dense, but the steps that select are faster (a layer shape the model was
    not fitted to): after the first probe has measured both paths, the engine selects; the
    dense path is then probed at doubling intervals, a small share of the steps."""
    clock = Clock(select_s=0.66e-3, dense_s=0.79e-3)
    paths = MeasuredPaths(clock=clock, first_probe=4, probe_steps=3)
    taken = clock.run(paths, 8, predicted=False)
    assert taken[:3] == [False] * 3 and taken[3:6] == [True] * 3  # the model, then a probe
    assert paths.periods[(1, True)] == pytest.approx(0.66e-3)
    assert paths.periods[(1, False)] == pytest.approx(0.79e-3)
    assert taken[6:] == [True, True]  # measured faster: selecting wins over the model
    taken = clock.run(paths, 400, predicted=False)
    assert 0 < taken.count(False) <= 0.05 * len(taken)  # dense probed, ever more rarely
    assert paths.intervals[1] > 64


def test_each_probe_logs_the_periods_it_leaves_the_choice_with(caplog):
    """An operator (or a benchmark's log) sees why the engine decodes as it does: each probe's
    end logs both paths' periods for its batch size and the path taken next."""
    clock = Clock(select_s=0.66e-3, dense_s=0.79e-3)
    paths = MeasuredPaths(clock=clock, first_probe=4, probe_steps=3)
    with caplog.at_level(logging.INFO, logger="tactic_server.decode.cost"):
        clock.run(paths, 8, predicted=False)
    lines = [r.getMessage() for r in caplog.records if "decode paths" in r.getMessage()]
    # the model said dense; the probe measured selecting faster: it selects from here, and the
    # preference having changed, the next probe comes as soon as the first did
    assert lines == ["tactic decode paths, batch 1: selecting 0.660 ms, dense 0.790 ms a step; "
                     "selecting next (probe again in 4 steps)"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tactic_server.decode.cost"):
        clock.run(paths, 10, predicted=False)
    assert caplog.records[-1].getMessage() == (
        "tactic decode paths, batch 1: selecting 0.660 ms, dense 0.790 ms a step; selecting "
        "next (probe again in 8 steps)")  # fmt: skip


def test_a_new_batch_size_is_probed_soon_whatever_another_has_learned():
    """Batch 1 selects faster and its probes back off to long intervals; batch 8, where the
    model still predicts selecting but dense is faster, is probed after first_probe of its own
    steps, measures both paths and decodes dense from then on."""
    clock = Clock(select_s=0.66e-3, dense_s=0.79e-3)
    paths = MeasuredPaths(clock=clock, first_probe=4, probe_steps=3, max_interval=512)
    clock.run(paths, 600, predicted=True)
    assert paths.intervals[1] >= 256
    clock.cost = {True: 1.0e-3, False: 0.6e-3}  # batch 8's steps: selecting does not pay
    taken = clock.run(paths, 200, predicted=True, batch=8)
    assert taken[:3] == [True] * 3 and taken[3:6] == [False] * 3  # its first probe
    assert paths.periods[(8, False)] == pytest.approx(0.6e-3)
    # measured faster: dense wins over the model, selecting probed ever more rarely
    assert taken[6:9] == [False] * 3 and taken[6:].count(False) >= 0.9 * len(taken[6:])


def test_measured_periods_confirm_a_right_model_and_reset_on_other_steps():
    """Flat attention: selecting is slower, as the model says; the probes measure it and the
    engine keeps decoding dense. A step of another kind between two decodes is not measured,
    and batch sizes are measured apart."""
    clock = Clock(select_s=1.0e-3, dense_s=0.6e-3)
    paths = MeasuredPaths(clock=clock, first_probe=4, probe_steps=3)
    taken = clock.run(paths, 200, predicted=False)
    assert taken.count(True) <= 0.1 * len(taken)
    assert paths.periods[(1, True)] == pytest.approx(1.0e-3)
    before = dict(paths.periods)
    paths.interrupt()
    clock.now += 5.0  # a long prefill came between
    paths.choose(1, False)
    assert paths.periods == before
    assert (4, True) not in paths.periods and (4, False) not in paths.periods
    clock.run(paths, 3, predicted=True, batch=4)
    assert paths.periods[(4, True)] == pytest.approx(1.0e-3)  # its own, from its own steps


def test_a_fallback_step_counts_as_reading_everything_and_keeps_the_last_ratio():
    side = ClusterSide(64, 1, 2, 16, torch.float32, "cpu", TacticConfig(segment_size=32), 4)
    decoder = TacticDecoder(side, side.config, 2)
    slots, lengths = torch.tensor([1, 3]), torch.tensor([40, 50], dtype=torch.int32)
    attended = torch.tensor([[4.0, 10.0]])  # one layer, mean over KV heads
    decoder.add_statistics(slots, lengths, attended, torch.tensor([[0.9, 0.95]]),
                           torch.tensor([True, True]))  # fmt: skip
    decoder.count_fallback(slots, lengths.tolist())
    stats = side.stats[slots]
    assert stats[:, 3].tolist() == [2.0, 2.0] and stats[:, 4].tolist() == [1.0, 1.0]
    assert stats[:, 0].tolist() == pytest.approx([0.1 + 1.0, 0.2 + 1.0])
    assert stats[:, 2].tolist() == [44.0, 60.0]
    assert stats[:, 5].tolist() == pytest.approx([0.1, 0.2])  # the selecting step's ratios


def run_engine(tmp_path, cost_model):
    model_dir = make_tiny_model(tmp_path, "llama", seed=5, sparse_attention=True)
    sampling = dataclasses.replace(GREEDY, max_tokens=8)
    # the kernels: under the Triton interpreter on the CPU, compiled on a GPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = make_engine(model_dir, tactic=TacticConfig(segment_size=64), device=device,
                         attention_backend="triton")  # fmt: skip
    engine.runner.decoder.cost_model = cost_model  # the CPU has no fitted model of its own
    requests = [GenerationRequest("k", prompt_ids(180, seed=4), sampling, TacticParams(True, 0.5)),
                GenerationRequest("d", prompt_ids(180, seed=4), sampling, DENSE)]  # fmt: skip

    async def both():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    outputs = asyncio.run(both())
    assert engine.stats().kv_slots_in_use == 0
    return outputs


def test_the_engine_decodes_dense_where_selecting_would_not_pay(tmp_path):
    """Under the Triton interpreter: with a model by which selecting never pays, the Tactic
    request's tokens are the dense request's, and its usage says every step fell back."""
    (tokens, _, usage), (dense_tokens, _, _) = run_engine(tmp_path / "never", NEVER)
    assert tokens == dense_tokens
    tactic = usage.tactic
    assert tactic.decode_steps > 0 and tactic.dense_fallback_steps == tactic.decode_steps
    assert tactic.selected_ratio == pytest.approx(1.0) and tactic.estimated_mass == 1.0
    (_, _, selecting), _ = run_engine(tmp_path / "always", ALWAYS)
    assert selecting.tactic.dense_fallback_steps == 0
    assert selecting.tactic.selected_ratio < 0.9


def test_metrics_count_decode_steps_by_path():
    from prometheus_client import generate_latest

    from tactic_server.api.metrics import RequestTracker, ServerMetrics
    from tactic_server.engine.types import TacticUsage

    metrics = ServerMetrics(lambda: None)
    request = RequestTracker(metrics, TacticParams(True, 0.9))
    last = dataclasses.make_dataclass("Last", ["prompt_tokens", "completion_tokens", "tactic"])
    usage = TacticUsage(0.8, 0.95, 100.0, decode_steps=6, dense_fallback_steps=2,
                        dense_layer_steps=5)
    request.finish(last(10, 7, usage))
    text = generate_latest(metrics.registry).decode()
    families = text_string_to_metric_families(text)
    samples = {(s.name, s.labels.get("path")): s.value for f in families for s in f.samples}
    assert samples[("tactic_decode_steps_total", "selected")] == 4
    assert samples[("tactic_decode_steps_total", "dense_fallback")] == 2
    assert samples[("tactic_dense_layer_steps_total", None)] == 5


def layer_row(ratios: list[float]) -> list[float]:
    """A stats row whose per-layer columns say each layer's last selected ratio."""
    row = [0.0] * STATS + list(ratios)
    row[LAST_RATIO] = sum(ratios) / len(ratios)
    return row


def test_a_flat_layer_decodes_dense_while_the_others_select():
    """Per layer: at 128k the H200 model says selecting pays on a layer that read 1% and not on
    one that read 99.7%; the batch selects, the flat layer is the plan's dense layer, and every
    layer_probe_every-th such decision selects everywhere (the flat layer's ratio is measured
    again). All flat: the batch falls back, and the steps that probe the selecting path
    select on every layer; ratios not yet seen per layer: the request's."""
    side = ClusterSide(64, 3, 2, 16, torch.float32, "cpu", TacticConfig(segment_size=32), 4)
    decoder = TacticDecoder(side, side.config, 2, cost_model=MODELS["H200"],
                            bytes_per_token=LLAMA_BYTES, layer_probe_every=4)  # fmt: skip
    decoder.measured.measure = False
    long = [131072]
    decoder.observe(1, layer_row([0.997, 0.01, 0.02]))
    decisions = []
    for _ in range(8):
        assert decoder.selection_pays(long, [1])
        decisions.append(decoder.dense_layers)
    assert decisions == [{0}] * 3 + [set()] + [{0}] * 3 + [set()]
    decoder.observe(1, layer_row([0.997, 0.995, 0.999]))
    assert not decoder.selection_pays(long, [1]) and not decoder.dense_layers
    decoder.observe(2, [0.0] * 5 + [0.01, 0.0] + [0.0] * 3)  # selected, no layer column yet
    assert decoder.selection_pays(long, [2]) and not decoder.dense_layers
    decoder.observe(1, layer_row([0.997, 0.01, 0.02]))
    decoder.observe(1, [0.0] * (STATS + 3))  # a new request in slot 1: not its layers
    assert decoder.selection_pays(long, [1]) and not decoder.dense_layers
    decoder.observe(1, layer_row([0.997, 0.995, 0.999]))
    # MeasuredPaths probes the selecting path now and then: those steps select on every layer
    steps = [(decoder.selection_pays(long, [1]), decoder.dense_layers) for _ in range(40)]
    assert any(chosen for chosen, _ in steps) and not any(layers for _, layers in steps)


def test_a_dense_layer_attends_to_everything_and_counts_as_reading_it():
    """Under the Triton interpreter: a plan whose layer 0 is flat attends there exactly as
    dense attention does (and layer 1 as selection does); the step's statistics count layer 0
    as reading every position, keep its last selected ratio, and add one dense layer-step."""
    torch.manual_seed(0)
    config = TacticConfig(segment_size=32)
    side = ClusterSide(256, 2, 2, 16, torch.float32, "cpu", config, 4)
    decoder = TacticDecoder(side, config, 2)
    keys = [torch.randn(256, 2, 16) for _ in range(2)]
    values = [torch.randn(256, 2, 16) for _ in range(2)]
    req_to_token = torch.zeros(4, 200, dtype=torch.int32)
    req_to_token[1, :150] = torch.randperm(256)[:150].int()
    side.start_request(1, 0.5)
    side.cluster_requests([(1, 0, 149)], req_to_token, keys)
    side.stats[1, STATS] = 0.25  # layer 0's last ratio, from an earlier step
    decoder.dense_layers = frozenset({0})
    plan = decoder.plan(req_to_token, torch.tensor([1]), torch.tensor([150], dtype=torch.int32),
                        [150], [0.5])  # fmt: skip
    query = torch.randn(1, 4, 16)
    outputs = [decoder.attend(plan, query, keys[layer], values[layer], layer)
               for layer in range(2)]  # fmt: skip
    context = req_to_token[1, :150].long()
    for layer, out in enumerate(outputs):
        k = keys[layer][context].repeat_interleave(2, dim=1)  # [150, 4, 16]: 2 queries a head
        v = values[layer][context].repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[0], k) / 16**0.5
        dense = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
        if layer == 0:
            torch.testing.assert_close(out[0], dense, atol=1e-5, rtol=1e-4)
        else:  # selection at P = 0.5 reads less, and attends to something else
            assert (out[0] - dense).abs().max() > 1e-3
    selected_ratio = (plan.tactic.selections[1][0].diff().float().mean() / 150).item()
    decoder.finish(plan)
    stats = side.stats[1]
    assert stats[3] == 1 and stats[4] == 0 and stats[DENSE_LAYER_STEPS] == 1
    assert stats[0].item() == pytest.approx((1.0 + selected_ratio) / 2)
    assert stats[STATS].item() == 0.25  # the flat layer's last selected ratio stays
    assert stats[STATS + 1].item() == pytest.approx(selected_ratio)


class LayerZeroFlat:
    """A cost model by which selecting pays on every layer but the first: the engine's decode
    with a flat layer, whatever the tiny model's attention."""

    def pays_each(self, seq_lens, selected_tokens, bytes_per_token) -> list[bool]:
        return [layer > 0 for layer in range(len(selected_tokens))]


def test_the_engine_decodes_a_flat_layer_dense_and_reports_it(tmp_path):
    """Under the Triton interpreter: layer 0 decodes dense in every selecting step (usage and
    the /metrics counter say so), layer 1 selects; the request reads more than with every
    layer selecting."""
    (_, _, flat), _ = run_engine(tmp_path / "flat", LayerZeroFlat())
    (_, _, selecting), _ = run_engine(tmp_path / "always", ALWAYS)
    steps = flat.tactic.decode_steps
    assert flat.tactic.dense_fallback_steps == 0 and steps > 0
    assert flat.tactic.dense_layer_steps == steps  # one layer of two, every step
    assert selecting.tactic.dense_layer_steps == 0
    assert flat.tactic.selected_ratio > selecting.tactic.selected_ratio
