"""benchmarks/inflate_model.py: the inflated bundled model computes the original's function (same
logits, same greedy tokens) and every KV head of every layer, readers included, attends exactly
as the original layer it copies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tactic_server.models import bundled_model_dir

MODEL = bundled_model_dir()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(MODEL is None, reason="the bundled weights are not installed")


def load_inflate():
    path = ROOT / "benchmarks" / "inflate_model.py"
    spec = importlib.util.spec_from_file_location("inflate_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inflated_model_is_the_original_function_with_its_attention(tmp_path):
    transformers = pytest.importorskip("transformers")
    inflated_dir = tmp_path / "inflated"
    load_inflate().inflate(MODEL, inflated_dir, kv_heads=8, layer_copies=2)
    config = json.loads((inflated_dir / "config.json").read_text())
    original_config = json.loads((MODEL / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 * original_config["num_hidden_layers"]
    assert config["num_key_value_heads"] == 8 * original_config["num_key_value_heads"]
    assert config["num_attention_heads"] == 8 * original_config["num_attention_heads"]

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager").eval()  # fmt: skip

    original, inflated = load(MODEL), load(inflated_dir)
    ids = torch.tensor([list(range(3, 60, 2))])
    with torch.no_grad():
        ours = original(ids, output_attentions=True)
        theirs = inflated(ids, output_attentions=True)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-4, atol=1e-4)
    group = original_config["num_attention_heads"]
    for layer, pattern in enumerate(theirs.attentions):
        expected = ours.attentions[layer // 2]  # reader 2i and layer 2i + 1 copy layer i
        for kv_head in range(8):
            torch.testing.assert_close(pattern[:, kv_head * group:(kv_head + 1) * group],
                                       expected, rtol=1e-5, atol=1e-6)  # fmt: skip
    with torch.no_grad():
        greedy = original.generate(ids, max_new_tokens=12, do_sample=False)
        inflated_greedy = inflated.generate(ids, max_new_tokens=12, do_sample=False)
    assert inflated_greedy.tolist() == greedy.tolist()


def test_refuses_what_it_cannot_inflate(tmp_path):
    inflate = load_inflate().inflate
    with pytest.raises(ValueError, match=">= 1"):
        inflate(MODEL, tmp_path / "x", kv_heads=0, layer_copies=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    with pytest.raises(ValueError, match="llama"):
        inflate(other, tmp_path / "y", kv_heads=2, layer_copies=2)
