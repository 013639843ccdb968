"""The embedded engine: a background thread runs scheduler steps through the model while asyncio
callers submit requests and stream their outputs; closing a stream aborts its request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tactic_server.testing.tiny_model import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
)

from .config import EngineConfig
from .kv_pool import KVPool
from .loader import load_state_dict
from .model_config import ModelConfig
from .model_runner import ModelRunner
from .models import CausalLM, build_model
from .scheduler import Scheduler, Step
from .sequence import Sequence, Status
from .tokenizer import TextStream, Tokenizer
from .types import (
    EngineObserver,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    QueueFull,
    check_prompt,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Stream:
    """Where a request's outputs go, its text, and the tokens sent so far."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    text: TextStream
    sent_tokens: int = 0


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig,
                 model_name: str, max_model_len: int) -> None:  # fmt: skip
        self.config = config
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        model_config = model.config
        device = torch.device(config.device)
        # enough for one request of the full context, and for max_batch of them up to 64k slots
        kv_slots = config.kv_slots or max(
            max_model_len, min(config.max_batch * max_model_len, 1 << 16)
        )
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        if backend == "triton":
            from tactic_server.kernels.selection import kernel_unsupported

            if unsupported := kernel_unsupported(config.tactic):
                raise ValueError(
                    f"the Tactic config sets {', '.join(unsupported)}, which only the torch "
                    f"reference computes (device cpu, or attention_backend torch); the kernels "
                    f"this engine decodes through on {device.type} do not"
                )
        self.pool = KVPool(
            model_config.num_hidden_layers, kv_slots, model_config.num_key_value_heads,
            model_config.head_dim, model.lm_head.weight.dtype, device, config.tactic.segment_size,
        )  # fmt: skip
        self.runner = ModelRunner(model, self.pool, config.tactic, device, backend,
                                  config.max_batch, max_model_len,
                                  dense_fallback=config.dense_fallback == "auto")  # fmt: skip
        logger.info(
            "KV pool: %d slots, %.1f MiB of KV plus %.1f MiB of cluster metadata (%.1f%%)",
            kv_slots, self.pool.kv_bytes / 2**20, self.runner.side.nbytes / 2**20,
            100 * self.runner.side.nbytes / self.pool.kv_bytes,
        )  # fmt: skip
        self.scheduler = Scheduler(self.pool, config.max_batch, config.max_waiting,
                                   config.prefill_chunk, max_model_len)  # fmt: skip
        self._streams: dict[str, _Stream] = {}
        self._sequences: dict[str, Sequence] = {}
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tactic-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, progress=None) -> Engine:
        model_dir = config.model_dir or str(default_model())
        model_config = ModelConfig.from_dir(model_dir)
        if config.dtype != "auto":
            dtype = _DTYPES[config.dtype]
        elif config.device == "cpu":
            dtype = torch.float32  # bf16 matmuls are slow on most CPUs
        else:
            dtype = _DTYPES.get(
                str(model_config.torch_dtype).removeprefix("torch."), torch.bfloat16
            )
        with torch.device("meta"):
            model = build_model(model_config)
        state = load_state_dict(model_dir, dtype, config.device, progress)
        if model_config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False, assign=True)
        if model_config.tie_word_embeddings:  # assign=True replaced the tied tensor: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        missing = [name for name, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"the checkpoint in {model_dir} lacks {', '.join(missing[:5])}")
        # buffers were made on the meta device with the module; compute the real ones
        model.reset_rotary(config.device)
        model.eval()
        max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                            model_config.max_position_embeddings)  # fmt: skip
        tiny = Path(model_dir) == default_model_dir()
        name = DEFAULT_MODEL_NAME if tiny else _model_name(model_dir)
        return cls(model, Tokenizer.from_dir(model_dir), config, name, max_model_len)

    @property
    def observer(self) -> EngineObserver | None:
        return self.runner.observer

    @observer.setter
    def observer(self, observer: EngineObserver | None) -> None:
        self.runner.observer = observer

    def stats(self) -> EngineStats:
        with self._lock:
            in_use = self.pool.slots_in_use()
            return EngineStats(
                running_requests=len(self.scheduler.running),
                waiting_requests=len(self.scheduler.waiting),
                kv_cache_usage=in_use / self.pool.num_slots,
                kv_slots_in_use=in_use,
                kv_slots_total=self.pool.num_slots,
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs. Raises PromptTooLong or QueueFull before any output;
        leaving the loop early (or cancellation) aborts the request and frees its KV."""
        check_prompt(request, self.max_model_len)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(),
                         TextStream(self.tokenizer, request.sampling.stop))  # fmt: skip
        sequence = Sequence(request, list(request.prompt_token_ids))
        if request.sampling.seed is not None:
            sequence.generator = torch.Generator().manual_seed(request.sampling.seed)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if not self.scheduler.can_queue():
                raise QueueFull("too many requests are waiting; retry later")
            self._streams[request.request_id] = stream
            self._sequences[request.request_id] = sequence
            self.scheduler.add(sequence)
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await stream.outputs.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """End a request (its stream gets "abort") and free its KV, at the next step."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    @property
    def default_target(self) -> float:
        return self.config.default_tactic_target

    def metrics(self) -> bytes:
        """None of its own: the front end's families say everything about this engine."""
        return b""

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Finish the requests in flight (up to timeout seconds), then stop the engine thread."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while self._sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._commands.put(("stop", None))
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 5.0)

    # engine thread

    def _loop(self) -> None:
        while True:
            if not self._handle_commands():
                return
            with self._lock:
                step = self.scheduler.schedule()
            if not step:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._step(step)
            except Exception as error:  # noqa: BLE001 - one request's failure must not stop the loop
                logger.exception("engine step failed")
                for sequence in [s for s, _, _ in step.prefill] + step.decode:
                    self._finish(sequence, "error", error=f"{type(error).__name__}: {error}")

    def _handle_commands(self) -> bool:
        while True:
            try:
                command, request_id = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command == "stop":
                return False
            sequence = self._sequences.get(request_id)
            if sequence is not None:
                self._finish(sequence, "abort")

    def _step(self, step: Step) -> None:
        """Run the scheduled step, then emit each sequence's new token."""
        started = time.perf_counter()
        tokens = self.runner.run(step)
        if step.decode and self.observer is not None:
            self.observer.on_decode_step(time.perf_counter() - started, len(step.decode))
        for sequence, _, end in step.prefill:
            if end == sequence.prompt_len:
                sequence.status = Status.DECODE
                with self._lock:
                    self.runner.share_prompt_segments(sequence)
        for sequence, (token, logprob) in tokens.items():
            sequence.token_ids.append(token)
            if logprob is not None:
                sequence.logprobs.append(logprob)
            self._emit(sequence, token)

    def _emit(self, sequence: Sequence, token: int) -> None:
        stream = self._streams[sequence.request_id]
        sampling = sequence.request.sampling
        reason = None
        is_eos = token in self.tokenizer.eos_token_ids and not sampling.ignore_eos
        if is_eos or stream.text.add(token):
            reason = "stop"
        if reason is None and (sequence.completion_tokens >= sampling.max_tokens
                               or len(sequence.token_ids) >= self.max_model_len):  # fmt: skip
            reason = "length"
        if reason is None:
            self._send(sequence, stream, None)
        else:
            self._finish(sequence, reason)

    def _send(self, sequence: Sequence, stream: _Stream, reason: str | None, error=None) -> None:
        output = GenerationOutput(
            request_id=sequence.request_id,
            token_ids=tuple(sequence.token_ids[sequence.prompt_len + stream.sent_tokens :]),
            text=stream.text.take(finished=reason is not None),
            finish_reason=reason,
            prompt_tokens=sequence.prompt_len,
            completion_tokens=sequence.completion_tokens,
            tactic=sequence.usage,
            error=error,
            logprobs=tuple(sequence.logprobs[stream.sent_tokens :]),
        )
        stream.sent_tokens = sequence.completion_tokens
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, output)

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        with self._lock:
            self.scheduler.release(sequence)
            self._sequences.pop(sequence.request_id, None)
            stream = self._streams.pop(sequence.request_id, None)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # the caller's event loop is gone
                self._send(sequence, stream, reason, error)


def default_model() -> Path:
    """What serves without --model: the bundled trained model (tactic_server/models), or the
    tiny random one where an install left the bundled weights out."""
    from tactic_server.models import bundled_model_dir

    return bundled_model_dir() or ensure_default_model()


def _model_name(model_dir: str) -> str:
    return Path(model_dir).resolve().name
