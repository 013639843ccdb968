"""Device selection (score, exact top, walk, CSR rows) against the torch reference plan_tactic,
for a batch of requests of different lengths and targets in SGLang's pool layout."""

import pytest
import torch
from tactic_server.kernels.cluster_pool import ClusterPool, centroid_dtype
from tactic_server.kernels.selection import select_rows

from tactic_server.tactic import TacticConfig, build_cluster_index, plan_tactic
from tactic_server.tactic.clustering import stored_variance_dims
from tactic_server.tactic.workloads import generate_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(lengths, kinds, config, num_kv_heads=2, group=4, head_dim=32, dtype=torch.float32):
    """Contexts scattered over a shared KV cache, their cluster metadata in a pool, and the
    reference plans' inputs."""
    generator = torch.Generator().manual_seed(sum(lengths))
    num_slots = sum(lengths) + 37
    slot_order = torch.randperm(num_slots, generator=generator)
    max_reqs, max_context = len(lengths) + 2, max(lengths) + 5
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype)
    req_to_token = torch.zeros(max_reqs, max_context, dtype=torch.int32)
    segment_size = config.segment_size
    pool = ClusterPool.allocate(
        num_segment_slots=64, num_kv_heads=num_kv_heads, head_dim=head_dim,
        segment_size=segment_size, clusters_per_segment=segment_size // config.cluster_size,
        dtype=dtype, device="cpu", variance_dims=stored_variance_dims(config, head_dim)[0],
        profile_dims=stored_variance_dims(config, head_dim)[1],
        centroids_dtype=centroid_dtype(config, dtype, "cpu"),
    )  # fmt: skip
    # requests sit in pool slots in reverse order, segments in shuffled slots
    pool_indices = torch.arange(len(lengths)).flip(0) + 1
    segment_slots = torch.randperm(64, generator=generator)
    req_to_segment = torch.zeros(max_reqs, max_context // segment_size + 1, dtype=torch.int32)
    queries, references, used_slots, used_segments = [], [], 0, 0
    for request, (length, kind) in enumerate(zip(lengths, kinds, strict=True)):
        workload = generate_workload(kind, length, num_kv_heads * group, num_kv_heads, head_dim,
                                     seed=request)  # fmt: skip
        slots = slot_order[used_slots : used_slots + length]
        used_slots += length
        k_cache[slots] = workload.keys.to(dtype)
        keys = k_cache[slots]  # what the kernels see, in the cache dtype
        req_to_token[pool_indices[request], :length] = slots.int()
        index = build_cluster_index(keys, config)
        num_segments = length // segment_size
        mine = segment_slots[used_segments : used_segments + num_segments]
        pool.write_segments(index, slots, mine)
        req_to_segment[pool_indices[request], :num_segments] = mine.int()
        used_segments += num_segments
        # the reference sees the centroids and variances as the pool stores them (fp8
        # centroids: build_cluster_index rounded them so already)
        assert torch.equal(pool.stored_centroids(mine).transpose(0, 1).flatten(1, 2),
                           index.centroids.to(dtype).float())  # fmt: skip
        variances = index.variances  # diagonal: on the pool's float8 e5m2 grid
        if pool.variances.dtype != torch.float8_e5m2:
            variances = variances.to(pool.variances.dtype).float()
        index = type(index)(**{**index.__dict__, "centroids": index.centroids.to(dtype).float(),
                               "variances": variances})  # fmt: skip
        query = workload.query.to(dtype)
        queries.append(query)
        references.append((query, keys, index, slots))
    return (k_cache, req_to_token, pool, req_to_segment, pool_indices, torch.stack(queries),
            references)


def to_device(pool):
    return ClusterPool(**{name: value.to(DEVICE) if torch.is_tensor(value) else value
                          for name, value in pool.__dict__.items()})  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        TacticConfig(segment_size=64),  # no exact top (the default)
        TacticConfig(segment_size=64, tail_policy="attend", sink_tokens=3, recent_window=5,
                     exact_fraction=0.01),  # fmt: skip
        TacticConfig(segment_size=32, exact_fraction=0.1, outlier_share=0.0),
        TacticConfig(segment_size=64, variance="isotropic", exact_fraction=0.01),
        TacticConfig(segment_size=64, exact_fraction=0.0, density_bin_width=0.25,
                     density_bins=256),
        TacticConfig(segment_size=64, centroids="fp8"),
        # "profile" variances: 4 clusters a segment, a profile per cluster read (PROFILE 1);
        # 16 a segment, as many as a scoring block, one profile a block (PROFILE 2)
        TacticConfig(segment_size=64, variance="profile"),
        TacticConfig(segment_size=64, cluster_size=4, variance="profile"),
    ],
)
@pytest.mark.parametrize(
    "options", [{}, {"real_rows": False}, {"light_warps": 1}, {"score_stream": True}]
)
def test_selection_matches_reference(config, options):
    # a context shorter than a segment, one of exactly one segment, and ones with tails;
    # the kernels' arithmetic on the group's rows (the default) and on the dots' 16; the
    # unit-parallel kernels in one warp a program; the scoring kernel's loads with L2 hints
    check_against_reference(config, score_units_per_program=16, units_per_program=32,
                            exact_units_per_program=4, **options)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        TacticConfig(segment_size=64, cluster_size=4),
        TacticConfig(segment_size=128, cluster_size=4, tail_policy="attend", sink_tokens=3,
                     recent_window=5, centroids="fp8"),  # fmt: skip
        TacticConfig(segment_size=64, cluster_size=4, variance="isotropic", exact_fraction=0.1),
    ],
)
def test_blocks_within_one_segment_match_reference(config):
    """Scoring blocks that hold one segment's clusters (16 or 32 clusters a segment, 16 units a
    block: the scoring kernel reads one segment slot a block, as at the default 64 clusters a
    segment and 64 units a block), the tail starting at a block boundary."""
    check_against_reference(config, score_units_per_program=16, units_per_program=32,
                            exact_units_per_program=4)  # fmt: skip


