"""`serve --engine sglang`: sglang.Engine in this process behind the engine contract the embedded
engine keeps too (engine.types.InferenceEngine), so the front end's routes, errors and metrics are
the same.

Tokenisation, chat templates, stop strings and detokenisation stay ours (SGLang runs with
skip_tokenizer_init and gets token ids); Tactic's per-request target travels in custom_params and
its statistics come back in meta_info["tactic"] (running sums from the tactic backend). Penalties
and logit_bias are SGLang's own sampling parameters; logprobs come back in meta_info, taken
before temperature (SGLANG_RETURN_ORIGINAL_LOGPROB) but, as SGLang applies them to the logits
first, after penalties and logit_bias."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from tactic_server.decode.clusters import DENSE_LAYER_STEPS, STATS
from tactic_server.engine.config import EngineConfig
from tactic_server.engine.model_config import ModelConfig
from tactic_server.engine.tokenizer import TextStream, Tokenizer
from tactic_server.engine.types import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TacticParams,
    TacticUsage,
    TokenLogprob,
    check_prompt,
)

logger = logging.getLogger(__name__)


def model_override_args(model_dir) -> dict:
    """sglang.Engine arguments a checkpoint needs to load in SGLang 0.5.12 ({} for most).
    Gemma 3 there always builds its global layers' RoPE as "linear" with
    rope_parameters["full_attention"]["factor"], which checkpoints without scaling lack (Gemma 3
    270M: KeyError 'factor' while the model is built, H100 2026-12-07): their factor is 1.0,
    which is plain RoPE. ValueError for a Gemma 3 whose output layer is not its embedding
    (tie_word_embeddings false): SGLang's Gemma 3 skips lm_head.weight and computes logits
    with the embedding, so it would serve other tokens than the checkpoint's (H100 2026-12-07,
    a tiny untied model: other tokens from the first on); Gemma 3 270M ties them."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") not in ("gemma3", "gemma3_text"):
        return {}
    if not config.get("tie_word_embeddings", True):
        raise ValueError(
            f"{model_dir}: a Gemma 3 checkpoint with its own output layer (tie_word_embeddings "
            "false); SGLang's Gemma 3 ignores lm_head.weight and would answer with the "
            "embedding's logits instead: serve it with the embedded engine (--engine embedded)"
        )
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    full = rope.get("full_attention")
    if not isinstance(full, dict) or "factor" in full:
        return {}
    override = {"rope_parameters": {**rope, "full_attention": {**full, "factor": 1.0}}}
    return {"json_model_override_args": json.dumps(override)}


def tactic_usage(meta_info: dict) -> TacticUsage | None:
    """Means from the backend's running sums (the last per-token entry carries them all)."""
    entries = meta_info.get("tactic") or []
    if not entries:
        return None
    sums = [float(x) for x in list(entries[-1])]
    if len(sums) != STATS or sums[3] <= 0:
        return None
    return TacticUsage(sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3], int(sums[3]),
                       int(sums[4]), round(sums[DENSE_LAYER_STEPS]))  # fmt: skip


