"""Tactic's state beside a KV pool in SGLang's layout (SGLang's own, or the embedded engine's):
per-layer cluster metadata of full segments, keyed so that prefix sharing reuses it and freeing
KV invalidates it; per request slot, the target and the running statistics. Written against
tensors only (req_to_token, the K buffers, freed slot indices), so it is tested with SGLang's
real pools on the CPU.

Keying: a segment (positions [jS, (j+1)S) of a request) is named by the KV slot of its last
position. Both engines hand out KV slots along their prefix caches (SGLang's radix tree, the
embedded engine's segment cache), so two requests hold the same slot at position p only if they
share every slot up to p: equal last slots mean equal segments. When
that slot is freed (request end without caching, radix eviction), `invalidate` drops the
segment; its metadata slot is reclaimed at the next clustering.
"""

from __future__ import annotations

import logging

import torch

from tactic_server.kernels.cluster_pool import ClusterPool, centroid_dtype
from tactic_server.tactic.clustering import (
    ClusterIndex,
    build_cluster_index,
    query_moments,
    spherical_kmeans,
    stored_variance_dims,
)
from tactic_server.tactic.config import TacticConfig

logger = logging.getLogger(__name__)

# per request slot: sums of selected ratio, estimated mass, attended tokens; steps; dense-fallback
# steps (counted in the sums as reading every position); the selected ratio of its last
# selecting step (what the dense-fallback cost model expects of its next); layer-steps decoded
# dense by the per-layer rule (a selecting step's flat layers). After these STATS columns, one
# per cluster layer: that layer's selected ratio at the request's last step that selected on it.
STATS = 7
LAST_RATIO, DENSE_LAYER_STEPS = 5, 6
# key components (tokens x KV heads x head size) k-means clusters in one pass (ClusterSide.cluster):
# 256 MiB a float32 copy, about 1.3 GiB at its peak
CLUSTER_CHUNK_ELEMENTS = 1 << 26


