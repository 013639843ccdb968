"""The `tactic` attention backend for SGLang 0.5.12: one of SGLang's own dense backends
(FlashInfer on a GPU with a 16-bit KV cache, else Triton: `dense_backend_class`) does extend
(prefill) and every decode in which no request selects, CUDA graphs included; a decode with a
request whose target is below 1 runs through our selection and sparse decode kernels, either
replaying a CUDA graph of its own family (every row selects, sized by the context bound; see
hooks.TacticGraphRunners) or eagerly (sized by the batch's host-side lengths), unless the
GPU's cost model says selecting would not pay for the batch (the dense fallback: the dense
backend decodes it, its graphs included). A Tactic request's full segments are clustered
before the forward that first needs them (chunked prefill included), eagerly, also before a
graph replay.

Models with sliding-window layers (Gemma 3: five local layers of a 512-token window to one
global layer) select on their global layers only (`tactic_layer_ids`); the sliding layers decode
through the dense backend's own window path in every batch, Tactic ones and their graphs
included."""

from __future__ import annotations

import importlib
import logging
import math

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.layers.dp_attention import get_attention_tp_size

from tactic_server.decode import ClusterSide, TacticDecoder, cost
from tactic_server.decode.clusters import STATS
from tactic_server.tactic.config import selects

from .settings import Settings, request_target

logger = logging.getLogger(__name__)


FLASHINFER_HEAD_DIMS = (64, 128, 256)


def dense_backend_name(choice: str, model_runner) -> str:
    """The SGLang backend under the tactic one for a setting (Settings.dense_backend): "auto"
    takes flashinfer (SGLang's fastest dense decode measured here) on a CUDA GPU with a 16-bit
    KV cache and a head size FlashInfer compiles (64, 128, 256) where flashinfer imports, else
    triton (the CPU, float32 caches, tiny test models)."""
    if choice != "auto":
        return choice
    if torch.device(model_runner.device).type != "cuda":
        return "triton"
    if model_runner.kv_cache_dtype not in (torch.float16, torch.bfloat16):
        return "triton"
    # FlashInfer's prefill has no configuration for other head sizes (head_dim 32 stopped
    # its CUDA-graph capture on the H200: "Invalid configuration : NUM_MMA_D_QK=2")
    if model_runner.model_config.head_dim not in FLASHINFER_HEAD_DIMS:
        return "triton"
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return "triton"
    return "flashinfer"


def dense_backend_class(name: str) -> type:
    """The tactic backend over SGLang's backend `name` (a class per base, made once)."""
    if name not in _CLASSES:
        if name not in _DENSE_CLASSES:
            raise ValueError(f"unknown dense backend {name!r} (flashinfer, fa3 or triton)")
        module, base, label = _DENSE_CLASSES[name]
        try:
            dense = getattr(importlib.import_module(module), base)
        except (ImportError, OSError) as error:
            raise ValueError(f"TACTIC_DENSE_BACKEND={name}, but SGLang's {label} backend does "
                             f"not import here: {error}") from error  # fmt: skip
        _CLASSES[name] = type(f"Tactic{base}", (TacticBackend, dense),
                              {"__doc__": f"The tactic backend over SGLang's {label} one.",
                               "dense_name": name})  # fmt: skip
    return _CLASSES[name]


# the dense backends the tactic one composes with besides Triton: module, class, name
_DENSE_CLASSES = {
    "flashinfer": ("sglang.srt.layers.attention.flashinfer_backend", "FlashInferAttnBackend",
                   "FlashInfer"),
    "fa3": ("sglang.srt.layers.attention.flashattention_backend", "FlashAttentionBackend", "FA3"),
}  # fmt: skip


def tactic_layer_ids(model_runner, num_layers: int) -> tuple[int, ...]:
    """The layers Tactic selects on: all num_layers, unless the model has sliding-window layers
    (SGLang's model_runner.sliding_window_size, from the loaded model, which SGLang builds
    before its pools and backend); then those whose RadixAttention has no window
    (sliding_window_size -1: Gemma 3's global layers)."""
    if model_runner.sliding_window_size is None:
        return tuple(range(num_layers))
    from sglang.srt.layers.radix_attention import RadixAttention

    return tuple(sorted({module.layer_id for module in model_runner.model.modules()
                         if isinstance(module, RadixAttention)
                         and module.sliding_window_size == -1}))  # fmt: skip