@pytest.mark.parametrize("group,exact_units", [(1, 4), (2, 2), (4, 4), (8, 4)])
@pytest.mark.parametrize("variance", ["diagonal", "isotropic", "profile"])
@pytest.mark.parametrize("real_rows", [False, True])
def test_groups_match_reference(group, exact_units, variance, real_rows):
    """Query heads per KV head from 1 to 8 (the kernels pad a group to their 16-row dot tiles;
    real_rows: scoring's and exact scoring's arithmetic after their dots on the group's rows
    alone), 64 units a
    scoring program, exact scoring on (a tenth of the context) in steps of 2 or 4 clusters,
    the tail attended, sinks and a recent window."""
    config = TacticConfig(segment_size=64, tail_policy="attend", sink_tokens=3, recent_window=5,
                          variance=variance, exact_fraction=0.1)  # fmt: skip
    check_against_reference(config, group=group, score_units_per_program=64,
                            units_per_program=32, exact_units_per_program=exact_units,
                            real_rows=real_rows)  # fmt: skip


@pytest.mark.parametrize("exact_units,exact_members", [(8, 16), (4, 4)])
def test_exact_scoring_steps_match_reference(exact_units, exact_members):
    """Exact scoring in [clusters, members] steps (segments of 64 in 4 clusters of about 16
    members: 16 or 4 members a step take a cluster one step or several) and 8 warps a scoring
    program: the same rows as the reference."""
    config = TacticConfig(segment_size=64, exact_fraction=0.2)
    check_against_reference(config, units_per_program=32, exact_units_per_program=exact_units,
                            exact_members_per_step=exact_members, score_warps=8)  # fmt: skip


@pytest.mark.parametrize("write_units,write_members", [(16, 16), (4, 32), (1, 1)])
def test_row_writing_steps_match_reference(write_units, write_members):
    """The write kernel walks each block's picked units in [units, members] steps: any step
    shape writes the same rows (a single unit and member per step included)."""
    config = TacticConfig(segment_size=64, exact_fraction=0.1)
    check_against_reference(config, units_per_program=32, write_units_per_step=write_units,
                            write_members_per_step=write_members)  # fmt: skip


