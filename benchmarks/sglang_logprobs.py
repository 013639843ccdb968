"""Where the logprobs of one greedy completion vary on `serve --engine sglang` (GPU): the same
prompt sent cold (full prefill), then again after its prefix is in SGLang's radix cache,
non-streamed and streamed, for dense requests (target 1) and Tactic ones. Greedy tokens agree
everywhere; the logprobs of a bf16 model move with every
bf16 rounding of its hidden states, and a cache hit changes the arithmetic of the prefill
(extend over cached keys instead of one causal pass), so cold and warm answers differ by that
rounding while two answers over the same cache state must agree. Writes a JSON of the maximum
differences per pair.

    python benchmarks/sglang_logprobs.py --out /tmp/out/sglang_logprobs.json [--dense-fallback auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import openai  # noqa: E402

from loadtests.inprocess import free_port, wait_for  # noqa: E402
from tactic_server.testing.tiny_model import PEAKED_LLAMA, make_tiny_model  # noqa: E402

PROMPT = "Summarise the following notes. " + "The cache keeps every key of the context. " * 250


def completion(client, model, prompt, target, stream):
    options = dict(model=model, prompt=prompt, max_tokens=6, temperature=0.0, logprobs=2,
                   extra_body={"ignore_eos": True, "tactic": {"target": target}})  # fmt: skip
    if not stream:
        result = client.completions.create(**options).choices[0].logprobs
        return result.tokens, result.token_logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**options, stream=True)
              if c.choices and c.choices[0].logprobs]  # fmt: skip
    return [t for c in chunks for t in c.tokens], [p for c in chunks for p in c.token_logprobs]


def measure(model_dir: Path, prompts: dict[str, str], dense_fallback: str) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "tactic_server.cli", "serve", "--engine", "sglang",
               "--model", str(model_dir), "--port", str(port), "--max-batch", "4",
               "--dense-fallback", dense_fallback]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ | {"TACTIC_SEGMENT_SIZE": "512"})
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        wait_for(f"{url}/ready", process, timeout=400)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        for name, prompt in prompts.items():
            for target in (1.0, 0.9):
                runs = {
                    "cold": completion(client, model, prompt, target, False),
                    "warm": completion(client, model, prompt, target, False),
                    "warm_stream": completion(client, model, prompt, target, True),
                    "warm_again": completion(client, model, prompt, target, False),
                }
                reference = runs["warm"][1]
                results[f"{name}/target={target}"] = {
                    "tokens_agree": len({tuple(tokens) for tokens, _ in runs.values()}) == 1,
                    "logprobs": {run: values for run, (_, values) in runs.items()},
                    "max_abs_diff_vs_warm": {
                        run: max(abs(a - b) for a, b in zip(values, reference, strict=True))
                        for run, (_, values) in runs.items() if run != "warm"},
                }  # fmt: skip
                print(name, target, results[f"{name}/target={target}"]["max_abs_diff_vs_warm"],
                      flush=True)  # fmt: skip
                prompt = prompt + " "  # the next target starts cold again
    finally:
        process.terminate()
        process.wait(timeout=120)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dense-fallback", choices=("auto", "off"), default="off",
                        help="serve's flag: auto lets each decode step pick its path")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_tiny_model(Path(folder), "llama", dtype="bfloat16",
                                    max_position_embeddings=8192, **PEAKED_LLAMA)  # fmt: skip
        prompts = {"short": PROMPT[:400], "long": PROMPT}
        report = {"dense_fallback": args.dense_fallback,
                  "runs": measure(model_dir, prompts, args.dense_fallback)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
