"""TacticConfig changed by a "FIELD=VALUE,..." spec (serve --tactic-config, the benchmarks'
variants), and where the kernels refuse what only the torch reference computes."""

import subprocess
import sys

import pytest
from tactic_server.kernels.selection import kernel_unsupported

from tactic_server.tactic.config import TacticConfig, config_from_spec, config_spec


def test_a_spec_changes_the_named_fields_only():
    config = config_from_spec("cluster_size=8, boundary_tokens=true,boundary_band=0.1,"
                              "centroids=kv,segment_size=none")  # fmt: skip
    assert (config.cluster_size, config.boundary_tokens, config.boundary_band) == (8, True, 0.1)
    assert (config.centroids, config.segment_size) == ("kv", None)
    default = TacticConfig()
    assert config.sink_tokens == default.sink_tokens
    assert config_from_spec("exact_tokens=0", base=config).exact_tokens is False
    assert config_from_spec("exact_tokens=0", base=config).cluster_size == 8


@pytest.mark.parametrize(
    "spec,message",
    [
        ("clusters=8", "not FIELD=VALUE of a TacticConfig field"),
        ("cluster_size", "not FIELD=VALUE"),
        ("cluster_size=eight", "cluster_size wants a int"),
        ("boundary_tokens=maybe", "boundary_tokens wants true or false"),
        ("cluster_size=0", "cluster_size must be >= 1"),  # the config's own validation
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        config_from_spec(spec)


def test_the_kernels_name_what_they_do_not_compute():
    assert kernel_unsupported(TacticConfig()) == []
    assert kernel_unsupported(config_from_spec("cluster_size=8,centroids=kv")) == []
    # the boundary band they compute, not beside an exact top
    assert kernel_unsupported(config_from_spec("cluster_size=8,boundary_tokens=true,"
                                               "boundary_band=0.1")) == []  # fmt: skip
    assert kernel_unsupported(config_from_spec("boundary_tokens=true,estimator=inverse_fit,"
                                               "exact_fraction=0.1")) == [
        "estimator", "boundary_tokens with exact_fraction"]  # fmt: skip


@pytest.mark.parametrize("spec", ["", "cluster_size=8,boundary_tokens=true,boundary_band=0.1",
                                  "segment_size=none,centroids=kv,sink_tokens=0",
                                  "exact_fraction=0.02,density_bin_width=0.125,query_weighted=1"])
def test_config_spec_round_trips(spec):
    config = config_from_spec(spec)
    assert config_from_spec(config_spec(config)) == config
    assert (config_spec(config) == "") == (config == TacticConfig())


def test_serve_refuses_a_bad_tactic_config_before_loading_anything():
    result = subprocess.run(
        [sys.executable, "-m", "tactic_server.cli", "serve", "--tactic-config", "clusters=8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--tactic-config: 'clusters=8' is not FIELD=VALUE" in result.stderr
