"""SGLang with the tactic backend on a GPU, against SGLang's own dense backends (flashinfer; fa3,
where sgl-kernel's FA3 library is staged; and triton, whose decode kernel the tactic backend's
dense path runs), in one run:

  equality    greedy outputs of the tactic backend at P = 0.999 (and dense requests through it)
              against the triton backend for the first 32 tokens, on a tiny model with peaked
              attention and prompts of several clustered segments; P = 0.9 for the selected ratio
  throughput  decode tokens/s, flashinfer, fa3 and triton backends vs tactic (dense requests
              and P = 0.9, with the Tactic CUDA graphs and, as `tactic-eager`, without), at long
              contexts and batch sizes, on a Llama-3.1-8B-shaped config with
              load_format="dummy" (flat attention) or, with --model, on a trained checkpoint and
              passkey prompts of source code (its real attention; contexts beyond its positions
              are allowed); a backend this machine cannot run (fa3 without its library) is
              recorded under "unavailable" with the reason, and the others run
  warm        one short flashinfer decode on a one-layer model of the benchmark's attention
              shape, so that FlashInfer's JIT compile (about 2 minutes on a fresh machine) is
              done once per machine, outside the throughput runs' time limits
  profile     one stretch of decoding per backend and mode under SGLang's torch profiler, each
              trace summarised by benchmarks/trace_summary.py (GPU busy share, kernels, runtime
              calls, CUDA graph launches), to see where a decode step's time goes

Each engine is started once per backend; prompts are random token ids, prefilled once (the radix
cache keeps them), so a timed round is decode only: time(1 + T new tokens) - time(1 new token).
A steady round streams the batch's requests as our front end does and counts the tokens made
while all of them decode (steady_rate): no request setup or prompt transfer, which vary.
Usage (GPU machine, after `source scripts/gpu_env.sh`):
  python benchmarks/sglang_gpu.py equality --out results.json
  python benchmarks/sglang_gpu.py throughput --contexts 32768 65536 131072 --batches 1 8 \
      --out t.json
  python benchmarks/sglang_gpu.py profile --model DIR --context 131072 --batch 8 --out p.json
  python benchmarks/sglang_gpu.py warm --out w.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from greedy_equality import first_difference  # benchmarks/, this script's folder

from tactic_server.sglang_plugin.engine import model_override_args, tactic_usage
from tactic_server.testing.tiny_model import PEAKED_LLAMA, make_tiny_model

LLAMA8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
}  # fmt: skip


MODEL_8B = "Llama-3.1-8B config, load_format=dummy (random weights), bf16"
# Gemma 3 270M's shape (google/gemma-3-270m's config: 18 layers, a global one after every five
# sliding ones of a 512-token window, 4 query heads on 1 KV head of 256); its weights are not on
# the GPU machine (no hub there, and the checkpoint does not travel in a device call), so random
# ones: flat attention, where the dense fallback is what is measured
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                 for i in range(18)],
    max_position_embeddings=32768, query_pre_attn_scalar=256, tie_word_embeddings=True,
    rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
    pad_token_id=0,
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
)  # fmt: skip
MODEL_GEMMA = "Gemma 3 270M config, load_format=dummy (random weights), bf16"


def log(message: str) -> None:
    print(f"[sglang_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start(model_dir: Path, backend: str, context: int, **extra):
    """An engine; backend "tactic-eager" is the tactic backend without its CUDA graphs,
    "tactic-select" without its dense fallback (every decode batch selects), "tactic-triton"
    over SGLang's Triton backend instead of the fastest one (TACTIC_DENSE_BACKEND=auto),
    "tactic-fa3" over SGLang's FA3 backend; dependent launches (TACTIC_PDL) are on by default
    since 2026-12-08: "tactic-nopdl" without them, "tactic-pdl" with them (the runs before)."""
    import os

    import sglang

    os.environ["TACTIC_CUDA_GRAPH"] = "0" if backend == "tactic-eager" else "1"
    os.environ["TACTIC_DENSE_FALLBACK"] = "off" if backend == "tactic-select" else "auto"
    os.environ["TACTIC_DENSE_BACKEND"] = {"tactic-triton": "triton",
                                          "tactic-fa3": "fa3"}.get(backend, "auto")  # fmt: skip
    os.environ["TACTIC_PDL"] = "0" if backend == "tactic-nopdl" else "1"
    backend = "tactic" if backend.startswith("tactic") else backend
    args = dict(
        model_path=str(model_dir), skip_tokenizer_init=True, attention_backend=backend,
        sampling_backend="pytorch", grammar_backend="none", context_length=context,
        log_level="info", disable_piecewise_cuda_graph=True, **model_override_args(model_dir),
    )  # fmt: skip
    args.update(extra)
    began = time.perf_counter()
    engine = sglang.Engine(**args)
    log(f"{backend} engine up in {time.perf_counter() - began:.0f} s")
    return engine


def tactic_params(target: float | None) -> dict:
    if target is None:
        return {"tactic": {"enabled": False}}
    return {"tactic": {"target": target}}


def sampling_params(new_tokens: int, target: float | None) -> dict:
    """Greedy, exactly new_tokens, at Tactic's target (None: dense)."""
    return dict(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                custom_params=tactic_params(target))  # fmt: skip