def sglang_sampling_params(
    sampling: SamplingParams, tactic: TacticParams, max_new_tokens: int, eos_token_ids
) -> dict:
    """The keyword arguments of SGLang's SamplingParams for one request."""
    params = dict(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if sampling.greedy else sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1, ignore_eos=sampling.ignore_eos,
        stop_token_ids=list(eos_token_ids),
        frequency_penalty=sampling.frequency_penalty, presence_penalty=sampling.presence_penalty,
        custom_params={"tactic": {"enabled": tactic.enabled, "target": tactic.target}},
    )  # fmt: skip
    if sampling.logit_bias:
        params["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    return params


def token_logprobs(meta_info: dict, start: int, end: int) -> tuple[TokenLogprob, ...]:
    """Output tokens start..end's logprobs from a chunk's meta_info, whose lists hold every
    output token so far: output_token_logprobs (logprob, token id, text) per token and
    output_top_logprobs a list of such (or None) per token."""
    chosen = meta_info.get("output_token_logprobs") or []
    top = meta_info.get("output_top_logprobs") or []
    return tuple(
        TokenLogprob(
            int(chosen[i][1]),
            float(chosen[i][0]),
            tuple((int(token), float(logprob)) for logprob, token, _ in top[i] or ())
            if i < len(top) else (),
        )
        for i in range(start, min(end, len(chosen)))
    )  # fmt: skip


class SGLangEngine:
    """attention_backend "tactic" (ours) or any of SGLang's (e.g. "triton" for comparisons);
    sglang_args go to sglang.Engine as they are."""

    def __init__(
        self,
        config: EngineConfig,
        attention_backend: str = "tactic",
        tp_size: int = 1,
        **sglang_args,
    ):
        import sglang

        from .settings import Settings

        if config.model_dir is None:
            raise ValueError("--engine sglang needs --model (a Hugging Face checkpoint folder)")
        from tactic_server.kernels.selection import kernel_unsupported

        if unsupported := kernel_unsupported(config.tactic):
            raise ValueError(f"the Tactic config sets {', '.join(unsupported)}, which the "
                             f"selection kernels of the SGLang backend do not compute; the "
                             f"embedded engine on the CPU does")  # fmt: skip
        self.config = config
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        model_config = ModelConfig.from_dir(config.model_dir)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.model_name = config.model_dir.rstrip("/").split("/")[-1]
        self.observer = None
        # the dense backend (TACTIC_DENSE_BACKEND) stays as the environment sets it
        dataclasses.replace(Settings.from_env(), default_target=config.default_tactic_target,
                            config=dataclasses.replace(config.tactic),
                            dense_fallback=config.dense_fallback).export()  # fmt: skip
        # logprobs before temperature, as the embedded engine's (its schedulers read this)
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        args = dict(
            model_path=config.model_dir, skip_tokenizer_init=True,
            attention_backend=attention_backend, context_length=self.max_model_len,
            max_running_requests=config.max_batch, sampling_backend="pytorch",
            grammar_backend="none", dtype="auto" if config.dtype == "auto" else config.dtype,
            tp_size=tp_size, enable_metrics=True, **model_override_args(config.model_dir),
        )  # fmt: skip
        args.update(sglang_args)
        self.engine = sglang.Engine(**args)
        self._in_flight = 0
        self._metrics = _SchedulerMetrics()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        prompt_len = check_prompt(request, self.max_model_len)
        if self._in_flight >= self.config.max_batch + self.config.max_waiting:
            raise QueueFull("too many requests are waiting; retry later")
        sampling = request.sampling
        params = sglang_sampling_params(
            sampling, request.tactic, min(sampling.max_tokens, self.max_model_len - prompt_len),
            self.tokenizer.eos_token_ids,
        )  # fmt: skip
        logprobs = dict(return_logprob=True, top_logprobs_num=sampling.logprobs)
        text = TextStream(self.tokenizer, sampling.stop)
        seen, finished, usage = 0, False, None
        self._in_flight += 1
        self._keep_our_sigterm()
        try:
            stream = await self.engine.async_generate(
                input_ids=list(request.prompt_token_ids), sampling_params=params, stream=True,
                rid=request.request_id, **(logprobs if sampling.logprobs is not None else {}),
            )  # fmt: skip
            async for chunk in stream:
                ids = chunk.get("output_ids") or []
                before, new, seen = seen, ids[seen:], max(seen, len(ids))
                for token in new:
                    if token not in self.tokenizer.eos_token_ids or sampling.ignore_eos:
                        text.add(token)
                meta = chunk.get("meta_info", {})
                reason = (meta.get("finish_reason") or {}).get("type")
                if text.stop_at is not None:
                    reason = "stop"
                finished = reason is not None
                # streamed chunks carry only their own tokens' entries: keep the latest sums
                usage = tactic_usage(meta) or usage
                yield GenerationOutput(
                    request_id=request.request_id, token_ids=tuple(new),
                    text=text.take(finished), finish_reason=_reason(reason),
                    prompt_tokens=prompt_len, completion_tokens=seen,
                    tactic=usage if request.tactic.enabled else None,
                    logprobs=token_logprobs(meta, before, seen),
                )  # fmt: skip
                if finished:
                    break
        finally:
            self._in_flight -= 1
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.tokenizer_manager.abort_request(request_id)

    @property
    def default_target(self) -> float:
        return self.config.default_tactic_target

    def _keep_our_sigterm(self) -> None:
        """SGLang's tokenizer manager, on its first request in the main thread's loop, takes
        SIGTERM for itself (and then kills the process tree); the server's graceful drain
        (uvicorn's handler, then shutdown()) is put back."""
        manager = self.engine.tokenizer_manager
        if getattr(manager, "_tactic_sigterm_kept", False):
            return
        ours = signal.getsignal(signal.SIGTERM)
        manager.auto_create_handle_loop()
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, ours)
        manager._tactic_sigterm_kept = True

    def stats(self) -> EngineStats:
        """Queue and KV gauges as SGLang's scheduler last reported them."""
        gauges = self._metrics.gauges()
        return EngineStats(
            running_requests=int(gauges.get("sglang:num_running_reqs", self._in_flight)),
            waiting_requests=int(gauges.get("sglang:num_queue_reqs", 0)),
            kv_cache_usage=float(gauges.get("sglang:token_usage", 0.0)),
            kv_slots_in_use=int(gauges.get("sglang:num_used_tokens", 0)),
            kv_slots_total=int(gauges.get("sglang:max_total_num_tokens", 0)),
        )

    def metrics(self) -> bytes:
        """SGLang's own metrics (written by its scheduler processes), for our /metrics."""
        return self._metrics.exposition()

    async def shutdown(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.engine.shutdown()


def _reason(sglang_reason: str | None) -> str | None:
    return {None: None, "stop": "stop", "length": "length", "abort": "abort"}.get(
        sglang_reason, "stop"
    )


class _SchedulerMetrics:
    """SGLang's scheduler processes write their metrics into PROMETHEUS_MULTIPROC_DIR (set by
    sglang.Engine with enable_metrics); this reads them back."""

    def __init__(self) -> None:
        import os

        from prometheus_client import CollectorRegistry, multiprocess

        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def gauges(self) -> dict[str, float]:
        values = {}
        for family in self.registry.collect():
            for sample in family.samples:
                values.setdefault(sample.name, sample.value)
        return values
