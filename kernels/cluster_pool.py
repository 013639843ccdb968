"""Cluster metadata beside the KV cache, per segment: the device layout the selection kernels read.

A segment (segment_size consecutive positions of one request, aligned to position 0) is clustered
once and never changes, so its metadata lives in a segment slot that requests sharing the prefix
can share; a request's segment table (req_to_segment [requests, segments] int32, which the
caller builds and passes to the selection) maps its segment index to that slot, as req_to_token
maps its positions to KV slots. Member lists hold KV slots, so selection needs no position lookup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tactic_server.tactic.clustering import ClusterIndex, encode_variances, fp8_centroids
from tactic_server.tactic.config import TacticConfig

logger = logging.getLogger(__name__)


def _variance_dtype(variance_dims: int) -> torch.dtype:
    """Per-dimension variances are as many values as a centroid: float8 e5m2
    (clustering.encode_variances); one mean variance per cluster costs little in float32."""
    return torch.float8_e5m2 if variance_dims > 1 else torch.float32


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as its bytes (not every torch build indexes or fills float8 tensors);
    others as they are."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def _rows_as_float(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float32 copy of tensor[rows], float8 tensors included (indexed as bytes)."""
    return _bytes_of(tensor)[rows.to(tensor.device)].view(tensor.dtype).float()


def _zeros(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros of any float dtype, float8 included: allocated as bytes (zero bits are 0.0)."""
    return torch.zeros(*shape[:-1], shape[-1] * dtype.itemsize, dtype=torch.uint8,
                       device=device).view(dtype)  # fmt: skip


def centroid_dtype(config: TacticConfig, kv_dtype: torch.dtype,
                   device: torch.device | str) -> torch.dtype:  # fmt: skip
    """The dtype a pool keeps centroids in (config.centroids): float8 e4m3 for "fp8" where the
    device converts it (CPU, the Triton interpreter, CUDA from compute capability 8.9), else
    the KV cache's."""
    if config.centroids != "fp8":
        return kv_dtype
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability < (8, 9):
        logger.warning("fp8 centroids need compute capability 8.9 (this GPU has %s): centroids "
                       "stay in %s", capability, kv_dtype)  # fmt: skip
        return kv_dtype
    return torch.float8_e4m3fn


@dataclass
class ClusterPool:
    """Per segment slot s and KV head h:
    centroids [S_cap, H_kv, C, d] (kv dtype, or float8 e4m3: centroid_dtype),
    variances [S_cap, H_kv, C, V] (ClusterIndex's: V = d per-dimension variances as float8
    e5m2 (clustering.encode_variances), or V = 1, their mean or the "profile" scale, in float32),
    profiles [S_cap, H_kv, P] float16 ("profile" variances: P = d, the segment's profile, which
    a cluster's scale multiplies; else P = 0),
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
    profiles: torch.Tensor

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
        centroids_dtype: torch.dtype | None = None,
        profile_dims: int = 0,
    ) -> ClusterPool:
        """centroids_dtype: None keeps centroids in dtype (the KV cache's); variance_dims,
        profile_dims: clustering.stored_variance_dims."""
        shape = (num_segment_slots, num_kv_heads)
        return cls(
            segment_size=segment_size,
            clusters_per_segment=clusters_per_segment,
            centroids=_zeros(*shape, clusters_per_segment, head_dim,
                             dtype=centroids_dtype or dtype, device=device),
            variances=_zeros(*shape, clusters_per_segment, variance_dims,
                             dtype=_variance_dtype(variance_dims), device=device),
            cluster_offsets=torch.zeros(
                *shape, clusters_per_segment + 1, dtype=torch.int32, device=device
            ),
            member_slots=torch.zeros(*shape, segment_size, dtype=torch.int32, device=device),
            token_cluster=torch.zeros(*shape, segment_size, dtype=torch.int32, device=device),
            profiles=torch.zeros(*shape, profile_dims, dtype=torch.float16, device=device),
        )

    @staticmethod
    def bytes_per_segment_slot(
        num_kv_heads: int,
        head_dim: int,
        segment_size: int,
        clusters_per_segment: int,
        dtype: torch.dtype,
        variance_dims: int = 1,
        centroids_dtype: torch.dtype | None = None,
        profile_dims: int = 0,
    ) -> int:
        """Device bytes of one segment slot: what a KV pool
        must count beside the KV of the segment_size tokens it describes."""
        element = (centroids_dtype or dtype).itemsize
        variance = variance_dims * _variance_dtype(variance_dims).itemsize
        per_cluster = head_dim * element + variance + 4  # centroid, variances, offset
        per_head = clusters_per_segment * per_cluster + 4 + 2 * 4 * segment_size + 2 * profile_dims
        return num_kv_heads * per_head

    @property
    def segment_bytes(self) -> int:
        """Device bytes of all segment slots (what bytes_per_segment_slot counts, allocated)."""
        tensors = (self.centroids, self.variances, self.cluster_offsets, self.member_slots,
                   self.token_cluster, self.profiles)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)

    def stored_centroids(self, segment_slots: torch.Tensor) -> torch.Tensor:
        """float32 centroids [len(segment_slots), H_kv, C, d] of those slots, as stored."""
        return _rows_as_float(self.centroids, segment_slots)

    def stored_variances(self, segment_slots: torch.Tensor) -> torch.Tensor:
        """float32 variances [len(segment_slots), H_kv, C, V] of those slots, as stored ("profile":
        V = d, scale times profile, the products clustering made)."""
        variances = _rows_as_float(self.variances, segment_slots)
        if self.profiles.shape[-1] == 0:
            return variances
        return variances * self.stored_profiles(segment_slots)[:, :, None, :]

    def stored_profiles(self, segment_slots: torch.Tensor) -> torch.Tensor:
        """float32 profiles [len(segment_slots), H_kv, P] of those slots (P = 0 but for
        "profile" variances)."""
        return self.profiles[segment_slots.to(self.profiles.device)].float()

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

        centroids = per_segment(index.centroids, clusters)
        centroids = (fp8_centroids(centroids) if self.centroids.dtype == torch.float8_e4m3fn
                     else centroids.to(self.centroids.dtype))  # fmt: skip
        _bytes_of(self.centroids)[slots] = _bytes_of(centroids.contiguous())
        profiled = self.profiles.shape[-1] > 0
        if profiled != (index.variance_profiles is not None) or (
                not profiled and index.variances.shape[-1] != self.variances.shape[-1]):
            raise ValueError("the cluster index keeps other variances than this pool")
        if profiled:  # the scales where the others keep variances, and the profiles
            self.profiles[slots] = per_segment(index.variance_profiles, 1)[:, :, 0].to(
                self.profiles.dtype)  # fmt: skip
            variances = per_segment(index.variance_scales[..., None], clusters)
        else:
            variances = per_segment(index.variances, clusters)
        variances = (encode_variances(variances) if self.variances.dtype == torch.float8_e5m2
                     else variances.to(self.variances.dtype)).contiguous()  # fmt: skip
        _bytes_of(self.variances)[slots] = _bytes_of(variances)
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