def generate(engine, prompts, new_tokens: int, target: float | None):
    params = [sampling_params(new_tokens, target) for _ in prompts]
    return engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params)


def tactic_means(output: dict) -> dict | None:
    """The request's means as our API reports them (usage.tactic), and its Tactic steps."""
    usage = tactic_usage(output["meta_info"])
    if usage is None:
        return None
    return dataclasses.asdict(usage) | {"steps": float(output["meta_info"]["tactic"][-1][3])}


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt, the tokens equal to the reference's before the first difference."""
    return [first_difference(got, want) for got, want in zip(outputs, reference, strict=True)]


def equality(args) -> dict:
    """Greedy tokens of the tactic backend (dense requests, P = 0.999, P = 0.9) against the
    triton backend at tp 1; with --tp N > 1 also the tactic backend at tp N, against tp 1."""
    model_dir = make_tiny_model(
        Path(tempfile.mkdtemp()) / "tiny", "llama", seed=0, dtype=args.dtype,
        max_position_embeddings=16384, **PEAKED_LLAMA,
    )  # fmt: skip
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    lengths = [1500, 2600, 3100, 4200, 5000, 7000]
    prompts = [random_prompts(1, n, vocab, seed=i)[0] for i, n in enumerate(lengths)]
    tokens = args.tokens
    runs, stats = {}, {}
    engine = start(model_dir, "triton", 16384, mem_fraction_static=0.3)
    runs["triton"] = [o["output_ids"] for o in generate(engine, prompts, tokens, None)]
    engine.shutdown()
    modes = (("tactic_dense", None), ("tactic_0.999", 0.999), ("tactic_0.9", 0.9))
    for tp in sorted({1, args.tp}):
        engine = start(model_dir, "tactic", 16384, mem_fraction_static=0.3, tp_size=tp)
        for mode, target in modes:
            name = mode if tp == 1 else f"tp{tp}_{mode}"
            outputs = generate(engine, prompts, tokens, target)
            runs[name] = [o["output_ids"] for o in outputs]
            stats[name] = [tactic_means(o) for o in outputs]
        engine.shutdown()
    result = {"model": f"tiny llama, 4 layers, 8/2 heads of 32, peaked attention, {args.dtype}",
              "prompt_lengths": lengths, "tokens": tokens, "tp": args.tp, "runs": {}}  # fmt: skip
    for name, outputs in runs.items():
        agree = agreement(outputs, runs["triton"])
        result["runs"][name] = dict(equal=all(a == tokens for a in agree),
                                    tokens_equal_before_first_difference=agree,
                                    tactic=stats.get(name))  # fmt: skip
        if name.startswith("tp"):  # against the same mode at tp 1
            same = agreement(outputs, runs[name.split("_", 1)[1]])
            result["runs"][name] |= dict(equal_to_tp1=all(a == tokens for a in same),
                                         tokens_equal_to_tp1=same)  # fmt: skip
        log(f"{name}: equal to triton {result['runs'][name]['equal']} ({agree})"
            + (f"; stats {stats[name]}" if name in stats else ""))  # fmt: skip
    return result


