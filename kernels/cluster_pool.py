"""Cluster metadata beside the KV cache, per segment: the device layout the selection kernels read.

A segment (segment_size consecutive positions of one request, aligned to position 0) is clustered
once and never changes, so its metadata lives in a segment slot that requests sharing the prefix
can share; a request's segment table (req_to_segment [requests, segments] int32, which the
caller builds and passes to the selection) maps its segment index to that slot, as req_to_token
maps its positions to KV slots. Member lists hold KV slots, so selection needs no position lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tactic_server.tactic.clustering import ClusterIndex, decode_variances, encode_variances


def _variance_dtype(variance_dims: int) -> torch.dtype:
    """Per-dimension variances are as many values as a centroid: 8-bit codes of their log
    (clustering.encode_variances); one mean variance per cluster costs little in float32."""
    return torch.uint8 if variance_dims > 1 else torch.float32


def stored_variances(variances: torch.Tensor) -> torch.Tensor:
    """float32 variances of a pool's stored ones (codes or float32)."""
    return decode_variances(variances) if variances.dtype == torch.uint8 else variances.float()


@dataclass
class ClusterPool:
    """Per segment slot s and KV head h:
    centroids [S_cap, H_kv, C, d] (kv dtype), variances [S_cap, H_kv, C, V] (ClusterIndex's:
    V = d per-dimension variances as uint8 codes of their log2, or V = 1, their mean, in
    float32),
    cluster_offsets [S_cap, H_kv, C + 1] int32 (into the segment's member list),
    member_slots [S_cap, H_kv, segment_size] int32 KV slots in cluster order,
    token_cluster [S_cap, H_kv, segment_size] int32 cluster of each position of the segment."""

    segment_size: int
    clusters_per_segment: int
    centroids: torch.Tensor
    variances: torch.Tensor
    cluster_offsets: torch.Tensor
    member_slots: torch.Tensor
    token_cluster: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_segment_slots: int,
        num_kv_heads: int,
        head_dim: int,
        segment_size: int,
        clusters_per_segment: int,
        dtype: torch.dtype,
        device: torch.device | str,
        variance_dims: int = 1,
    ) -> ClusterPool:
        shape = (num_segment_slots, num_kv_heads)
        return cls(
            segment_size=segment_size,
            clusters_per_segment=clusters_per_segment,
            centroids=torch.zeros(
                *shape, clusters_per_segment, head_dim, dtype=dtype, device=device
            ),
            variances=torch.zeros(*shape, clusters_per_segment, variance_dims,
                                  dtype=_variance_dtype(variance_dims), device=device),
            cluster_offsets=torch.zeros(
                *shape, clusters_per_segment + 1, dtype=torch.int32, device=device
            ),
            member_slots=torch.zeros(*shape, segment_size, dtype=torch.int32, device=device),
            token_cluster=torch.zeros(*shape, segment_size, dtype=torch.int32, device=device),
        )

    @staticmethod
    def bytes_per_segment_slot(
        num_kv_heads: int,
        head_dim: int,
        segment_size: int,
        clusters_per_segment: int,
        dtype: torch.dtype,
        variance_dims: int = 1,
    ) -> int:
        """Device bytes of one segment slot: what a KV pool
        must count beside the KV of the segment_size tokens it describes."""
        element = torch.empty((), dtype=dtype).element_size()
        variance = variance_dims * _variance_dtype(variance_dims).itemsize
        per_cluster = head_dim * element + variance + 4  # centroid, variances, offset
        per_head = clusters_per_segment * per_cluster + 4 + 2 * 4 * segment_size
        return num_kv_heads * per_head

    @property
    def segment_bytes(self) -> int:
        """Device bytes of all segment slots (what bytes_per_segment_slot counts, allocated)."""
        tensors = (self.centroids, self.variances, self.cluster_offsets, self.member_slots,
                   self.token_cluster)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)

    def write_segments(
        self, index: ClusterIndex, token_slots: torch.Tensor, segment_slots: torch.Tensor
    ) -> None:
        """Store the full segments of a ClusterIndex (built with this pool's segment size) at
        segment_slots [num_segments]; token_slots [seq_len] maps the index's positions to KV
        slots. Requests find them through their segment tables, which the caller keeps."""
        size, clusters = self.segment_size, self.clusters_per_segment
        num_segments = index.clustered_len // size
        if index.num_clusters != num_segments * clusters or len(segment_slots) != num_segments:
            raise ValueError("the cluster index does not match this pool's segment layout")
        if num_segments == 0:
            return
        heads = index.centroids.shape[0]
        slots = segment_slots.to(self.centroids.device).long()
        segment_starts = torch.arange(num_segments, device=slots.device)

        def per_segment(tensor: torch.Tensor, width: int) -> torch.Tensor:
            """[H_kv, num_segments * width, ...] -> [num_segments, H_kv, width, ...]"""
            return tensor.reshape(heads, num_segments, width, *tensor.shape[2:]).transpose(0, 1)

        self.centroids[slots] = per_segment(index.centroids, clusters).to(self.centroids.dtype)
        if index.variances.shape[-1] != self.variances.shape[-1]:
            raise ValueError("the cluster index keeps other variances than this pool")
        variances = per_segment(index.variances, clusters)
        self.variances[slots] = (encode_variances(variances) if self.variances.dtype == torch.uint8
                                 else variances.to(self.variances.dtype))  # fmt: skip
        offsets = per_segment(index.cluster_offsets[:, :-1], clusters) - (
            segment_starts[:, None, None] * size
        )
        self.cluster_offsets[slots, :, :clusters] = offsets.int()
        self.cluster_offsets[slots, :, clusters] = size
        positions = per_segment(index.token_positions, size)
        self.member_slots[slots] = token_slots.to(slots.device)[positions].int()
        local_cluster = (
            per_segment(index.token_cluster, size) - segment_starts[:, None, None] * clusters
        )
        self.token_cluster[slots] = local_cluster.int()
