"""Configuration of the Tactic algorithm: one dataclass, validated once, trusted inside."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

# The synthetic workloads (tactic.workloads) and the target masses that the evaluation runs by
# default: kept here, beside the configuration, so that the CLI lists them without importing torch.
WORKLOAD_KINDS = ("topics", "needles", "needles_isotropic", "recency_sink", "flat",
                  "anisotropic_topics", "mixed_topics")
TARGETS = (0.5, 0.75, 0.9, 0.95, 0.99)



def selects(target_mass: float) -> bool:
    """The one rule both engines decide dense attention by: a target mass below 1 selects;
    1 (all of the mass) attends to every token."""
    return target_mass < 1.0


Estimator = Literal["lognormal", "inverse_fit"]
VarianceModel = Literal["diagonal", "isotropic", "profile"]
TailPolicy = Literal["score", "attend"]
CentroidFormat = Literal["kv", "fp8"]


@dataclass(frozen=True)
class TacticConfig:
    """How keys are clustered and how a query's selection is estimated.

    segment_size: positions per clustering segment, aligned to position 0; None clusters the
        whole context at once (the paper's variant, quadratic in context length).
    cluster_size: average tokens per cluster, so a segment of S tokens has ceil(S / cluster_size)
        clusters (singleton outlier clusters included).
    kmeans_iterations: Lloyd iterations of spherical k-means (deterministic strided start).
    query_weighted: k-means groups keys scaled per dimension by the root mean square of the
        queries that read them (clustering.query_weights, from the request's prompt queries):
        a cluster is then a group of keys whose scores agree for those queries, not of keys
        close in every direction alike (queries point along few of a key's dimensions), so
        fewer whole clusters carry the same mass. Off by default: on Gemma 3 it read fewer
        tokens at the same P (overshoot over the oracle 1.47x -> 1.36x at 4k, 1.55x -> 1.42x
        at 8k on captured attention, (head, step) meeting P - 0.01 >= 99%;
        benchmarks/estimator_study.py) but lost RULER prompts at 8k that the unweighted
        clusters answer as dense does (README, "Query-weighted clustering"). Without those
        queries (no moments given, or none seen yet) keys cluster unscaled, as with False.
    outlier_share: share of a segment's clusters given to the tokens their k-means centroid
        explains worst (largest residual norm); each becomes a singleton cluster, so needles and
        massive-activation keys are scored exactly instead of hiding inside a mean.
    estimator: "lognormal" estimates a cluster's mass as n * exp(q.mu/sqrt(d) + s^2/2), s^2 the
        variance of the cluster's scores under the variance model, the correction capped at the
        expected largest of n normal scores;
        "inverse_fit" is the paper's y = a/x + b fitted on two sampled stretches of the
        centroid-ordered token list.
    variance: what each cluster keeps of its keys' spread for the log-normal estimate.
        "diagonal": the variance of every dimension, s^2 = sum_i q_i^2 var_i / d (d values per
        cluster, as many as its centroid, kept as float8 e5m2 values:
        clustering.encode_variances). "isotropic": their mean, s^2 = |q|^2 var / d (one
        value). Real keys are anisotropic and queries point along their quiet dimensions:
        on Gemma 3's global layers the isotropic s^2 is 2-3x the true score variance and the
        estimate several nats too high (benchmarks/estimator_study.py). "profile": the
        per-dimension variances in rank-one form, per (segment, KV head) a profile over the
        dimensions (the clusters' mean variance of each) times a scale per cluster (its mean
        variance over the profile's mean): on Gemma 3's captures the same estimate as
        "diagonal" (benchmarks/results/estimator_study_variance_profile.md), and what a pool
        could keep in one value a cluster plus one profile a segment; stored today as
        "diagonal" stores its d values (the compact form is not built yet).
    centroids: how centroids are stored for scoring. "kv": in the KV cache's dtype. "fp8": as
        float8 e4m3 (clamped to +-448; 3 mantissa bits), half of a bf16 centroid's bytes,
        which is most of what scoring reads; on Gemma 3's captured attention and the synthetic
        workloads the share of heads meeting P and the overshoot do not move
        (benchmarks/estimator_study.py), and on the H100 selection takes 3-5% less time at
        128k (benchmarks/results/decode_attention_4e03bc2_h100.log, variant lines): the default.
        CUDA devices below compute capability 8.9 have no fp8 conversion and keep "kv" (with a
        warning).
    exact_fraction: most of the context, taken in whole density bins from the top of the
        estimated order, whose scores are computed exactly (the paper scores its top 1-2%; 1%
        met P on as many synthetic heads as 2% for half the exact reads). 0, the default since
        2026-12-07: the exact top moved the share of (head, step) meeting P - 0.01 by under a
        point (Gemma 3 captures 99.7-100% with it, 99.7% without; synthetic 99.6% / 98.9%) and
        the tokens read not at all, and costs three launches: selection without it takes a
        third less on the H200 at 128k (0.036 / 0.204 ms against 0.053 / 0.282 at batch 1 / 16;
        benchmarks/results/estimator_study_exact_fraction_*,
        decode_attention_exact_programs_53cba0b_h200.json).
    tail_policy: positions after the last full segment are not clustered; "score" scores them
        exactly and selects them token by token like singleton clusters, "attend" always
        attends all of them.
    exact_tokens: the exactly scored clusters enter the walk token by token (their tokens'
        exact scores are known): only their tokens above the walk's threshold are taken.
    boundary_tokens: the whole clusters of the bin where the walk stops are scored exactly and
        taken token by token, and the walk is done again.
    boundary_band: with boundary_tokens, also the clusters whose density lies within this
        many nats of that bin, on either side (0: that bin alone). Their keys are read to score
        them, which is what a wider band costs.
    recent_window: most recent positions that are always attended, each on its own: a segment
        the window reaches into is left to the tail (scored token by token) until the window
        has passed it, so no recent position forces a whole cluster.
    sink_tokens: first positions that are always attended (attention sinks). One by default:
        Gemma 3's first token holds 15-21% of some heads' mass on its layer 5 and sits in a
        cluster the walk leaves; forcing it took that layer's (query head, step) meeting P from
        84% to 99% for one token a KV head (benchmarks/estimator_study.py, 4k captures).
    sample_fraction: width of each sampled stretch of the inverse fit, as a share of the list.
    density_bins, density_bin_width: units are ranked by their log mass per token (density) in
        bins of this width (nats), centred on 0 (2048 bins of 1/16 cover -64..64; densities
        outside fall into the end bins). Selection takes whole bins: the exact top and the walk
        each find their threshold in one pass over a histogram instead of sorting the units,
        which is what lets the device do it in a few bandwidth-bound launches. A bin is a mass
        step of at most exp(width) = 6.5%; the last bin a walk takes is its overshoot.
    """

    segment_size: int | None = 1024
    cluster_size: int = 16
    kmeans_iterations: int = 10
    query_weighted: bool = False
    outlier_share: float = 0.25
    estimator: Estimator = "lognormal"
    variance: VarianceModel = "diagonal"
    centroids: CentroidFormat = "fp8"
    exact_fraction: float = 0.0
    tail_policy: TailPolicy = "score"
    exact_tokens: bool = False
    boundary_tokens: bool = False
    boundary_band: float = 0.0
    recent_window: int = 16
    sink_tokens: int = 1
    sample_fraction: float = 0.01
    density_bins: int = 2048
    density_bin_width: float = 0.0625

    def __post_init__(self) -> None:
        if self.segment_size is not None and self.segment_size < self.cluster_size:
            raise ValueError(
                f"segment_size must be None or >= cluster_size ({self.cluster_size}), "
                f"got {self.segment_size}"
            )
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        if self.kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be >= 0, got {self.kmeans_iterations}")
        if not 0.0 <= self.outlier_share < 1.0:
            raise ValueError(f"outlier_share must be in [0, 1), got {self.outlier_share}")
        if self.estimator not in ("lognormal", "inverse_fit"):
            raise ValueError(
                f"estimator must be 'lognormal' or 'inverse_fit', got {self.estimator!r}"
            )
        if self.variance not in ("diagonal", "isotropic", "profile"):
            raise ValueError(
                f"variance must be 'diagonal', 'isotropic' or 'profile', got {self.variance!r}"
            )
        if self.centroids not in ("kv", "fp8"):
            raise ValueError(f"centroids must be 'kv' or 'fp8', got {self.centroids!r}")
        if not 0.0 <= self.exact_fraction <= 1.0:
            raise ValueError(f"exact_fraction must be in [0, 1], got {self.exact_fraction}")
        if self.tail_policy not in ("score", "attend"):
            raise ValueError(f"tail_policy must be 'score' or 'attend', got {self.tail_policy!r}")
        if not self.boundary_band >= 0.0:
            raise ValueError(f"boundary_band must be >= 0, got {self.boundary_band}")
        if self.recent_window < 0 or self.sink_tokens < 0:
            raise ValueError("recent_window and sink_tokens must be >= 0")
        if not 0.0 < self.sample_fraction <= 0.5:
            raise ValueError(f"sample_fraction must be in (0, 0.5], got {self.sample_fraction}")
        if self.density_bins < 2 or self.density_bins & (self.density_bins - 1):
            raise ValueError(f"density_bins must be a power of two >= 2, got {self.density_bins}")
        if not self.density_bin_width > 0:
            raise ValueError(f"density_bin_width must be > 0, got {self.density_bin_width}")

    @property
    def lowest_density(self) -> float:
        """Lower edge of the first density bin (the bins are centred on 0)."""
        return -self.density_bins * self.density_bin_width / 2


def config_from_spec(spec: str, base: TacticConfig | None = None) -> TacticConfig:
    """base (default TacticConfig()) with fields changed by "FIELD=VALUE,FIELD=VALUE", e.g.
    "cluster_size=8,boundary_tokens=true,boundary_band=0.1" ("" changes nothing); booleans take
    true/false/1/0/yes/no.
    Raises ValueError naming the bad item and the fields there are (and the config's own
    validation errors)."""
    base = base or TacticConfig()
    fields = {item.name: item for item in dataclasses.fields(TacticConfig)}
    changes: dict = {}
    for item in filter(str.strip, spec.split(",")):
        name, _, value = item.strip().partition("=")
        if name not in fields or not value:
            raise ValueError(f"{item.strip()!r} is not FIELD=VALUE of a TacticConfig field "
                             f"({', '.join(fields)})")  # fmt: skip
        kind = type(getattr(TacticConfig(), name))  # segment_size's default is an int
        if value.lower() == "none":
            changes[name] = None  # segment_size=none: whole-context clustering
        elif kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{name} wants true or false, got {value!r}")
            changes[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                changes[name] = kind(value)
            except ValueError:
                raise ValueError(f"{name} wants a {kind.__name__}, got {value!r}") from None
    return dataclasses.replace(base, **changes)


def config_spec(config: TacticConfig) -> str:
    """The fields of config that differ from TacticConfig()'s, as config_from_spec reads them
    ("" for the defaults): config_from_spec(config_spec(c)) == c."""
    default = TacticConfig()
    items = []
    for item in dataclasses.fields(TacticConfig):
        value = getattr(config, item.name)
        if value != getattr(default, item.name):
            text = "none" if value is None else str(value).lower() if isinstance(value, bool) \
                else repr(value) if isinstance(value, float) else str(value)
            items.append(f"{item.name}={text}")
    return ",".join(items)


WHOLE_CONTEXT = TacticConfig(segment_size=None)
"""The paper's variant: one k-means over the whole context."""