def metadata_bytes_per_token(
    num_kv_heads: int, head_dim: int, dtype: torch.dtype, config: TacticConfig, num_layers: int,
    device: torch.device | str | None = None,
) -> float:
    """Bytes the cluster metadata adds per KV token over all layers (the segment slots
    amortised over their segment_size tokens, plus the slot -> segment map). Centroids count
    as the pool on `device` keeps them (centroid_dtype); without a device, in dtype, which
    is never less."""
    clusters = -(-config.segment_size // config.cluster_size)
    per_cluster, per_segment = stored_variance_dims(config, head_dim)
    per_slot = ClusterPool.bytes_per_segment_slot(
        num_kv_heads, head_dim, config.segment_size, clusters, dtype, per_cluster,
        None if device is None else centroid_dtype(config, dtype, device), per_segment,
    )  # fmt: skip
    return num_layers * per_slot / config.segment_size + 4


class ClusterSide:
    """Cluster metadata for `num_layers` layers of a KV pool of `num_slots` slots: the pool's
    layers layer_ids (default 0 .. num_layers - 1; a model with sliding-window layers, Gemma
    3's local ones, has metadata for its global layers only). Cluster layer i describes pool
    layer layer_ids[i]; `cluster_layer` maps back."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        config: TacticConfig,
        max_requests: int,
        layer_ids: tuple[int, ...] | None = None,
    ) -> None:
        if config.segment_size is None:
            raise ValueError("the tactic backend clusters segment by segment: set segment_size")
        self.layer_ids = tuple(range(num_layers)) if layer_ids is None else tuple(layer_ids)
        if len(self.layer_ids) != num_layers:
            raise ValueError(f"{num_layers} cluster layers for pool layers {self.layer_ids}")
        self.cluster_layer = {layer_id: i for i, layer_id in enumerate(self.layer_ids)}
        self.config = config
        self.segment_size = config.segment_size
        self.device = torch.device(device)
        # full segments of distinct last slots: at most one per segment_size slots, plus the
        # partial overlaps of requests that share part of a segment
        num_segment_slots = num_slots // self.segment_size + max_requests + 1
        clusters = -(-self.segment_size // config.cluster_size)
        per_cluster, per_segment = stored_variance_dims(config, head_dim)
        self.pools = [
            ClusterPool.allocate(
                num_segment_slots, num_kv_heads=num_kv_heads,
                head_dim=head_dim, segment_size=self.segment_size,
                clusters_per_segment=clusters, dtype=dtype, device=device,
                variance_dims=per_cluster, profile_dims=per_segment,
                centroids_dtype=centroid_dtype(config, dtype, device),
            )  # fmt: skip
            for _ in range(num_layers)
        ]
        self.last_slot_segment = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
        self._owner = [-1] * num_segment_slots  # host: the last slot each segment slot serves
        self._free = list(range(num_segment_slots - 1, -1, -1))
        self.targets = torch.ones(max_requests, device=device)
        self.stats = torch.zeros(max_requests, STATS + num_layers, device=device)
        self.clustered = 0  # segments clustered (one per layer set), in all
        # query-weighted clustering: per cluster layer and request slot, the query_moments of
        # the request's prompt (head_dim / 2 floats a KV head: 64 KiB a request for Llama 8B)
        self.query_moments = (
            torch.zeros(num_layers, max_requests, num_kv_heads, head_dim // 2, device=device)
            if config.query_weighted else None)  # fmt: skip
        if self.device.type == "cuda":
            from tactic_server.kernels.kmeans import segment_kmeans

            self.kmeans = segment_kmeans
        else:
            self.kmeans = spherical_kmeans

    @property
    def nbytes(self) -> int:
        moments = 0 if self.query_moments is None else self.query_moments.nbytes
        return (sum(pool.segment_bytes for pool in self.pools) + self.last_slot_segment.nbytes
                + moments)  # fmt: skip

    def invalidate(self, freed_slots: torch.Tensor) -> None:
        """KV slots were freed: segments ending at them are gone. index_fill_ takes the -1 as a
        kernel argument; `map[slots] = -1` would copy it from host memory first, which waits for
        the stream (the H200 profile showed two such waits per request, each stalling SGLang's
        overlap of scheduling with the running step). SGLang frees device indices; host ones
        (which indexing would have taken too) are moved first."""
        if freed_slots.numel():
            index = freed_slots.to(self.last_slot_segment.device).long()
            self.last_slot_segment.index_fill_(0, index, -1)

    def start_request(self, request_slot: int, target: float) -> None:
        """fill_ and zero_ take their values as kernel arguments: no copy from the host, no
        wait for the stream."""
        self.targets[request_slot].fill_(target)
        self.stats[request_slot].zero_()
        if self.query_moments is not None:
            self.query_moments[:, request_slot].zero_()

    def record_queries(self, layer: int, queries: torch.Tensor,
                       request_slots: torch.Tensor) -> None:  # fmt: skip
        """Add the query_moments of prompt queries [tokens, H_q, d] of cluster layer `layer` to
        those of their requests' slots [tokens], which the requests' next segments are
        clustered by (config.query_weighted; otherwise nothing is kept). The engines record
        their prefill (extend) queries: a decode step's one query would add little."""
        if self.query_moments is None or queries.shape[0] == 0:
            return
        moments = self.query_moments[layer]
        moments.index_add_(0, request_slots.to(moments.device).long(),
                           query_moments(queries, moments.shape[1]))  # fmt: skip

    def cluster(self, work, req_to_token: torch.Tensor, k_buffers) -> int:
        """Cluster the segments [first, end) of each (request_slot, first, end) in work unless
        an equal segment is already known; returns how many were clustered."""
        size = self.segment_size
        work = [(slot, first, end) for slot, first, end in work if end > first]
        rows = [req_to_token[slot, first * size : end * size].view(-1, size)
                for slot, first, end in work]  # fmt: skip
        if not rows:
            return 0
        row_slots = [slot for slot, first, end in work for _ in range(end - first)]
        slots = torch.cat(rows).long()  # [m, S]
        last = slots[:, -1]
        known = self.last_slot_segment[last].tolist()
        new = [i for i, segment in enumerate(known) if segment < 0]
        if not new:
            return 0
        if len(new) > len(self._free):
            self._reclaim()
        if len(new) > len(self._free):
            logger.warning("tactic: out of cluster metadata slots; %d segments stay unclustered "
                           "(scored exactly)", len(new) - len(self._free))  # fmt: skip
            new = new[: len(self._free)]
            if not new:
                return 0
        segment_slots = [self._free.pop() for _ in new]
        chosen = slots[torch.tensor(new, device=slots.device)]
        where = torch.tensor(segment_slots, device=self.device)
        owners = torch.tensor([row_slots[i] for i in new], device=self.device)
        # k-means works in float32 on a copy of every key it clusters, and a batch of long
        # prompts (32 x 128k on one KV head: 2 GiB a copy) would not fit beside a full KV pool:
        # at most CLUSTER_CHUNK_ELEMENTS key components a pass (segments are independent
        # problems, so the passes give what one would)
        elements = size * k_buffers[0].shape[1] * k_buffers[0].shape[2]
        step = max(1, CLUSTER_CHUNK_ELEMENTS // elements)
        for layer, (pool, k_buffer) in enumerate(zip(self.pools, k_buffers, strict=True)):
            for start in range(0, len(new), step):
                part = slice(start, start + step)
                token_slots = chosen[part].flatten()
                moments = (None if self.query_moments is None
                           else self.query_moments[layer][owners[part]])  # fmt: skip
                index = build_cluster_index(k_buffer[token_slots], self.config,
                                            kmeans=self.kmeans, query_moments=moments)  # fmt: skip
                pool.write_segments(index, token_slots, where[part])
        self.last_slot_segment[chosen[:, -1]] = where.int()
        for segment_slot, last_slot in zip(segment_slots, chosen[:, -1].tolist(), strict=True):
            self._owner[segment_slot] = last_slot
        return len(new)

    def cluster_requests(self, entries, req_to_token: torch.Tensor, k_buffers) -> list[int]:
        """Per (request_slot, segments clustered so far, cached positions): cluster the full
        segments of its cached positions that are new since (those another request already
        clustered, a shared prefix, are found, not redone); returns the requests' clustered
        segment counts, and adds the segments clustered here to `self.clustered`."""
        size = self.segment_size
        done = [min(clustered, cached // size) for _, clustered, cached in entries]
        work = [(slot, first, cached // size)
                for (slot, _, cached), first in zip(entries, done, strict=True)
                if cached // size > first]  # fmt: skip
        self.clustered += self.cluster(work, req_to_token, k_buffers)
        return [cached // size for _, _, cached in entries]

    def leading_segments(self, req_to_token: torch.Tensor, request_slot: int,
                         seq_len: int) -> torch.Tensor:  # fmt: skip
        """The segment slots [count] of a request's leading clustered full segments among its
        cached positions before seq_len - 1: what select_rows reads for it, once per step for
        every layer. For the torch path (it reads the count back to the host)."""
        slots = torch.tensor([request_slot], device=self.device)
        cached = torch.tensor([seq_len - 1], device=self.device)
        table, clustered = self.segment_table(req_to_token, slots, cached,
                                              (seq_len - 1) // self.segment_size)  # fmt: skip
        return table[0, : int(clustered[0])].long()

    def cluster_index(self, layer: int, segments: torch.Tensor,
                      seq_len: int) -> ClusterIndex | None:  # fmt: skip
        """One layer's clusters of those segments (leading_segments) as the ClusterIndex of the
        torch reference (tactic.selection.plan_tactic), members as positions from 0; None
        without any. Exact: members are stored in position order within their cluster, as
        build_cluster_index orders them."""
        count = segments.numel()
        if count == 0:
            return None
        pool, size, chosen = self.pools[layer], self.segment_size, segments
        clusters = pool.clusters_per_segment
        first_position = (torch.arange(count, device=self.device) * size)[:, None, None]

        def per_head(tensor: torch.Tensor) -> torch.Tensor:
            """[segments, H_kv, X, ...] -> [H_kv, segments * X, ...]"""
            return tensor.transpose(0, 1).reshape(tensor.shape[1], -1, *tensor.shape[3:])

        offsets = pool.cluster_offsets[chosen].long()  # [segments, H_kv, C + 1], from 0
        local_cluster = pool.token_cluster[chosen].long()  # [segments, H_kv, S]
        order = torch.argsort(local_cluster * size + torch.arange(size, device=self.device),
                              dim=-1)  # fmt: skip
        heads = offsets.shape[1]
        end = torch.full((heads, 1), count * size, dtype=torch.long, device=self.device)
        return ClusterIndex(
            seq_len=seq_len,
            clustered_len=count * size,
            centroids=per_head(pool.stored_centroids(chosen)),
            variances=per_head(pool.stored_variances(chosen)),
            cluster_sizes=per_head(offsets[:, :, 1:] - offsets[:, :, :-1]),
            cluster_offsets=torch.cat([per_head(offsets[:, :, :-1] + first_position), end], 1),
            token_positions=per_head(order + first_position),
            token_cluster=per_head(local_cluster + first_position // size * clusters),
        )

    def _reclaim(self) -> None:
        """Segment slots whose last KV slot was freed since (the map no longer points back)."""
        held = [s for s, owner in enumerate(self._owner) if owner >= 0]
        if not held:
            return
        owners = torch.tensor([self._owner[s] for s in held], device=self.device)
        current = self.last_slot_segment[owners].tolist()
        for segment_slot, pointed in zip(held, current, strict=True):
            if pointed != segment_slot:
                self._owner[segment_slot] = -1
                self._free.append(segment_slot)

    def segment_table(
        self, req_to_token: torch.Tensor, request_slots: torch.Tensor, cached_lens: torch.Tensor,
        max_segments: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per request (device, no sync): req_to_segment [n, max(1, max_segments)] int32 and
        the number of leading clustered segments [n] int32, among the full segments of its
        first cached_lens positions."""
        n = request_slots.shape[0]
        width = max(1, max_segments)
        if max_segments == 0:
            zeros = torch.zeros(n, 1, dtype=torch.int32, device=self.device)
            return zeros, torch.zeros(n, dtype=torch.int32, device=self.device)
        positions = torch.arange(1, width + 1, device=self.device) * self.segment_size - 1
        last = req_to_token[request_slots.long()][:, positions].long()
        segment = self.last_slot_segment[last]
        full = positions[None, :] < cached_lens.long()[:, None]
        valid = full & (segment >= 0)
        clustered = valid.int().cumprod(dim=1).sum(dim=1).int()
        return torch.where(valid, segment, 0).int(), clustered
