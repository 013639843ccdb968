"""Load, fault and abuse scenarios against a running Tactic Server (HTTP only): `loadgen` for
bounded scenarios with latency percentiles, `soak` for long runs watching memory and KV usage."""
