"""SGLang plugin (entry point group `sglang.srt.plugins`, SGLang 0.5.12): registers the `tactic`
attention backend and the hooks it needs; nothing of SGLang is patched on disk.

Hooks: ServerArgs turns the piecewise prefill CUDA graph off when `tactic` is chosen; after
SGLang captured its decode CUDA graphs (which serve dense batches), a second set of the Tactic
family is captured, which batches whose every request selects replay, and a runner that chooses
between them takes the place of SGLang's (mixed batches run eagerly); the KV pool gains
Tactic's cluster metadata (and its bytes in the pool's sizing and accounting); freed KV slots
invalidate the segments they ended; the TP worker hands each batch's requests to the backend
and returns per-request statistics through `customized_info`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND = "tactic"


def register() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_attention_backend_choices

    from . import hooks

    register_attention_backend(BACKEND)(hooks.create_backend)
    add_attention_backend_choices([BACKEND])
    HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__",
                          hooks.server_args_before, HookType.BEFORE)  # fmt: skip
    HookRegistry.register(
        "sglang.srt.model_executor.model_runner_kv_cache_mixin.ModelRunnerKVCacheMixin._init_pools",
        hooks.init_pools_around, HookType.AROUND,
    )  # fmt: skip
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        hooks.cell_size_around, HookType.AROUND,
    )  # fmt: skip
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner.init_device_graphs",
                          hooks.init_device_graphs_around, HookType.AROUND)  # fmt: skip
    HookRegistry.register("sglang.srt.mem_cache.allocator.TokenToKVPoolAllocator.free",
                          hooks.free_before, HookType.BEFORE)  # fmt: skip
    HookRegistry.register(
        "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation",
        hooks.forward_batch_generation_around, HookType.AROUND,
    )  # fmt: skip
