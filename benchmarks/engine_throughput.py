"""Decode throughput of the embedded engine, dense vs Tactic, at long contexts on one GPU (or the
CPU with small numbers): a model of the given shape with random weights, `batch` requests with
random prompts of `context` tokens, `decode_tokens` new tokens each; throughput counts the tokens
decoded after every request's first token. Random weights give flat attention, so Tactic cannot
be sparse here: this measures what its selection costs, not what sparsity saves.

    python benchmarks/engine_throughput.py --contexts 16384 32768 65536 --batch 2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tactic_server.engine.config import EngineConfig
from tactic_server.engine.engine import Engine
from tactic_server.engine.model_config import ModelConfig, rope_inverse_frequencies
from tactic_server.engine.models.llama import LlamaForCausalLM
from tactic_server.engine.tokenizer import Tokenizer
from tactic_server.engine.types import GenerationRequest, SamplingParams, TacticParams
from tactic_server.testing.tiny_model import make_tiny_model

SHAPES = {
    # a small long-context model: head_dim 128 and 4 query heads per KV head, like Llama-3.1-8B
    "small": dict(num_layers=4, hidden_size=512, num_heads=4, num_kv_heads=1, head_dim=128,
                  intermediate_size=1536),
    # Llama-3.1-8B's transformer (the vocabulary is the tiny tokenizer's); weights made in memory
    "llama8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                    intermediate_size=14336),
}  # fmt: skip


def random_engine(shape: str, config: EngineConfig, max_len: int) -> Engine:
    """An engine on a model of this shape with random weights made on the device (an 8B
    checkpoint on disk would take minutes to write and read)."""
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()), "llama", num_layers=1,
                                max_position_embeddings=max_len)  # fmt: skip
    dims = SHAPES[shape]
    model_config = dataclasses.replace(
        ModelConfig.from_dir(model_dir), num_hidden_layers=dims["num_layers"],
        hidden_size=dims["hidden_size"], num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_kv_heads"], head_dim=dims["head_dim"],
        intermediate_size=dims["intermediate_size"],
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    model = model.to_empty(device=config.device).to(torch.bfloat16)
    generator = torch.Generator(device=config.device).manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5, generator=generator)
    model.inv_freq = rope_inverse_frequencies(model_config).to(config.device)
    config = dataclasses.replace(config, model_dir=str(model_dir))
    return Engine(model.eval(), Tokenizer.from_dir(model_dir), config, shape, max_len)


async def one_round(engine: Engine, batch: int, context: int, decode_tokens: int, tactic):
    """Seconds from the last request's first token to the last token, tokens decoded then, the
    median gap between a request's consecutive tokens in that window (robust to the host's
    jitter), and the requests' selected ratios."""
    generator = torch.Generator().manual_seed(context)
    sampling = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    arrivals: list[list[float]] = []
    ratios = []

    async def run(index: int) -> None:
        prompt = tuple(torch.randint(5, 500, (context,), generator=generator).tolist())
        request = GenerationRequest(f"r{index}", prompt, sampling, tactic)
        times = []
        arrivals.append(times)
        async for output in engine.generate(request):
            times.extend([time.perf_counter()] * len(output.token_ids))
            if output.finish_reason is not None and output.tactic is not None:
                ratios.append(output.tactic.selected_ratio)

    await asyncio.gather(*(run(i) for i in range(batch)))
    start = max(times[0] for times in arrivals)
    seconds = max(times[-1] for times in arrivals) - start
    gaps = [b - a for times in arrivals for a, b in itertools.pairwise(times) if a >= start]
    return seconds, batch * (decode_tokens - 1), statistics.median(gaps), ratios


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write), the roofline's yardstick
    (None on the CPU)."""
    if device != "cuda":
        return None
    source = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() * source.element_size() / (start.elapsed_time(end) / 1e3)


def roofline_step_ms(engine: Engine, batch: int, context: int, bandwidth: float | None):
    """The least time a dense decode step can take: every weight and the batch's whole KV read
    once at the copy bandwidth (None without a bandwidth)."""
    if bandwidth is None:
        return None
    model = engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = engine.pool
    kv_per_token = pool.kv_bytes / pool.num_slots
    return 1e3 * (weight_bytes + batch * context * kv_per_token) / bandwidth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.shape == "small":
        model_dir = make_tiny_model(Path(tempfile.mkdtemp()), "llama", dtype=dtype,
                                    max_position_embeddings=max(args.contexts) + 1024,
                                    **SHAPES[args.shape])  # fmt: skip
    bandwidth = copy_bandwidth(args.device)
    records = []
    for context in args.contexts:
        max_len = context + args.decode_tokens + 8
        config = EngineConfig(device=args.device, dtype=dtype, max_model_len=max_len,
                              max_batch=args.batch, kv_slots=args.batch * max_len,
                              prefill_chunk=4096)  # fmt: skip
        if args.shape == "small":
            engine = Engine.from_config(dataclasses.replace(config, model_dir=str(model_dir)))
        else:
            engine = random_engine(args.shape, config, max_len)
        # warm-up at this context: the first launch of a kernel specialisation compiles it
        # (Triton specialises on integer arguments divisible by 16, such as lengths: 20 tokens
        # pass one); the measured rounds then find the prompts' full segments in the prefix cache
        for tactic in (TacticParams(enabled=False), TacticParams(enabled=True)):
            asyncio.run(one_round(engine, args.batch, context, 20, tactic))
        for name, tactic in (("dense", TacticParams(enabled=False)),
                             ("tactic", TacticParams(enabled=True, target=0.9))):  # fmt: skip
            seconds, tokens, median_gap, ratios = asyncio.run(
                one_round(engine, args.batch, context, args.decode_tokens, tactic)
            )
            record = dict(shape=args.shape, context=context, batch=args.batch, attention=name,
                          decode_tokens_per_s=tokens / seconds,
                          step_ms=1e3 * seconds / (args.decode_tokens - 1),
                          median_step_ms=1e3 * median_gap,
                          dense_roofline_step_ms=roofline_step_ms(engine, args.batch, context,
                                                                  bandwidth),
                          selected_ratio=sum(ratios) / len(ratios) if ratios else None)  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
        asyncio.run(engine.shutdown())
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"date": datetime.date.today().isoformat(), "device": device,
              "command": "python benchmarks/engine_throughput.py " + " ".join(sys.argv[1:]),
              "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9,
              "note": "random weights: attention is flat, so Tactic cannot be sparse; on CUDA "
                      "both paths decode through the Triton kernels",
              "records": records}  # fmt: skip
    slug = device.lower().replace("nvidia ", "").replace(" ", "_")
    output = Path(args.output or f"benchmarks/results/engine_throughput_{slug}.json")
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