@pytest.mark.parametrize("config", [TacticConfig(segment_size=64),
                                    TacticConfig(segment_size=64, exact_fraction=0.01)])
def test_dependent_launches_match_reference(config):
    """pdl=True: each kernel launched dependently on a CUDA GPU (it may start while the one
    before it finishes, and waits for its results before reading anything): the same selection,
    with and without the exact top's three launches (off CUDA the option is ignored)."""
    check_against_reference(config, score_units_per_program=16, units_per_program=32,
                            exact_units_per_program=4, pdl=True)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        # the stopping bin's clusters alone, then bands of 0.1 and 0.5 nats (2 and 10 bins)
        TacticConfig(segment_size=64, cluster_size=8, boundary_tokens=True),
        TacticConfig(segment_size=64, cluster_size=8, boundary_tokens=True, boundary_band=0.1,
                     centroids="fp8"),  # fmt: skip
        TacticConfig(segment_size=64, boundary_tokens=True, boundary_band=0.5),
        TacticConfig(segment_size=32, cluster_size=4, boundary_tokens=True, boundary_band=0.25,
                     tail_policy="attend", sink_tokens=3, recent_window=5),  # fmt: skip
        # large clusters, which the band makes worth their fewer units (README, 32-token)
        TacticConfig(segment_size=128, cluster_size=32, boundary_tokens=True,
                     boundary_band=0.25),  # fmt: skip
    ],
)
@pytest.mark.parametrize("group", [1, 4])
def test_boundary_band_matches_reference(config, group):
    """The boundary band (boundary_tokens, boundary_band): the clusters near each query head's
    stopping bin scored token by token and walked again, partly taken clusters written member
    by member; the same tokens, query head counts and estimated masses as the reference, with
    members of 8 clusters scored in steps of 4 so that a cluster takes several."""
    check_against_reference(config, group=group, score_units_per_program=16,
                            units_per_program=32, exact_units_per_program=8,
                            exact_members_per_step=4)  # fmt: skip


def assert_rows_match_reference(selected, references, targets, config, num_kv_heads=2):
    """Each (request, KV head) CSR row of select_rows holds exactly the KV rows of the reference
    plan's positions (make_batch's references, the requests' targets in order); returns the
    plans."""
    indptr, indices = selected.indptr.cpu(), selected.indices.cpu()
    plans = []
    for request, (query, keys, index, slots) in enumerate(references):
        plan = plan_tactic(query, keys, float(targets[request]), index, config)
        for head, positions in enumerate(plan.indices):
            row = request * num_kv_heads + head
            got = indices[indptr[row] : indptr[row + 1]].long()
            expected = slots[positions].long() * num_kv_heads + head
            assert torch.equal(got.sort().values, expected.sort().values), (request, head)
        plans.append(plan)
    return plans


def check_against_reference(config, group=4, **launch):
    """select_rows over five requests (shorter than a segment, exactly one, with tails; five
    workloads and targets) gives each (request, KV head) the reference plan's tokens, query head
    counts and estimated masses."""
    lengths = [300, 64, 5, 257, 1]
    kinds = ["topics", "needles", "flat", "recency_sink", "topics"]
    batch = make_batch(lengths, kinds, config, group=group)
    k_cache, req_to_token, pool, req_to_segment, pool_indices, q, references = batch
    targets = torch.zeros(len(lengths) + 2)
    targets[pool_indices] = torch.tensor([0.9, 0.5, 0.99, 0.75, 1.0])
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    selected = select_rows(
        q.to(DEVICE), k_cache.to(DEVICE), to_device(pool), req_to_segment.to(DEVICE),
        req_to_token.to(DEVICE),
        pool_indices.to(DEVICE), seq_lens.to(DEVICE), targets.to(DEVICE),
        max_seq_len=300, config=config, **launch,
    )  # fmt: skip
    plans = assert_rows_match_reference(selected, references, targets[pool_indices].tolist(),
                                        config)  # fmt: skip
    for request, plan in enumerate(plans):
        assert torch.equal(selected.query_head_counts[request].cpu().long(), plan.query_head_counts)
        torch.testing.assert_close(selected.estimated_mass[request].cpu(), plan.estimated_mass)


