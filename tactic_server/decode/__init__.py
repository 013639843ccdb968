"""The one Tactic decode step of both engines (the embedded engine's runner and SGLang's tactic
backend), in FlashInfer's plan/run shape: `TacticDecoder.plan` once per step decides which rows
select and builds the kernels' inputs, `attend` runs per layer, `finish` adds the step's
statistics on the device, `selection_pays` asks the cost model whether a batch selects or
decodes dense (`cost`); `ClusterSide` is the cluster metadata beside the KV it describes."""

from . import cost
from .clusters import ClusterSide, metadata_bytes_per_token
from .cost import DecodeCostModel
from .decoder import DecodePlan, TacticDecoder

__all__ = ["ClusterSide", "DecodeCostModel", "DecodePlan", "TacticDecoder", "cost",
           "metadata_bytes_per_token"]  # fmt: skip
