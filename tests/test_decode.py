"""The cluster store both engines share (decode.ClusterSide) on CPU tensors: what the torch path
reads back (cluster_index) is exactly the index build_cluster_index makes of the same keys, a
prefix two requests share is clustered once, and freeing a segment's last KV slot forgets it."""

from __future__ import annotations

import dataclasses

import torch

from tactic_server.decode import ClusterSide
from tactic_server.tactic import TacticConfig, build_cluster_index, plan_tactic
from tactic_server.tactic.clustering import query_moments

SEGMENT = 32
CONFIG = TacticConfig(segment_size=SEGMENT, cluster_size=8)
NUM_SLOTS, HEADS, DIM = 600, 2, 16


def store_and_tables(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(NUM_SLOTS, HEADS, DIM, generator=generator)
    side = ClusterSide(NUM_SLOTS, 1, HEADS, DIM, torch.float32, "cpu", CONFIG, max_requests=2)
    order = torch.randperm(NUM_SLOTS, generator=generator)
    req_to_token = torch.zeros(2, 300, dtype=torch.int32)
    req_to_token[0, :200] = order[:200].int()
    req_to_token[1, : 3 * SEGMENT] = order[: 3 * SEGMENT].int()  # shares three segments
    own = 250 - 3 * SEGMENT  # then slots of its own
    req_to_token[1, 3 * SEGMENT : 250] = order[200 : 200 + own].int()
    return side, keys, req_to_token


def test_the_torch_path_reads_back_exactly_the_index_of_the_same_keys():
    side, keys, req_to_token = store_and_tables()
    seq_len = 200  # 6 full segments and a tail of 8
    assert side.cluster_requests([(0, 0, seq_len)], req_to_token, [keys]) == [6]
    assert side.clustered == 6
    got = side.cluster_index(0, side.leading_segments(req_to_token, 0, seq_len + 1), seq_len + 1)
    want = build_cluster_index(keys[req_to_token[0, :seq_len].long()], CONFIG)
    assert got.clustered_len == want.clustered_len == 6 * SEGMENT and got.seq_len == seq_len + 1
    for name in ("cluster_sizes", "cluster_offsets", "token_positions", "token_cluster"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.centroids, want.centroids) and torch.equal(got.variances, want.variances)
    query = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    context = keys[req_to_token[0, : seq_len + 1].long()]
    ours = plan_tactic(query, context, 0.9, got, CONFIG)
    reference = plan_tactic(query, context, 0.9, dataclasses.replace(want, seq_len=seq_len + 1),
                            CONFIG)  # fmt: skip
    assert torch.equal(ours.selected_counts, reference.selected_counts)


def test_a_shared_prefix_is_clustered_once_and_a_freed_slot_forgets_its_segment():
    side, keys, req_to_token = store_and_tables()
    side.cluster_requests([(0, 0, 200)], req_to_token, [keys])
    # the second request's first three segments are the first's: only its own are clustered
    assert side.cluster_requests([(1, 0, 250)], req_to_token, [keys]) == [250 // SEGMENT]
    assert side.clustered == 6 + (250 // SEGMENT - 3)
    # a segment a request reaches later is clustered then; one already clustered is not again
    assert side.cluster_requests([(1, 7, 250)], req_to_token, [keys]) == [7]
    assert side.clustered == 6 + 4
    side.invalidate(req_to_token[0, 3 * SEGMENT - 1 : 3 * SEGMENT].clone())  # segment 2's end
    for request_slot, seq_len in ((0, 201), (1, 251)):
        segments = side.leading_segments(req_to_token, request_slot, seq_len)
        assert side.cluster_index(0, segments, seq_len).clustered_len == 2 * SEGMENT


def test_segments_are_clustered_by_their_requests_prompt_queries():
    """query_weighted: record_queries keeps each request's query_moments (zeroed when its slot
    starts again), and each request's segments are clustered scaled by its own, as
    build_cluster_index does with them."""
    config = dataclasses.replace(CONFIG, query_weighted=True)
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(NUM_SLOTS, HEADS, DIM, generator=generator)
    side = ClusterSide(NUM_SLOTS, 1, HEADS, DIM, torch.float32, "cpu", config, max_requests=2)
    req_to_token = torch.arange(NUM_SLOTS, dtype=torch.int32).view(2, 300)
    queries = torch.randn(40, 2 * HEADS, DIM, generator=generator)
    queries[:25, :, : DIM // 4] *= 8  # the two prompts read different dimensions
    queries[25:, :, DIM // 4 : DIM // 2] *= 8
    slots = torch.tensor([0] * 25 + [1] * 15)
    side.start_request(0, 0.9)
    side.start_request(1, 0.9)
    side.record_queries(0, queries[:10], slots[:10])  # in two chunks
    side.record_queries(0, queries[10:], slots[10:])
    expected = [query_moments(part, HEADS).sum(0) for part in (queries[:25], queries[25:])]
    for request in range(2):
        torch.testing.assert_close(side.query_moments[0, request], expected[request])
    side.cluster_requests([(0, 0, 128), (1, 0, 128)], req_to_token, [keys])
    for request in range(2):
        seq_len = 129
        got = side.cluster_index(0, side.leading_segments(req_to_token, request, seq_len), seq_len)
        context = keys[req_to_token[request, :128].long()]
        want = build_cluster_index(context, config, query_moments=expected[request])
        assert torch.equal(got.token_positions, want.token_positions)
        assert torch.equal(got.centroids, want.centroids)
        unweighted = build_cluster_index(context, CONFIG)
        assert not torch.equal(got.token_positions, unweighted.token_positions)
    side.start_request(0, 0.9)
    assert not side.query_moments[0, 0].any() and side.query_moments[0, 1].any()


def test_clustering_in_bounded_passes_stores_what_one_pass_does(monkeypatch):
    """A batch of long prompts is clustered CLUSTER_CHUNK_ELEMENTS key components a pass (one
    pass over 32 x 128k keys ran out of GPU memory beside SGLang's KV pool): passes of three
    segments, crossing from one request's segments to the next's (each clustered by its own
    prompt queries), store exactly what a single pass stores."""
    from tactic_server.decode import clusters

    config = dataclasses.replace(CONFIG, query_weighted=True)
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(NUM_SLOTS, HEADS, DIM, generator=generator)
    req_to_token = torch.arange(NUM_SLOTS, dtype=torch.int32).view(2, 300)
    queries = torch.randn(40, 2 * HEADS, DIM, generator=generator)
    queries[:20, :, : DIM // 4] *= 8
    slots = torch.tensor([0] * 20 + [1] * 20)
    sides = []
    for elements in (1 << 26, 3 * SEGMENT * HEADS * DIM):
        monkeypatch.setattr(clusters, "CLUSTER_CHUNK_ELEMENTS", elements)
        side = ClusterSide(NUM_SLOTS, 2, HEADS, DIM, torch.float32, "cpu", config,
                           max_requests=2)  # fmt: skip
        for layer in range(2):
            side.record_queries(layer, queries, slots)
        assert side.cluster_requests([(0, 0, 250), (1, 0, 300)], req_to_token,
                                     [keys, keys.flip(0)]) == [7, 9]  # fmt: skip
        sides.append(side)
    one, passes = sides
    assert torch.equal(one.last_slot_segment, passes.last_slot_segment)
    for pool, other in zip(one.pools, passes.pools, strict=True):
        for name in ("centroids", "variances", "cluster_offsets", "member_slots",
                     "token_cluster"):  # fmt: skip
            assert torch.equal(getattr(pool, name), getattr(other, name)), name


def test_profile_variances_are_stored_compact_and_read_back_exactly():
    """variance="profile": the pool keeps a float32 scale per cluster and a float16 profile per
    (segment, KV head), not d values a cluster, and what the torch path reads back is the
    index's variances, their products, exactly."""
    config = dataclasses.replace(CONFIG, variance="profile")
    _, keys, req_to_token = store_and_tables()
    side = ClusterSide(NUM_SLOTS, 1, HEADS, DIM, torch.float32, "cpu", config, max_requests=2)
    side.cluster_requests([(0, 0, 200)], req_to_token, [keys])
    pool = side.pools[0]
    assert pool.variances.shape[-1] == 1 and pool.variances.dtype == torch.float32
    assert pool.profiles.shape[-1] == DIM and pool.profiles.dtype == torch.float16
    got = side.cluster_index(0, side.leading_segments(req_to_token, 0, 201), 201)
    want = build_cluster_index(keys[req_to_token[0, :200].long()], config)
    assert torch.equal(got.variances, want.variances)
    diagonal = ClusterSide(NUM_SLOTS, 1, HEADS, DIM, torch.float32, "cpu", CONFIG, max_requests=2)
    assert side.nbytes < diagonal.nbytes
