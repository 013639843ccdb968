"""The plugin's settings. SGLang runs the backend in scheduler processes it spawns, so settings
travel as environment variables, which those processes inherit."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from tactic_server.tactic.config import TacticConfig, config_from_spec, config_spec

TARGET_ENV = "TACTIC_DEFAULT_TARGET"
SEGMENT_ENV = "TACTIC_SEGMENT_SIZE"
QUERY_WEIGHTED_ENV = "TACTIC_QUERY_WEIGHTED"  # 1: TacticConfig.query_weighted (default 0)
GRAPH_ENV = "TACTIC_CUDA_GRAPH"  # 0: decode batches with a Tactic request run eagerly
GRAPH_BS_ENV = "TACTIC_GRAPH_MAX_BS"  # the largest batch captured in a Tactic CUDA graph
# context bounds of the Tactic graph sets, comma-separated (default 16384,65536 below the
# model's context, and the context itself): a batch replays the smallest that holds it
GRAPH_CONTEXTS_ENV = "TACTIC_GRAPH_CONTEXTS"
# which SGLang backend runs prefill and every dense decode: "auto" (flashinfer on a CUDA GPU with
# a 16-bit KV cache where FlashInfer imports, else triton), "flashinfer", "fa3" (Hopper and
# Ampere, with sgl-kernel's FA3 library; models without sliding windows) or "triton"
DENSE_BACKEND_ENV = "TACTIC_DENSE_BACKEND"
DENSE_BACKENDS = ("auto", "flashinfer", "fa3", "triton")
# "auto": a decode batch decodes dense where the GPU's cost model says selecting would not pay
# (tactic_server.decode.cost); "off": always select
DENSE_FALLBACK_ENV = "TACTIC_DENSE_FALLBACK"
# 1 (the default): the selection and attention kernels launched dependently (programmatic
# dependent launch, Hopper and later, else ignored: each kernel's launch overlaps the end of the
# one before; H100 2026-12-08: 2-3 us of a layer's selection at batch 1); 0: plain launches
PDL_ENV = "TACTIC_PDL"
# the whole TacticConfig, as config_spec writes it (its fields changed from the defaults; the
# segment size and query weighting have their own variables too, which win)
CONFIG_ENV = "TACTIC_CONFIG"


@dataclass(frozen=True)
class Settings:
    default_target: float = 0.9
    config: TacticConfig = field(default_factory=TacticConfig)
    cuda_graphs: bool = True
    graph_max_bs: int = 16
    graph_contexts: tuple[int, ...] = ()  # () for the default
    dense_backend: str = "auto"
    dense_fallback: str = "auto"
    pdl: bool = True

    def graph_bounds(self, context_len: int) -> list[int]:
        """The context bounds of the Tactic graph sets for a model of context_len positions."""
        chosen = self.graph_contexts or (16384, 65536)
        return sorted({c for c in chosen if c < context_len} | {context_len})

    @classmethod
    def from_env(cls) -> Settings:
        target = float(os.environ.get(TARGET_ENV, "0.9"))
        if not 0.0 < target <= 1.0:
            raise ValueError(f"{TARGET_ENV} must be in (0, 1], got {target}")
        try:
            config = config_from_spec(spec) if (spec := os.environ.get(CONFIG_ENV)) else \
                TacticConfig()
        except ValueError as error:
            raise ValueError(f"{CONFIG_ENV}: {error}") from None
        if SEGMENT_ENV in os.environ:
            config = dataclasses.replace(config, segment_size=int(os.environ[SEGMENT_ENV]))
        weighted = os.environ.get(QUERY_WEIGHTED_ENV, "1" if config.query_weighted else "0")
        if weighted not in ("0", "1"):
            raise ValueError(f"{QUERY_WEIGHTED_ENV} must be 0 or 1, got {weighted!r}")
        config = dataclasses.replace(config, query_weighted=weighted == "1")
        graphs = os.environ.get(GRAPH_ENV, "1")
        if graphs not in ("0", "1"):
            raise ValueError(f"{GRAPH_ENV} must be 0 or 1, got {graphs!r}")
        max_bs = int(os.environ.get(GRAPH_BS_ENV, "16"))
        if max_bs < 1:
            raise ValueError(f"{GRAPH_BS_ENV} must be >= 1, got {max_bs}")
        contexts = tuple(int(c) for c in os.environ.get(GRAPH_CONTEXTS_ENV, "").split(",") if c)
        if any(c < 1 for c in contexts):
            raise ValueError(f"{GRAPH_CONTEXTS_ENV} must list positive lengths, got {contexts}")
        dense = os.environ.get(DENSE_BACKEND_ENV, "auto")
        if dense not in DENSE_BACKENDS:
            raise ValueError(f"{DENSE_BACKEND_ENV} must be one of {', '.join(DENSE_BACKENDS)}, "
                             f"got {dense!r}")  # fmt: skip
        fallback = os.environ.get(DENSE_FALLBACK_ENV, "auto")
        if fallback not in ("auto", "off"):
            raise ValueError(f"{DENSE_FALLBACK_ENV} must be auto or off, got {fallback!r}")
        pdl = os.environ.get(PDL_ENV, "1")
        if pdl not in ("0", "1"):
            raise ValueError(f"{PDL_ENV} must be 0 or 1, got {pdl!r}")
        return cls(target, config, graphs == "1", max_bs, contexts, dense, fallback, pdl == "1")

    def export(self) -> None:
        """Into this process's environment, for the processes SGLang spawns from it (the CUDA
        graph settings are read from the environment only)."""
        os.environ[TARGET_ENV] = repr(self.default_target)
        os.environ[CONFIG_ENV] = config_spec(self.config)
        os.environ[SEGMENT_ENV] = str(self.config.segment_size)
        os.environ[QUERY_WEIGHTED_ENV] = "1" if self.config.query_weighted else "0"
        os.environ[DENSE_BACKEND_ENV] = self.dense_backend
        os.environ[DENSE_FALLBACK_ENV] = self.dense_fallback
        os.environ[PDL_ENV] = "1" if self.pdl else "0"


def request_target(custom_params: Mapping | None, default: float) -> float:
    """A request's target from SGLang's custom_params: {"tactic_target": P} or {"tactic":
    {"target": P, "enabled": bool}}; 1.0 means dense. Values were validated by our API; a
    malformed one here falls back to the default."""
    params = custom_params or {}
    nested = params.get("tactic") if isinstance(params.get("tactic"), Mapping) else {}
    if nested.get("enabled") is False:
        return 1.0
    target = nested.get("target", params.get("tactic_target", default))
    try:
        target = float(target)
    except (TypeError, ValueError):
        return default
    return target if 0.0 < target <= 1.0 else default