def timed(engine, prompts, new_tokens, target) -> float:
    began = time.perf_counter()
    generate(engine, prompts, new_tokens, target)
    return time.perf_counter() - began


def streamed(engine, prompts, new_tokens, target) -> list[list[tuple[float, int]]]:
    """The batch's requests streamed concurrently, as our front end streams them: per request,
    each chunk's arrival time and the request's output tokens by then."""
    import asyncio

    async def one(prompt):
        stamps = []
        stream = await engine.async_generate(input_ids=list(prompt), stream=True,
                                             sampling_params=sampling_params(new_tokens, target))
        async for chunk in stream:
            stamps.append((time.perf_counter(), chunk["meta_info"]["completion_tokens"]))
        return stamps

    async def batch():
        return await asyncio.gather(*(one(p) for p in prompts))

    return engine.loop.run_until_complete(batch())


def steady_rate(stamps: list[list[tuple[float, int]]]) -> float:
    """Decode tok/s while every request of the batch decodes: from the last request's first
    token to the last token of all, the tokens each request made in that window. What it leaves
    out (each request's trip to the scheduler, radix match and prefill) varies by 0.1 s with
    8 x 64k-token prompts, more than a 5% effect on 256 tokens."""
    stamps = [[(when, count) for when, count in request if count > 0] for request in stamps]
    start = max(request[0][0] for request in stamps)
    end = max(request[-1][0] for request in stamps)
    made = 0
    for request in stamps:
        before = max(count for when, count in request if when <= start)
        made += request[-1][1] - before
    return made / (end - start)