@pytest.mark.parametrize("recent_window,sink_tokens", [(40, 3), (5, 40), (0, 0)])
def test_always_attended_positions_across_segments(recent_window, sink_tokens):
    """Sinks and recent windows that span several segments (and the tail), with programs of 16
    units over segments of 4 clusters: the programs holding those segments look their clusters
    up, the others only test tail positions, and the selection is the reference's."""
    config = TacticConfig(segment_size=32, cluster_size=8, recent_window=recent_window,
                          sink_tokens=sink_tokens, exact_fraction=0.1)  # fmt: skip
    lengths = [400, 96, 70, 33]
    k_cache, req_to_token, pool, req_to_segment, pool_indices, q, references = make_batch(
        lengths, ["topics", "needles", "recency_sink", "flat"], config)  # fmt: skip
    targets = torch.full((len(lengths) + 2,), 0.5)
    selected = select_rows(
        q.to(DEVICE), k_cache.to(DEVICE), to_device(pool), req_to_segment.to(DEVICE),
        req_to_token.to(DEVICE), pool_indices.to(DEVICE),
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE), targets.to(DEVICE),
        max_seq_len=400, config=config, score_units_per_program=16, units_per_program=16,
    )  # fmt: skip
    plans = assert_rows_match_reference(selected, references, [0.5] * len(lengths), config)
    for length, plan in zip(lengths, plans, strict=True):
        always = torch.arange(length)
        always = always[(always < sink_tokens) | (always >= length - recent_window)]
        for positions in plan.indices:
            assert torch.isin(always, positions).all()  # the reference forces them too


@pytest.mark.parametrize("head_dim,variance,centroids,options", [
    (32, "diagonal", "kv", {}), (256, "diagonal", "kv", {}), (256, "isotropic", "kv", {}),
    (256, "diagonal", "fp8", {}), (128, "diagonal", "fp8", {"real_rows": False}),
    (128, "profile", "fp8", {})])  # fmt: skip
def test_selection_on_bfloat16_cache(head_dim, variance, centroids, options):
    """bf16 caches, at Gemma 3's head_dim of 256 too (its centroid and variance tiles are the
    widest the scoring kernel loads), with centroids in the cache dtype or in float8."""
    config = TacticConfig(segment_size=64, variance=variance, centroids=centroids)
    k_cache, req_to_token, pool, req_to_segment, pool_indices, q, references = make_batch(
        [200, 130], ["needles", "topics"], config, head_dim=head_dim, dtype=torch.bfloat16
    )
    targets = torch.full((4,), 0.9)
    selected = select_rows(
        q.to(DEVICE), k_cache.to(DEVICE), to_device(pool), req_to_segment.to(DEVICE),
        req_to_token.to(DEVICE),
        pool_indices.to(DEVICE), torch.tensor([200, 130], dtype=torch.int32, device=DEVICE),
        targets.to(DEVICE), max_seq_len=200, config=config, score_units_per_program=16,
        units_per_program=32, **options,
    )  # fmt: skip
    assert_rows_match_reference(selected, references, [0.9, 0.9], config)


@pytest.mark.parametrize("change", [dict(estimator="inverse_fit"), dict(exact_tokens=True),
                                    dict(boundary_tokens=True, exact_fraction=0.1)])  # fmt: skip
def test_reference_only_options_are_refused(change):
    """Options only the torch reference plans are refused, not silently ignored."""
    config = TacticConfig(segment_size=64)
    k_cache, req_to_token, pool, req_to_segment, pool_indices, q, _ = make_batch(
        [70], ["topics"], config)  # fmt: skip
    with pytest.raises(ValueError, match=next(iter(change))):
        select_rows(q, k_cache, pool, req_to_segment, req_to_token, pool_indices,
                    torch.tensor([70]), torch.ones(3), 70,
                    TacticConfig(segment_size=64, **change))  # fmt: skip


