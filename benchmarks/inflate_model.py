"""A Llama checkpoint whose decode is attention-bound, with the trained model's own attention.

The bundled trained model (4 layers, one KV head of 128, hidden size 512) spends a decode step at
128k mostly outside attention: at batch 1 its attention reads 64 MiB a step, about 80 us of a
step of about 1.1 ms on an H100, so no attention backend can change its throughput by more than
a few percent. This writes a model that computes exactly the same function but whose attention
has the KV shape of a Llama-3.1-8B layer, so the end-to-end benchmark measures attention:

- each layer's KV head is repeated `--kv-heads` times (k_proj and v_proj rows tiled, q_proj's
  group of query heads tiled with them); o_proj reads only the first group (the others' columns
  are zero), so every KV head attends exactly as the original one does and the output is the
  original layer's;
- each layer is preceded by `--layer-copies - 1` readers: copies of it whose o_proj and down_proj
  are zero, so they add nothing to the residual stream, which therefore reaches them exactly as
  it reaches the layer they copy: their attention is that layer's real attention pattern.

The result has the same greedy output as the original (tests/test_inflate_model.py compares
logits) and real, trained attention patterns in every KV head of every layer.

    python benchmarks/inflate_model.py tactic_server/models/tactic-code-13m /tmp/code-13m-x8 \\
        --kv-heads 8 --layer-copies 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return weights


def inflate_layer(weights: dict[str, torch.Tensor], prefix: str, kv_heads: int,
                  reader: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """One layer's tensors (names after `prefix`) with its KV heads tiled; a reader's o_proj and
    down_proj are zero."""
    out = {}
    for name, tensor in weights.items():
        if not name.startswith(prefix):
            continue
        short = name[len(prefix):]
        if short in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                     "self_attn.v_proj.weight"):  # fmt: skip
            tensor = tensor.repeat(kv_heads, 1)  # group g's rows: a copy of the original's
        elif short == "self_attn.o_proj.weight":
            columns = tensor.shape[1]
            wide = torch.zeros(tensor.shape[0], columns * kv_heads, dtype=tensor.dtype)
            if not reader:
                wide[:, :columns] = tensor  # the first group's heads alone reach the output
            tensor = wide
        elif short == "mlp.down_proj.weight" and reader:
            tensor = torch.zeros_like(tensor)
        elif short.endswith("bias") and "self_attn" in short:
            raise ValueError(f"{name}: attention biases are not supported")
        out[short] = tensor.clone()  # each layer its own storage (safetensors shares none)
    return out


def inflate(source: Path, target: Path, kv_heads: int, layer_copies: int) -> dict:
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{source}: a llama checkpoint is needed, not {config.get('model_type')}")
    if kv_heads < 1 or layer_copies < 1:
        raise ValueError("--kv-heads and --layer-copies must be >= 1")
    layers = config["num_hidden_layers"]
    original_kv = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    weights = load_weights(source)
    out = {name: tensor for name, tensor in weights.items() if ".layers." not in name}
    new_layer = 0
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for copy in range(layer_copies):
            reader = copy < layer_copies - 1
            for short, tensor in inflate_layer(weights, prefix, kv_heads, reader).items():
                out[f"model.layers.{new_layer}.{short}"] = tensor
            new_layer += 1
    config.update(
        num_hidden_layers=layers * layer_copies,
        num_key_value_heads=original_kv * kv_heads,
        num_attention_heads=config["num_attention_heads"] * kv_heads,
        head_dim=head_dim,
    )  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / extra).exists():
            shutil.copy(source / extra, target / extra)
    (target / "README.md").write_text(
        f"{source.name} inflated by benchmarks/inflate_model.py: KV heads x{kv_heads}, each "
        f"layer preceded by {layer_copies - 1} reader copies (o_proj and down_proj zero). The "
        "same function as the original, attention-bound at long contexts.\n"
    )  # fmt: skip
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--kv-heads", type=int, default=8, help="copies of each KV head")
    parser.add_argument("--layer-copies", type=int, default=2,
                        help="layers per original layer (the extra ones read, adding nothing)")
    args = parser.parse_args()
    config = inflate(args.source, args.target, args.kv_heads, args.layer_copies)
    kv_bytes = (config["num_hidden_layers"] * config["num_key_value_heads"]
                * config["head_dim"] * 2 * 2)  # fmt: skip
    print(f"{args.target}: {config['num_hidden_layers']} layers, "
          f"{config['num_attention_heads']} query heads on {config['num_key_value_heads']} KV "
          f"heads of {config['head_dim']}; {kv_bytes / 1024:.0f} KiB of bf16 KV a token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