def text_prompts(model_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """Passkey documents over Python source (the trained model's own kind of text), exactly
    `length` tokens each."""
    import random
    import sysconfig

    from tactic_server.engine.tokenizer import Tokenizer
    from tactic_server.training.data import find_sources, source_texts, task

    tokenizer = Tokenizer.from_dir(str(model_dir))
    sources = find_sources([sysconfig.get_paths()["purelib"]])
    rng = random.Random(seed)
    background = source_texts(sources.held_out or sources.train, rng)
    prompts = []
    for _ in range(count):
        characters, ids = length * 4, []
        while len(ids) < length:  # the question at the end, the needle somewhere before
            prompt, _ = task("passkey", rng, characters, background)
            ids = tokenizer.encode(prompt, add_special_tokens=True)
            characters = int(characters * 1.5)
        prompts.append(ids[-length:])
    return prompts


# flashinfer JIT-compiles its kernels on first use (about 2 minutes on a fresh machine; its cache
# in ~/.cache/flashinfer lasts while the machine does: `warm` fills it)
MODES = {"flashinfer": [("dense", None)], "fa3": [("dense", None)], "triton": [("dense", None)],
         "tactic": [("dense", None), ("tactic_0.9", 0.9)],
         "tactic-eager": [("tactic_0.9", 0.9)], "tactic-select": [("tactic_0.9", 0.9)],
         "tactic-pdl": [("tactic_0.9", 0.9)], "tactic-nopdl": [("tactic_0.9", 0.9)],
         "tactic-triton": [("dense", None), ("tactic_0.9", 0.9)],
         "tactic-fa3": [("dense", None), ("tactic_0.9", 0.9)]}  # fmt: skip

FA3_NOT_STAGED = ("sgl_kernel.flash_ops not staged: 1022 MiB (260 MiB deflated in the "
                  "sglang-kernel wheel), left out by scripts/stage_sglang_wheels.sh unless "
                  "STAGE_FA3=1")  # fmt: skip


def fa3_unavailable(capability: tuple[int, int]) -> str | None:
    """Why SGLang's fa3 backend cannot run here (None: it can). It needs sgl-kernel's FA3 library
    (sgl_kernel.flash_ops), which the staged site leaves out for its size, and, as SGLang's fa3
    backend asserts, an sm80 to sm90 GPU (this machine's H200 is sm90)."""
    major, minor = capability
    if major not in (8, 9):
        return f"FA3 runs on sm80 to sm90 only (SGLang's fa3 backend); this GPU is sm{major}{minor}"
    try:
        spec = importlib.util.find_spec("sgl_kernel.flash_ops")
    except ImportError as exc:
        return f"sgl_kernel does not import: {exc}"
    if spec is None:
        return FA3_NOT_STAGED
    try:
        importlib.import_module("sgl_kernel.flash_ops")
    except (ImportError, OSError) as exc:
        return f"sgl_kernel.flash_ops is staged but does not load: {exc}"
    return None


def runnable(backends: list[str], capability: tuple[int, int]) -> tuple[list[str], dict]:
    """The backends to run, in order, and {backend: why not} for those this machine cannot run."""
    unavailable = {}
    for name in ("fa3", "tactic-fa3"):
        if name in backends and (why := fa3_unavailable(capability)):
            unavailable[name] = why
    return [b for b in backends if b not in unavailable], unavailable


def benchmark_model(args, max_context: int) -> tuple[Path, str, dict]:
    """--model (a trained checkpoint; contexts beyond its positions allowed) or, by --dummy, the
    Llama-3.1-8B or Gemma 3 270M config with dummy weights: its folder, its name in the results,
    and sglang.Engine's extra arguments."""
    import os

    if getattr(args, "dummy", "llama8b") == "gemma3-270m" and not args.model:
        import transformers

        model_dir = Path(tempfile.mkdtemp()) / "gemma3-270m"
        config = transformers.Gemma3TextConfig(**GEMMA3_270M, dtype="bfloat16",
                                               architectures=["Gemma3ForCausalLM"])
        config.save_pretrained(model_dir)
        if max_context > GEMMA3_270M["max_position_embeddings"]:
            os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
        return model_dir, MODEL_GEMMA, {"load_format": "dummy"}
    if args.model:
        model_dir = Path(args.model)
        config = json.loads((model_dir / "config.json").read_text())
        if max_context > config["max_position_embeddings"]:
            os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
        return model_dir, f"{model_dir.name} (trained, {config['num_hidden_layers']} layers), " \
            "bf16", {}
    model_dir = Path(tempfile.mkdtemp()) / "llama8b"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(LLAMA8B))
    return model_dir, MODEL_8B, {"load_format": "dummy"}


def benchmark_prompts(args, model_dir: Path, count: int, context: int) -> list[list[int]]:
    """Prompts whose last decode step of args.tokens attends to `context` positions (so 131,072
    fits the config's positions)."""
    length = context - args.tokens - 2
    if args.model:
        return text_prompts(model_dir, count, length, seed=context)
    return random_prompts(count, length, 128000, seed=context)