def test_segment_size_must_match_pool():
    config = TacticConfig(segment_size=64)
    k_cache, req_to_token, pool, req_to_segment, pool_indices, q, _ = make_batch(
        [70], ["topics"], config)  # fmt: skip
    with pytest.raises(ValueError, match="segment_size"):
        select_rows(q, k_cache, pool, req_to_segment, req_to_token, pool_indices,
                    torch.tensor([70]), torch.ones(3), 70,
                    TacticConfig(segment_size=128))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variance,centroids,share", [
    ("isotropic", "kv", 0.05), ("diagonal", "kv", 0.065), ("diagonal", "fp8", 0.048),
    ("profile", "fp8", 0.033)])  # fmt: skip
def test_cluster_pool_bytes_are_counted(dtype, variance, centroids, share):
    """bytes_per_segment_slot (what a KV pool sizes with before allocating) equals what the
    allocation holds; at the default shape it stays under 5% of the KV it describes with one
    variance per cluster (4.8%), under 6.5% with d of them in 8-bit codes (6.3%; in bf16 it
    would be 7.9%), under 4.8% with those and float8 centroids (4.7%), under 3.3% with float8
    centroids and "profile" variances (a scale per cluster, a float16 profile per segment:
    3.27%)."""
    config = TacticConfig(variance=variance, centroids=centroids)
    clusters = config.segment_size // config.cluster_size
    dims, profile_dims = stored_variance_dims(config, 128)
    stored_as = centroid_dtype(config, dtype, "cpu")
    pool = ClusterPool.allocate(
        num_segment_slots=3, num_kv_heads=8, head_dim=128,
        segment_size=config.segment_size, clusters_per_segment=clusters, dtype=dtype,
        device="cpu", variance_dims=dims, centroids_dtype=stored_as, profile_dims=profile_dims,
    )  # fmt: skip
    assert pool.centroids.dtype == (torch.float8_e4m3fn if centroids == "fp8" else dtype)
    per_slot = ClusterPool.bytes_per_segment_slot(8, 128, config.segment_size, clusters, dtype,
                                                  dims, stored_as, profile_dims)  # fmt: skip
    assert pool.segment_bytes == 3 * per_slot
    if dtype == torch.bfloat16:
        kv_bytes = 2 * config.segment_size * 8 * 128 * 2
        assert per_slot / kv_bytes < share


def test_fp8_centroids_are_clamped_onto_the_float8_grid():
    """Centroids of a config with centroids="fp8" lie on the float8 e4m3 grid, clamped into its
    range (the cast alone would give NaN past 448); a pool stores and reads back exactly those."""
    config = TacticConfig(segment_size=32, cluster_size=8, centroids="fp8", outlier_share=0.0)
    keys = torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(0))
    keys[:8, 0, 0] = 3000.0  # one cluster's mean far beyond e4m3's range in one dimension
    keys[8:16, 0, 1] = 0.3  # a value e4m3 rounds (to 0.3125)
    index = build_cluster_index(keys, config)
    assert torch.isfinite(index.centroids).all()
    assert index.centroids.abs().max() == 448.0
    on_grid = index.centroids.to(torch.float8_e4m3fn).float()
    assert torch.equal(index.centroids, on_grid)
    plain = build_cluster_index(keys, TacticConfig(segment_size=32, cluster_size=8,
                                                   outlier_share=0.0, centroids="kv"))  # fmt: skip
    assert not torch.equal(index.centroids, plain.centroids)
    assert torch.equal(index.cluster_sizes, plain.cluster_sizes)
    pool = ClusterPool.allocate(
        num_segment_slots=3, num_kv_heads=1, head_dim=16, segment_size=32,
        clusters_per_segment=4, dtype=torch.bfloat16, device="cpu", variance_dims=16,
        centroids_dtype=centroid_dtype(config, torch.bfloat16, "cpu"),
    )  # fmt: skip
    pool.write_segments(index, torch.arange(64), torch.tensor([2, 0]))
    stored = pool.stored_centroids(torch.tensor([2, 0]))  # [segments, H_kv, C, d]
    assert torch.equal(stored[:, 0].reshape(8, 16), index.centroids[0])
