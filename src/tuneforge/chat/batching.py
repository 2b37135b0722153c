"""Continuous batching for the API server: concurrent requests decode together in one running batch, through
transformers' ContinuousBatchingManager (a request joins at the next step and leaves when it is done), each
caller receiving its own tokens as they come.

The manager picks each token by argmax. Sampled requests (temperature > 0, with top-k / top-p) get their logits
scaled and filtered, then Gumbel noise added, row by row (argmax of logits + Gumbel noise is an exact draw from
their softmax), so greedy and sampled requests share one batch and greedy rows are left untouched. It runs the
model's current weights: the engine sends it requests for its default weights only; everything else (a seed, a
repetition penalty, other weights) takes the engine's exclusive path, which pauses the batch meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import ConfigError, ModelError

PAGE_TOKENS = 64  # tokens per KV-cache page (per layer); a request holds whole pages


@dataclass(frozen=True)
class BatchSettings:
    """How many requests decode together, and how many tokens the shared KV cache holds across all of them."""

    max_sequences: int = 64
    cache_tokens: int = 16384
    step_tokens: int = 1024  # most prompt + decode tokens in one forward pass (long prompts are prefilled in chunks)

    def __post_init__(self) -> None:
        if self.max_sequences < 2:
            raise ConfigError(f"--batch-size {self.max_sequences}: continuous batching needs at least 2 sequences "
                              "(1 means one generation at a time, without a batcher)")
        if self.cache_tokens < PAGE_TOKENS:
            raise ConfigError(f"--kv-cache-tokens {self.cache_tokens} is below one cache page ({PAGE_TOKENS} "
                              "tokens)")


class Batcher:
    """A running continuous-batching loop over `model` (in its own thread) for greedy requests."""

    def __init__(self, model: Any, eos_ids: list[int], pad_id: int | None, settings: BatchSettings) -> None:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from tuneforge.chat.sampling import sampling_processors

        self.settings = settings
        self.eos_ids = list(eos_ids)
        generation = GenerationConfig(do_sample=False, max_new_tokens=256, eos_token_id=self.eos_ids,
                                      pad_token_id=pad_id)
        config = ContinuousBatchingConfig(page_size=PAGE_TOKENS,
                                          num_blocks=math.ceil(settings.cache_tokens / PAGE_TOKENS),
                                          max_batch_tokens=settings.step_tokens,
                                          max_requests_per_batch=settings.max_sequences,
                                          scheduler_type="fifo")
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=config)
        self.manager.logit_processor = sampling_processors()  # replaces the (empty) chain made for argmax
        with torch.inference_mode():  # the loop thread runs in the starting thread's inference mode
            self.manager.start()
        # The manager's loop thread is not a daemon: a process that never calls close() (a crash before it) would
        # wait for it forever at exit. Python runs these hooks before joining such threads (as concurrent.futures).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self.close, 1.0)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether one request's prompt and answer fit the shared cache with room for others."""
        return prompt_tokens + max_new_tokens <= self.settings.cache_tokens // 2

    @property
    def running(self) -> bool:
        return self.manager.is_running()

    async def tokens(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, deadline: float | None = None) -> AsyncIterator[tuple[list[int], bool]]:
        """(tokens generated so far, finished) after each step that added some; ends when the request finishes,
        or at `deadline` (time.monotonic()) unfinished. Greedy when temperature is 0, else sampled (top_p < 1,
        top_k > 0 filter). Leaving early (a stop word, a client gone, the deadline) cancels the request."""
        updates: asyncio.Queue[Any] = asyncio.Queue()
        rid = f"tf-{uuid.uuid4().hex}"
        self.manager.register_result_handler(rid, updates.put_nowait)
        added = self.manager.add_request(list(ids), request_id=rid, max_new_tokens=max_new_tokens,
                                         streaming=True, eos_token_id=self.eos_ids,
                                         temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        finished = False
        try:
            if added is None:
                raise ModelError("the server is shutting down and takes no new generations")
            while not finished:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    latest = await asyncio.wait_for(updates.get(), left) if left is None or left > 0 else None
                except TimeoutError:
                    latest = None
                if latest is None:
                    return
                while not updates.empty() and not latest.is_finished():  # a slow reader skips to the newest
                    latest = updates.get_nowait()
                if latest.error:
                    raise ModelError(f"generation failed: {latest.error}")
                finished = latest.is_finished()
                yield list(latest.generated_tokens), finished
        finally:
            if not finished:
                self.manager.cancel_request(rid)
                router = self.manager.output_router
                with router._lock:  # no public way to drop a handler whose request will never finish
                    router.result_handlers.pop(rid, None)

    def paused(self) -> Any:
        """Hold the loop between steps (its requests wait, nothing is lost) while the caller uses the model."""
        return self.manager.pause() if self.running else nullcontext()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop: requests still running are failed, so their callers get an error instead of waiting."""
        if self.running:
            self.manager.stop(block=True, timeout=timeout, hard_stop=True)

