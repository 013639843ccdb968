"""Configuration of the embedded engine: one dataclass, validated at the edge (CLI, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tactic_server.tactic.config import TacticConfig


@dataclass(frozen=True)
class EngineConfig:
    """model_dir None serves the bundled default model. max_model_len None takes the model's
    own limit. kv_slots None sizes the KV pool for max_batch requests of max_model_len tokens.
    prefill_chunk bounds the prompt tokens processed per step (chunked prefill), so decoding
    requests keep producing tokens while a long prompt is read. attention_backend picks how
    Tactic decodes: the Triton kernels (select_rows, sparse_decode_balanced) or the torch
    reference."""

    model_dir: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_batch: int = 8
    max_waiting: int = 64
    kv_slots: int | None = None
    prefill_chunk: int = 512
    default_tactic_target: float = 0.9
    tactic: TacticConfig = field(default_factory=TacticConfig)
    attention_backend: str = "auto"  # "triton" kernels, "torch" reference, "auto": triton on CUDA
    # "auto": a decode batch decodes dense where the cost model of this GPU (decode/cost.py)
    # says selecting would not pay; "off": selecting requests always select
    dense_fallback: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.max_batch < 1 or self.max_waiting < 0 or self.prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_waiting >= 0")
        if not 0.0 < self.default_tactic_target <= 1.0:
            raise ValueError(
                f"default_tactic_target must be in (0, 1], got {self.default_tactic_target}"
            )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}"
            )
        if self.dense_fallback not in ("auto", "off"):
            raise ValueError(f"dense_fallback must be auto or off, got {self.dense_fallback!r}")
        if self.tactic.segment_size is None:
            raise ValueError(
                "the engine clusters segment by segment: tactic.segment_size is needed"
            )
