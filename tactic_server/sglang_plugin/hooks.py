"""The functions the plugin hooks into SGLang (registered in __init__.register)."""

from __future__ import annotations

import logging
import math
import time

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from tactic_server.decode import ClusterSide, metadata_bytes_per_token

from . import BACKEND
from .settings import Settings

logger = logging.getLogger(__name__)


class TacticKVPool(MHATokenToKVPool):
    """SGLang's MHA pool with Tactic's cluster metadata beside it (`tactic_side`), counted in
    the pool's size report."""

    tactic_side: ClusterSide

    def get_kv_size_bytes(self):
        k_bytes, v_bytes = super().get_kv_size_bytes()
        return k_bytes + self.tactic_side.nbytes, v_bytes


def create_backend(model_runner):
    """The tactic backend over the dense backend the settings choose (TACTIC_DENSE_BACKEND)."""
    from .backend import dense_backend_class, dense_backend_name

    name = dense_backend_name(Settings.from_env().dense_backend, model_runner)
    logger.info("tactic backend: prefill and dense decode through SGLang's %s backend", name)
    return dense_backend_class(name)(model_runner)


def server_args_before(self, *args, **kwargs):
    """The tactic backend must be chosen for prefill and decode alike (it runs its dense
    backend's prefill itself, FlashInfer's or Triton's); the piecewise CUDA graph of prefill is
    turned off (with a log line), since clustering runs between forwards. Decode CUDA graphs
    stay on for dense batches."""
    names = (self.attention_backend, self.prefill_attention_backend, self.decode_attention_backend)
    if BACKEND not in names:
        return None
    if self.attention_backend != BACKEND or any(n not in (None, BACKEND) for n in names[1:]):
        raise ValueError(
            f"choose the tactic backend with attention_backend={BACKEND!r} alone (it does "
            "prefill through SGLang's FlashInfer or Triton kernels, TACTIC_DENSE_BACKEND, and "
            "decode through its own)"
        )
    if not self.disable_piecewise_cuda_graph:
        logger.warning("tactic backend: the piecewise CUDA graph of prefill is turned off; "
                       "decode batches with a Tactic request run without CUDA graphs, dense "
                       "ones with them")  # fmt: skip
    self.disable_piecewise_cuda_graph = True
    return None


class TacticGraphRunners:
    """Stands for SGLang's graph runner, and is where a decode batch's graphs are chosen: SGLang's
    own (dense batches, as the Triton backend replays them) when no request selects; when every
    one does, the CudaGraphRunner of the Tactic family (captured with the backend in
    graph_family "tactic": every row selects, buffers sized by its context bound) of the
    smallest bound that holds the batch's longest sequence; none (eager) for a mixed batch, which
    a Tactic graph cannot serve (it needs every row's segments clustered), or when there is no
    Tactic graph. Anything else SGLang reads is the last runner's."""

    def __init__(self, dense, tactic: list, backend) -> None:
        self.dense, self.tactic, self.backend = dense, tactic, backend  # tactic: bound order
        self.last = dense

    def _runner(self, forward_batch):
        family = self.backend.batch_graph_family
        if family == "dense":
            return self.dense
        if family is None or not self.tactic:
            return None
        lengths = getattr(forward_batch, "seq_lens_cpu", None)
        if lengths is None:  # not on the host: only the largest bound is sure to hold it
            return self.tactic[-1]
        longest = int(lengths.max())
        return next((r for r in self.tactic if r.context_bound >= longest), None)

    def can_run(self, forward_batch) -> bool:
        runner = self._runner(forward_batch)
        return runner is not None and runner.can_run(forward_batch)

    def replay(self, forward_batch, *args, **kwargs):
        self.last = runner = self._runner(forward_batch)
        backend = self.backend
        if runner is not self.dense:  # the bound keys its graphs' dense metadata (FlashInfer)
            backend.graph_family, backend.graph_bound = "tactic", runner.context_bound
        try:
            return runner.replay(forward_batch, *args, **kwargs)
        finally:
            backend.graph_family, backend.graph_bound = "dense", backend.max_context_len

    def __getattr__(self, name: str):  # only for names not set in __init__
        if name in ("dense", "tactic", "backend", "last"):
            raise AttributeError(name)
        return getattr(self.last, name)


def init_device_graphs_around(original, self, *args, **kwargs):
    """After SGLang captured its decode graphs: the Tactic family's beside them, and the runner
    that chooses between them (TacticGraphRunners) in place of SGLang's."""
    from .backend import TacticBackend

    result = original(self, *args, **kwargs)
    backend = self.attn_backend
    if isinstance(backend, TacticBackend) and self.graph_runner is not None:
        runners = capture_tactic_graphs(self, backend)
        self.graph_runner = TacticGraphRunners(self.graph_runner, runners, backend)
    return result