def throughput(args, save) -> dict:
    max_context = max(args.contexts)
    model_dir, name, extra = benchmark_model(args, max_context)
    backends, unavailable = runnable(args.backends, torch.cuda.get_device_capability())
    for backend, why in unavailable.items():
        log(f"{backend}: unavailable, not measured ({why})")
    # the backend the tactic one runs prefill and dense decode on (TACTIC_DENSE_BACKEND=auto:
    # flashinfer for the runs' 16-bit caches where it imports), which also marks the runs that
    # have the dense fallback (sglang_report.py)
    over = "flashinfer" if importlib.util.find_spec("flashinfer") else "triton"
    head = {"model": name, "decode_tokens": args.tokens, "unavailable": unavailable,
            "tactic_dense_backend": over}  # fmt: skip
    rows = []
    for backend in backends:
        engine = start(
            model_dir, backend, max_context, mem_fraction_static=args.mem_fraction,
            max_running_requests=max(args.batches), cuda_graph_max_bs=max(args.batches),
            tp_size=args.tp, **extra,
        )  # fmt: skip
        capacity = engine.get_server_info()["max_total_num_tokens"]
        log(f"{backend}: KV capacity {capacity} tokens")
        for context in args.contexts:
            batches = [b for b in args.batches if b * context <= capacity]
            for b in (b for b in args.batches if b not in batches):
                rows.append(dict(backend=backend, context=context, batch=b,
                                 skipped=f"{b} x {context} tokens exceed the KV pool"))  # fmt: skip
            if not batches:
                continue
            prompts = benchmark_prompts(args, model_dir, max(batches), context)
            for mode, target in MODES[backend]:
                began = time.perf_counter()
                generate(engine, prompts[: max(batches)], 1, target)  # prefill (and clustering)
                log(f"{backend} {mode} {context}: warm-up {time.perf_counter() - began:.1f} s")
                for batch in batches:
                    # untimed first: a batch size's first decode may still compile or capture
                    # (a first timed round once came out negative)
                    outputs = generate(engine, prompts[:batch], 1 + args.tokens, target)
                    rounds = []
                    for _ in range(args.repeats):
                        short = timed(engine, prompts[:batch], 1, target)
                        long = timed(engine, prompts[:batch], 1 + args.tokens, target)
                        rounds.append(batch * args.tokens / (long - short))
                    steady = [steady_rate(streamed(engine, prompts[:batch], 1 + args.tokens,
                                                   target)) for _ in range(args.repeats)]
                    stats = [tactic_means(o) for o in outputs]
                    ratio = [s["selected_ratio"] for s in stats if s]
                    fallback = [s["dense_fallback_steps"] / s["decode_steps"] for s in stats
                                if s and s["decode_steps"]]  # fmt: skip
                    row = dict(
                        backend=backend, mode=mode, context=context, batch=batch, tp=args.tp,
                        decode_tokens_per_s=statistics.median(rounds), rounds=rounds,
                        steady_tokens_per_s=statistics.median(steady), steady_rounds=steady,
                        selected_ratio=statistics.mean(ratio) if ratio else None,
                        dense_fallback_share=statistics.mean(fallback) if fallback else None,
                    )  # fmt: skip
                    rows.append(row)
                    save(head | {"rows": rows})
                    log(f"{backend} {mode} ctx {context} batch {batch}: "
                        f"{row['decode_tokens_per_s']:.1f} tok/s (rounds {rounds}), "
                        f"steady {row['steady_tokens_per_s']:.1f} (rounds {steady}), "
                        f"selected {row['selected_ratio']}")  # fmt: skip
        engine.shutdown()
    return head | {"rows": rows}


def warm(args) -> dict:
    """A short flashinfer decode (batch 1 and 8) on one layer of the benchmark's attention shape
    (bf16, 32 query and 8 KV heads of 128: the trained model's group of 4 and head size too), so
    that FlashInfer's JIT cache holds what the throughput runs' engines compile at start."""
    model_dir = Path(tempfile.mkdtemp()) / "llama8b-one-layer"
    model_dir.mkdir(parents=True)
    config = LLAMA8B | {"num_hidden_layers": 1, "vocab_size": 32000, "bos_token_id": 1,
                        "eos_token_id": 2}  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config))
    began = time.perf_counter()
    engine = start(model_dir, "flashinfer", 4096, mem_fraction_static=0.3, load_format="dummy",
                   max_running_requests=8, cuda_graph_max_bs=8)  # fmt: skip
    generate(engine, random_prompts(8, 1000, 32000, seed=0), 8, None)
    engine.shutdown()
    seconds = time.perf_counter() - began
    log(f"flashinfer warm in {seconds:.0f} s")
    return {"model": "Llama-3.1-8B config, 1 layer, dummy, bf16", "seconds": seconds}