def check_supported(model_runner) -> None:
    """Refuse at startup what the backend does not handle."""
    args = model_runner.server_args
    problems = []
    if model_runner.use_mla_backend:
        problems.append("MLA attention")
    if args.speculative_algorithm is not None:
        problems.append("speculative decoding")
    if not model_runner.token_to_kv_pool.tactic_side.layer_ids:
        problems.append("sliding-window attention on every layer (no layer to select on)")
    if getattr(model_runner.model_config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models")
    if args.page_size != 1:
        problems.append(f"page_size {args.page_size} (only 1)")
    if getattr(args, "enable_hierarchical_cache", False):
        problems.append("hierarchical cache (cluster metadata is not offloaded)")
    if getattr(args, "disaggregation_mode", "null") not in (None, "null"):
        problems.append("prefill/decode disaggregation")
    if problems:
        raise ValueError("the tactic attention backend does not support: " + ", ".join(problems))


def tp_mean(tensor: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Mean over the attention tensor-parallel ranks, each of which holds tp_k_head_num of the
    KV heads (statistics are means over heads, and the ranks hold equal shares)."""
    from sglang.srt.distributed.parallel_state import get_attn_tp_group

    return get_attn_tp_group().all_reduce(tensor) / tp_size


class TacticBackend:
    """What the tactic backend adds to SGLang's dense backend it is mixed into (the class after
    it in the bases), which runs whatever this one leaves to super()."""

    dense_name = "triton"  # the SGLang backend mixed in

    def __init__(self, model_runner) -> None:
        check_supported(model_runner)
        super().__init__(model_runner)
        self.settings = Settings.from_env()
        pool = model_runner.token_to_kv_pool
        self.side: ClusterSide = pool.tactic_side
        self.head_dim = model_runner.model_config.head_dim
        tp_size = get_attention_tp_size()
        # FlashInfer's backend keeps neither of these (Triton's does)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.num_kv_head = model_runner.model_config.get_num_kv_heads(tp_size)
        combine = (lambda step: tp_mean(step, tp_size)) if tp_size > 1 else None
        cost_model = (cost.for_device(pool.device, self.dense_name)
                      if self.settings.dense_fallback == "auto" else None)  # fmt: skip
        bytes_per_token = 2 * self.num_kv_head * self.head_dim * pool.dtype.itemsize
        self.decoder = TacticDecoder(self.side, self.settings.config, self.num_kv_head, combine,
                                     cost_model, bytes_per_token,
                                     pdl=self.settings.pdl)  # fmt: skip
        self.plan = None
        self.extend_slots = None  # the request slot of each extended token (query_weighted)
        # SGLang layer id -> cluster layer, for the layers Tactic selects on; the others (sliding
        # windows) decode through the dense backend, whose metadata every decode then needs
        self.cluster_layer = self.side.cluster_layer
        self.k_buffers = [pool.k_buffer[layer_id] for layer_id in self.side.layer_ids]
        self.windowed = len(self.side.layer_ids) < len(pool.k_buffer)
        if self.windowed and self.dense_name == "fa3":
            # the Tactic graphs' sliding layers replay the dense backend's graph metadata,
            # which the backend keeps per context bound for FlashInfer and Triton only
            raise ValueError("TACTIC_DENSE_BACKEND=fa3 runs models without sliding-window "
                             "layers; take flashinfer or triton for this one")  # fmt: skip
        if self.windowed and self.dense_name == "triton":
            # SGLang's window W (Gemma 3: sliding_window - 1, the keys before the query): its
            # Triton extend masks to the W + 1 keys up to the query, as FlashInfer and
            # transformers attend, but its Triton decode reads the last min(seq_len, W) (the
            # backend's W sizes the decode window's index lists, the layer's the extend mask).
            # One more makes decode read the W + 1 keys extend does; the extend prefix lists
            # gain a key its mask leaves out. Before init_cuda_graph_state, which sizes the
            # graphs' window buffers by it.
            self.sliding_window_size += 1
        # FlashInfer keeps decode wrappers per batch size, which SGLang's dense graphs replay;
        # the Tactic graphs' sliding layers need their own, per context bound
        self.tactic_graph_wrappers: dict[int, dict] = {}
        # the dense fallback's view of the requests' selected ratios: each step's statistics
        # copy (request slots, host rows, the event after the copy), read two steps later, when
        # SGLang has synchronised on that step whether or not it overlaps scheduling, so that
        # every rank of a tensor-parallel group reads the same sums at the same step
        self.pending_stats: list[tuple[list[int], object, torch.cuda.Event | None]] = []
        self.batch_fallback = False  # the batch's selecting requests decode dense this step
        self.fallback_rows: list[tuple[int, int]] = []  # its (request slot, length) pairs
        # SGLang's request slots are 1..size (row 0 pads CUDA-graph batches)
        self.host_targets = [1.0] * model_runner.req_to_token_pool.req_to_token.shape[0]
        self.batch_reqs = None
        self.batch_selects = False  # some request of the batch selects
        # the graph family that may serve the batch (read by hooks.TacticGraphRunners): "dense"
        # when no request selects, "tactic" when every one does, None (eager) when mixed
        self.batch_graph_family: str | None = "dense"
        # the family SGLang's graph runner captures or replays now: "dense" (SGLang's Triton
        # decode) or "tactic" (graph_plan); graph_capture: a Tactic graph is being captured,
        # its plan is built inside the forward (layer 0) so that the graph replays it
        self.graph_family = "dense"
        self.graph_capture = False
        self.graph_bound = self.max_context_len  # the context bound of the graph captured
        logger.info("tactic backend: default target %.3f, %s", self.settings.default_target,
                    self.settings.config)  # fmt: skip

    # requests, from the worker hook (before the forward that first sees them)

    def admit(self, reqs, forward_mode=None, seq_lens_cpu=None) -> None:
        """Per request of the coming forward: its target on first sight, and its clustered
        segment count (kept on the request, as SGLang keeps its own state there); for a decode,
        whether its selecting requests select (the cost model) or fall back to dense."""
        self.batch_reqs = reqs
        for req in reqs:
            if getattr(req, "_tactic_slot", None) != req.req_pool_idx:
                target = request_target(req.sampling_params.custom_params,
                                        self.settings.default_target)  # fmt: skip
                req._tactic_slot = req.req_pool_idx
                req._tactic_clustered = 0
                self.host_targets[req.req_pool_idx] = target
                self.side.start_request(req.req_pool_idx, target)
        selecting = [selects(self.host_targets[req.req_pool_idx]) for req in reqs]
        self.batch_selects = any(selecting)
        self.batch_fallback, self.fallback_rows = False, []
        if self.batch_selects and forward_mode is not None and forward_mode.is_decode():
            self._observe_statistics()
            lengths = (seq_lens_cpu.tolist() if seq_lens_cpu is not None
                       else [len(r.origin_input_ids) + len(r.output_ids) for r in reqs])
            chosen = [(length, req.req_pool_idx)
                      for req, length, sel in zip(reqs, lengths, selecting, strict=True)
                      if sel]  # fmt: skip
            lengths, slots = zip(*chosen, strict=True)
            self.batch_fallback = not self.decoder.selection_pays(list(lengths), list(slots))
            # what the fallback step counts, from the host (rows of length 1 pad graphs)
            self.fallback_rows = [(slot, n) for n, slot in chosen if n > 1]
        else:
            self.decoder.interrupt()  # no decode step of selecting requests: nothing to time
        if self.batch_fallback:
            selecting = [False] * len(reqs)
        self.batch_graph_family = ("tactic" if all(selecting) else None) if any(selecting) \
            else "dense"

    def _observe_statistics(self) -> None:
        """Hand the decoder the requests' sums of the step before last (see pending_stats)."""
        while len(self.pending_stats) > 1:
            slots, rows, event = self.pending_stats[0]
            if event is not None and self.decoder.combine_ranks is None and not event.query():
                return  # not copied yet: read it at the next step (one rank, nothing to agree)
            if event is not None:
                event.synchronize()  # done already: SGLang synchronised on that step
            self.pending_stats.pop(0)
            for slot, row in zip(slots, rows, strict=True):
                self.decoder.observe(slot, row)

    def request_stats(self, req_pool_indices: torch.Tensor):
        """Running sums [batch, STATS] of the batch's requests as a numpy view of pinned host
        memory, copied without waiting (SGLang reads them after its own copy of the step's
        results). SGLang keeps one row per request and token and pickles them all to the
        tokenizer process when the request ends: numpy rows, because a torch tensor pickles
        through torch.save, which cost hundreds of milliseconds a batch of long answers; and
        without the per-layer ratios after the sums, which only the cost model reads."""
        rows = self.side.stats[req_pool_indices.long()]
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=rows.is_cuda)
        host.copy_(rows, non_blocking=True)
        if self.decoder.cost_model is not None and self.batch_reqs is not None \
                and len(self.batch_reqs) == rows.shape[0]:  # fmt: skip
            event = None
            if rows.is_cuda:
                event = torch.cuda.Event()
                event.record()
            slots = [req.req_pool_idx for req in self.batch_reqs]
            self.pending_stats = [*self.pending_stats[-2:], (slots, host.numpy(), event)]
        return host[:, :STATS].numpy()

    def _count_fallback(self) -> None:
        """A dense-fallback step in the statistics of the batch's selecting rows."""
        if self.fallback_rows:
            slots, lengths = zip(*self.fallback_rows, strict=True)
            self.decoder.count_fallback(list(slots), list(lengths))

    # SGLang's hooks

    def init_forward_metadata(self, forward_batch) -> None:
        self.plan, self.graph_capture, self.extend_slots = None, False, None
        mode = forward_batch.forward_mode
        reqs = self.batch_reqs
        admitted = reqs is not None and len(reqs) == forward_batch.batch_size
        seq_lens = forward_batch.seq_lens_cpu.tolist() if mode.is_decode() else None
        if admitted and self.batch_selects:
            if mode.is_decode() and not self.batch_fallback:
                self._cluster(reqs, [n - 1 for n in seq_lens])
            elif mode.is_extend():
                self._cluster(reqs, list(forward_batch.extend_prefix_lens_cpu))
        if mode.is_decode() and self.batch_fallback and admitted:
            self._count_fallback()
        elif mode.is_decode():
            # the admitted requests are the batch's rows in order: their slots are on the host
            # already, without reading req_pool_indices back from the device
            slots = ([req.req_pool_idx for req in reqs] if admitted
                     else forward_batch.req_pool_indices.tolist())  # fmt: skip
            self.plan = self.decoder.plan(
                self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                seq_lens, [self.host_targets[s] for s in slots],
            )  # fmt: skip
        if self.plan is None or self.windowed:
            super().init_forward_metadata(forward_batch)

    def _dense_graph_metadata(self, method, *args, **kwargs):
        """SGLang's graph metadata for the sliding layers of a Tactic graph (method: the dense
        backend's capture or replay), with FlashInfer's per-batch-size wrappers those of the
        Tactic graphs of this context bound, not those the dense graphs captured. Triton keeps
        no per-graph state: its graph buffers are filled before each replay, whichever
        family."""
        dense = getattr(self, "decode_cuda_graph_metadata", None)
        if dense is None:
            return method(*args, **kwargs)
        self.decode_cuda_graph_metadata = self.tactic_graph_wrappers.setdefault(self.graph_bound,
                                                                                {})  # fmt: skip
        try:
            return method(*args, **kwargs)
        finally:
            self.decode_cuda_graph_metadata = dense

    def init_cuda_graph_state(self, *args, **kwargs):
        """The Tactic family allocates its buffers inside its graphs; SGLang's Triton buffers,
        which the dense graphs captured, must stay as they are (the Tactic graphs' sliding
        layers read them too: the dense graphs are captured first, for at least the Tactic
        graphs' batch sizes)."""
        if self.graph_family == "tactic":
            return None
        return super().init_cuda_graph_state(*args, **kwargs)

    def init_forward_metadata_capture_cuda_graph(self, *args, **kwargs):
        self.plan = None
        self.graph_capture = self.graph_family == "tactic"
        if not self.graph_capture:
            return super().init_forward_metadata_capture_cuda_graph(*args, **kwargs)
        if self.windowed:
            return self._dense_graph_metadata(super().init_forward_metadata_capture_cuda_graph,
                                              *args, **kwargs)  # fmt: skip
        return None

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens,
                                                *args, **kwargs):  # fmt: skip
        """Before a Tactic graph replays: cluster the segments its requests completed (their
        lengths on the host, from the batch SGLang hands over), and fill the dense backend's
        metadata where sliding layers read it."""
        self.plan = None
        if self.graph_family != "tactic":
            if self.batch_fallback and self.batch_reqs is not None:
                self._count_fallback()
            return super().init_forward_metadata_replay_cuda_graph(bs, req_pool_indices, seq_lens,
                                                                   *args, **kwargs)  # fmt: skip
        reqs, batch = self.batch_reqs, getattr(self, "_replay_forward_batch", None)
        if reqs is not None and batch is not None and len(reqs) == batch.batch_size:
            self._cluster(reqs, [n - 1 for n in batch.seq_lens_cpu.tolist()])
        if self.windowed:
            replay = super().init_forward_metadata_replay_cuda_graph
            return self._dense_graph_metadata(replay, bs, req_pool_indices, seq_lens, *args,
                                              **kwargs)  # fmt: skip
        return None

    def _cluster(self, reqs, cached: list[int]) -> None:
        """Cluster the Tactic requests' full segments not clustered yet (dense ones need none;
        one that later shares their prefix finds them)."""
        chosen = [(req, length) for req, length in zip(reqs, cached, strict=True)
                  if selects(self.host_targets[req.req_pool_idx])]  # fmt: skip
        if not chosen:
            return
        entries = [(req.req_pool_idx, getattr(req, "_tactic_clustered", 0), length)
                   for req, length in chosen]  # fmt: skip
        counts = self.side.cluster_requests(entries, self.req_to_token, self.k_buffers)
        for (req, _), count in zip(chosen, counts, strict=True):
            req._tactic_clustered = count

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """The dense backend's extend; on a cluster layer the extended queries are recorded
        first for query-weighted clustering (ClusterSide.record_queries)."""
        cluster_layer = self.cluster_layer.get(layer.layer_id)
        if cluster_layer is not None and self.side.query_moments is not None:
            if self.extend_slots is None:  # once a forward (init_forward_metadata resets it)
                # the token count from the host, so that the device is not waited for
                self.extend_slots = torch.repeat_interleave(
                    forward_batch.req_pool_indices, forward_batch.extend_seq_lens,
                    output_size=sum(forward_batch.extend_seq_lens_cpu))  # fmt: skip
            queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            self.side.record_queries(cluster_layer, queries[: self.extend_slots.numel()],
                                     self.extend_slots)  # fmt: skip
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        cluster_layer = self.cluster_layer.get(layer.layer_id)
        if self.graph_capture and cluster_layer == 0:
            # built by each forward of the capture, so that the graph records it
            self.plan = self.decoder.graph_plan(
                self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                self.graph_bound,
            )  # fmt: skip
        if self.plan is None or cluster_layer is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if layer.logit_cap:
            raise ValueError("tactic decode does not cap logits")
        if layer.tp_k_head_num != self.decoder.num_kv_heads:
            raise ValueError(f"layer {layer.layer_id} has {layer.tp_k_head_num} KV heads on this "
                             f"rank, the pool {self.decoder.num_kv_heads}")  # fmt: skip
        pool = forward_batch.token_to_kv_pool
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale,
                               layer.v_scale)  # fmt: skip
        heads, dim = layer.tp_q_head_num, layer.qk_head_dim
        queries = q.reshape(-1, heads, dim)
        # Tactic's kernels score q . k / sqrt(dim); the layer's own scale (Gemma 3:
        # query_pre_attn_scalar ** -0.5) goes into the query
        query_scale = layer.scaling * math.sqrt(dim)
        if not math.isclose(query_scale, 1.0, rel_tol=1e-6):
            queries = queries * query_scale
        out = self.decoder.attend(
            self.plan, queries, pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id), cluster_layer,
        )  # fmt: skip
        if cluster_layer == len(self.k_buffers) - 1:
            self.decoder.finish(self.plan)
        return out.reshape(-1, heads * dim)


class TacticAttnBackend(TacticBackend, TritonAttnBackend):
    """The tactic backend over SGLang's Triton one."""


_CLASSES: dict[str, type] = {"triton": TacticAttnBackend}