def capture_tactic_graphs(model_runner, backend) -> list:
    """CudaGraphRunners of the Tactic family, one per context bound (TACTIC_GRAPH_CONTEXTS), for
    batch sizes up to TACTIC_GRAPH_MAX_BS; none with TACTIC_CUDA_GRAPH=0 or when a capture
    fails (those batches then run eagerly, with a log line)."""
    settings = backend.settings
    if not settings.cuda_graphs:
        logger.warning("tactic backend: TACTIC_CUDA_GRAPH=0, decode batches with a Tactic "
                       "request run without CUDA graphs")  # fmt: skip
        return []
    args = model_runner.server_args
    sizes = list(args.cuda_graph_bs or [])
    bounds = settings.graph_bounds(backend.max_context_len)
    began, runners = time.perf_counter(), []
    backend.graph_family = "tactic"
    try:
        args.cuda_graph_bs = [b for b in sizes if b <= settings.graph_max_bs] or [1]
        for bound in bounds:
            backend.graph_bound = bound
            runner = type(model_runner.graph_runner)(model_runner)
            runner.context_bound = bound
            runners.append(runner)
    except Exception:
        logger.exception("tactic backend: capturing the Tactic decode graphs failed; decode "
                         "batches with a Tactic request run without CUDA graphs")  # fmt: skip
        return []
    finally:
        args.cuda_graph_bs = sizes
        backend.graph_family, backend.graph_capture = "dense", False
        backend.graph_bound = backend.max_context_len
    logger.info("tactic backend: Tactic decode CUDA graphs for batch sizes %s and context bounds "
                "%s, captured in %.1f s", runners[0].capture_bs, bounds,
                time.perf_counter() - began)  # fmt: skip
    return runners


def init_pools_around(original, self, *args, **kwargs):
    """After SGLang built its pools: the KV pool becomes a TacticKVPool with cluster metadata."""
    result = original(self, *args, **kwargs)
    if self.server_args.attention_backend != BACKEND:
        return result
    pool = self.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool:
        raise ValueError(f"the tactic backend needs SGLang's MHATokenToKVPool, not {type(pool)}")
    from .backend import tactic_layer_ids

    settings = Settings.from_env()
    layer_ids = tactic_layer_ids(self, len(pool.k_buffer))
    pool.tactic_side = ClusterSide(
        num_slots=pool.size + pool.page_size, num_layers=len(layer_ids),
        num_kv_heads=pool.head_num, head_dim=pool.head_dim, dtype=pool.dtype, device=pool.device,
        config=settings.config, max_requests=self.req_to_token_pool.req_to_token.shape[0],
        layer_ids=layer_ids,
    )  # fmt: skip
    pool.__class__ = TacticKVPool
    k_bytes, v_bytes = MHATokenToKVPool.get_kv_size_bytes(pool)
    logger.info("tactic cluster metadata: %.1f MiB beside %.1f MiB of KV (%.2f%%)",
                pool.tactic_side.nbytes / 2**20, (k_bytes + v_bytes) / 2**20,
                100 * pool.tactic_side.nbytes / (k_bytes + v_bytes))  # fmt: skip
    return result


def cell_size_around(original, self, model_runner, num_layers, *args, **kwargs):
    """SGLang sizes the pool as free memory / bytes per token: add the metadata's share (of the
    layers that have metadata)."""
    cell = original(self, model_runner, num_layers, *args, **kwargs)
    if model_runner.server_args.attention_backend != BACKEND or model_runner.use_mla_backend:
        return cell
    from sglang.srt.layers.dp_attention import get_attention_tp_size

    from .backend import tactic_layer_ids

    config = model_runner.model_config
    extra = metadata_bytes_per_token(
        config.get_num_kv_heads(get_attention_tp_size()), config.head_dim,
        model_runner.kv_cache_dtype, Settings.from_env().config,
        len(tactic_layer_ids(model_runner, num_layers)), model_runner.device,
    )  # fmt: skip
    return cell + math.ceil(extra)


def free_before(self, free_index, *args, **kwargs):
    side = getattr(self._kvcache, "tactic_side", None)
    if side is not None:
        side.invalidate(free_index)
    return None


def forward_batch_generation_around(original, self, model_worker_batch=None, *args, **kwargs):
    """The backend learns the batch's requests before the forward; after it, each request's
    running Tactic sums ride customized_info to meta_info["tactic"]."""
    from .backend import TacticBackend

    backend = self.model_runner.attn_backend
    tactic = isinstance(backend, TacticBackend) and model_worker_batch is not None
    if tactic and model_worker_batch.reqs is not None:
        backend.admit(model_worker_batch.reqs, model_worker_batch.forward_mode,
                      getattr(model_worker_batch, "seq_lens_cpu", None))
    result = original(self, model_worker_batch, *args, **kwargs)
    # a batch in which no request selects adds nothing to any request's sums (dense requests
    # have none): no statistics, and no copy, for it
    selecting = tactic and (backend.batch_selects or backend.batch_fallback)
    if selecting and getattr(result, "logits_output", None) is not None:
        info = result.logits_output.customized_info or {}
        info["tactic"] = backend.request_stats(model_worker_batch.req_pool_indices)
        result.logits_output.customized_info = info
    return result
