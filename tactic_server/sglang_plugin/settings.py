"""The plugin's settings. SGLang runs the backend in scheduler processes it spawns, so settings
travel as environment variables, which those processes inherit."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from tactic_server.tactic.config import TacticConfig

TARGET_ENV = "TACTIC_DEFAULT_TARGET"
SEGMENT_ENV = "TACTIC_SEGMENT_SIZE"


@dataclass(frozen=True)
class Settings:
    default_target: float = 0.9
    config: TacticConfig = field(default_factory=TacticConfig)

    @classmethod
    def from_env(cls) -> Settings:
        target = float(os.environ.get(TARGET_ENV, "0.9"))
        if not 0.0 < target <= 1.0:
            raise ValueError(f"{TARGET_ENV} must be in (0, 1], got {target}")
        config = TacticConfig()
        if SEGMENT_ENV in os.environ:
            config = dataclasses.replace(config, segment_size=int(os.environ[SEGMENT_ENV]))
        return cls(target, config)

    def export(self) -> None:
        """Into this process's environment, for the processes SGLang spawns from it."""
        os.environ[TARGET_ENV] = repr(self.default_target)
        os.environ[SEGMENT_ENV] = str(self.config.segment_size)


def request_target(custom_params: Mapping | None, default: float) -> float:
    """A request's target from SGLang's custom_params: {"tactic_target": P} or {"tactic":
    {"target": P, "enabled": bool}}; 1.0 means dense. Values were validated by our API; a
    malformed one here falls back to the default."""
    params = custom_params or {}
    nested = params.get("tactic") if isinstance(params.get("tactic"), Mapping) else {}
    if nested.get("enabled") is False:
        return 1.0
    target = nested.get("target", params.get("tactic_target", default))
    try:
        target = float(target)
    except (TypeError, ValueError):
        return default
    return target if 0.0 < target <= 1.0 else default
