"""The one Tactic decode step of both engines (the embedded engine's runner and SGLang's tactic
backend), in FlashInfer's plan/run shape: `TacticDecoder.plan` once per step decides which rows
select and builds the kernels' inputs, `attend` runs per layer, `finish` adds the step's
statistics on the device; `ClusterSide` is the cluster metadata beside the KV it describes."""

from .clusters import ClusterSide, metadata_bytes_per_token
from .decoder import DecodePlan, TacticDecoder

__all__ = ["ClusterSide", "DecodePlan", "TacticDecoder", "metadata_bytes_per_token"]