def profile(args, save) -> dict:
    """One stretch of decoding per backend and mode under SGLang's torch profiler (CPU and GPU),
    after the same stretch once untimed; each trace lands in a folder beside --out and its
    summary (benchmarks/trace_summary.py) in the results."""
    from trace_summary import format_summary, summarize

    model_dir, name, extra = benchmark_model(args, args.context)
    folder = Path(args.out).resolve().parent
    backends, unavailable = runnable(args.backends, torch.cuda.get_device_capability())
    head = {"model": name, "unavailable": unavailable}
    rows = []
    for backend in backends:
        engine = start(
            model_dir, backend, args.context, mem_fraction_static=args.mem_fraction,
            max_running_requests=args.batch, cuda_graph_max_bs=args.batch, tp_size=args.tp,
            **extra,
        )  # fmt: skip
        prompts = benchmark_prompts(args, model_dir, args.batch, args.context)
        for mode, target in MODES[backend]:
            generate(engine, prompts, 1 + args.tokens, target)  # prefill, clustering, capture
            traces = folder / f"trace_{backend}_{mode}"
            engine.start_profile(output_dir=str(traces), activities=["CPU", "GPU"],
                                 with_stack=False, record_shapes=False)  # fmt: skip
            began = time.perf_counter()
            outputs = generate(engine, prompts, 1 + args.tokens, target)
            seconds = time.perf_counter() - began
            engine.stop_profile()
            found = sorted(traces.glob("*.trace.json*"))
            summary = summarize(found[-1]) if found else None
            ratio = [s["selected_ratio"] for s in map(tactic_means, outputs) if s]
            rows.append(dict(backend=backend, mode=mode, context=args.context, batch=args.batch,
                             tokens=args.tokens, seconds_profiled=seconds,
                             selected_ratio=statistics.mean(ratio) if ratio else None,
                             trace=str(found[-1].relative_to(folder)) if found else None,
                             summary=summary))  # fmt: skip
            save(head | {"rows": rows})
            log(f"{backend} {mode}: {seconds:.2f} s profiled\n"
                + (format_summary(summary) if summary else "no trace written"))  # fmt: skip
        engine.shutdown()
    return head | {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    eq = commands.add_parser("equality")
    eq.add_argument("--tokens", type=int, default=32)
    eq.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="float32: kernels' rounding differences stay far below logit margins")
    tp = commands.add_parser("throughput")
    tp.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    tp.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    tp.add_argument("--backends", nargs="+", choices=tuple(MODES),
                    default=["flashinfer", "fa3", "triton", "tactic", "tactic-eager"])
    tp.add_argument("--model", help="a trained checkpoint (default: --dummy's config)")
    tp.add_argument("--dummy", choices=("llama8b", "gemma3-270m"), default="llama8b",
                    help="without --model: the config served with random weights")
    tp.add_argument("--tokens", type=int, default=64)
    tp.add_argument("--repeats", type=int, default=2)
    tp.add_argument("--mem-fraction", type=float, default=0.85)
    pf = commands.add_parser("profile")
    pf.add_argument("--context", type=int, default=131072)
    pf.add_argument("--batch", type=int, default=8)
    pf.add_argument("--backends", nargs="+", choices=tuple(MODES), default=["triton", "tactic"])
    pf.add_argument("--model", help="a trained checkpoint (default: Llama-3.1-8B, dummy)")
    pf.add_argument("--tokens", type=int, default=32)
    pf.add_argument("--mem-fraction", type=float, default=0.85)
    wm = commands.add_parser("warm")
    for sub in (eq, tp, pf, wm):
        sub.add_argument("--out", required=True)
        sub.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}  # fmt: skip

    def save(part: dict) -> None:  # after every row, so a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(result | part, indent=1))

    if args.command == "equality":
        save(equality(args))
    elif args.command == "warm":
        save(warm(args))
    else:
        save((throughput if args.command == "throughput" else profile)(args, save))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
