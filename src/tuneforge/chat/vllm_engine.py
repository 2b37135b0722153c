"""Generation with vLLM (`model.infer_backend: vllm`, LLaMA-Factory's `infer_backend: vllm`) on NVIDIA GPUs.

Prompts are encoded by the training template exactly as with transformers (vLLM gets token ids, never text), and
adapters are served as vLLM LoRA requests by name. vLLM's AsyncLLMEngine runs on an event loop of its own, in a
thread, so the synchronous callers (CLI chat, predict) and the API's event loop share one engine: each request's
outputs are pumped from that loop to the caller. vLLM batches concurrent requests itself.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.chat.engine import BASE, ChatEngine, Completion, run_info
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ConfigError, ModelError

END = object()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def require_vllm() -> Any:
    """The vllm package on a machine with a CUDA GPU, else one message saying what is missing."""
    if not cuda_available():
        raise ConfigError("model.infer_backend: vllm needs an NVIDIA GPU (vLLM's CUDA build) and this machine has "
                          "none; use infer_backend: huggingface (the default)")
    try:
        import vllm
    except ImportError:
        raise ConfigError("model.infer_backend: vllm needs the vllm package: pip install vllm (a build matching "
                          "your torch and CUDA)") from None
    return vllm


@dataclass
class VllmEngine(ChatEngine):
    """A ChatEngine whose generation runs in vLLM; the template, tokenizer and stop words are the same."""

    llm: Any = None  # vllm.AsyncLLMEngine
    loras: dict[str, Any] = field(default_factory=dict)  # adapter name -> vllm LoRARequest
    loop: Any = None  # the engine's event loop (runs in `thread`)
    thread: Any = None
    positions: int = 0
    make_params: Callable[..., Any] | None = None  # vllm.SamplingParams
    running: set = field(default_factory=set)  # futures of the requests in flight

    # ---------------------------------------------------------------- what the transformers engine does otherwise

    def max_positions(self) -> int:
        return self.positions

    def start_batching(self, settings: Any) -> None:
        """vLLM batches concurrent requests itself."""

    def stop_batching(self) -> None:
        pass

    def batchable(self, gen: GenerationConfig, adapter: bool | str, prompt_tokens: int) -> bool:
        return False

    def shutdown(self) -> None:
        """Abort running requests (their callers get what was generated) and stop the engine."""
        self.closing.set()
        if self.loop is None or not self.loop.is_running():
            return

        async def stop() -> None:  # on the engine's loop: end every request, then the engine
            pumps = [asyncio.wrap_future(f) for f in list(self.running)]
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if hasattr(self.llm, "shutdown"):
                self.llm.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)

    def score(self, sequences: list[list[int]], adapter: bool | str = True, batch_size: int = 8) -> list[float]:
        raise ModelError("reward models are scored with infer_backend: huggingface; vLLM serves generation only")

    def is_reward_model(self, adapter: bool | str = True) -> bool:
        return False

    # ---------------------------------------------------------------------------------------------- generation

    def lora_request(self, adapter: bool | str) -> Any:
        """The LoRA request of `adapter` (True: the last loaded, False / BASE: none)."""
        if adapter is False or adapter is BASE or not self.loras:
            if isinstance(adapter, str) and adapter not in self.loras and adapter is not BASE:
                raise ModelError(f"no adapter named '{adapter}' is loaded")
            return None
        if adapter is True:
            return self.loras[self.adapters[-1]]
        if adapter not in self.loras:
            raise ModelError(f"no adapter named '{adapter}' is loaded")
        return self.loras[adapter]

    def sampling_params(self, gen: GenerationConfig, stop: list[str] | None) -> Any:
        """vLLM's SamplingParams for `gen`: greedy at temperature 0; the template's stop words and the request's
        stop strings end the answer (not included), and so do the stop token ids."""
        sampling = self.sampling(gen)
        greedy = sampling["temperature"] == 0
        return self.make_params(
            n=1, max_tokens=gen.max_new_tokens, temperature=0.0 if greedy else sampling["temperature"],
            top_p=1.0 if greedy else sampling["top_p"], top_k=-1 if greedy else (sampling["top_k"] or -1),
            repetition_penalty=gen.repetition_penalty, seed=gen.seed,
            stop=list(self.template.stop_words) + list(stop or []), stop_token_ids=self.stop_ids(),
            skip_special_tokens=False)

    def _pump(self, ids: list[int], params: Any, lora: Any, request_id: str, put: Callable[[Any], None],
              deadline: float | None) -> Any:
        """Start, on the engine's loop, a task that passes each RequestOutput to `put`, then END (or the
        exception). It aborts the request at `deadline` or when the engine shuts down; cancelling the returned
        future (a caller gone) cancels vLLM's generate, which aborts the request itself."""

        async def pump() -> None:
            outputs = self.llm.generate({"prompt_token_ids": ids}, params, request_id, lora_request=lora)
            try:
                async for out in outputs:
                    put(out)
                    if self.closing.is_set() or (deadline is not None and time.monotonic() > deadline):
                        await self.llm.abort(request_id)
                        break
                put(END)
            except asyncio.CancelledError:
                put(END)
                raise
            except BaseException as err:  # handed to the caller
                put(err)
            finally:
                await outputs.aclose()

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        self.running.add(future)
        future.add_done_callback(self.running.discard)
        return future

    def _request(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str, tools: str | None,
                 stop: list[str] | None, put: Callable[[Any], None], deadline: float | None) -> tuple[list[int], Any]:
        """The prompt's ids (the training template's) and the started request's future."""
        ids = self.prompt_ids(messages, gen.system, tools)
        params, lora = self.sampling_params(gen, stop), self.lora_request(adapter)
        return ids, self._pump(ids, params, lora, uuid.uuid4().hex, put, deadline)

    def stream(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
               tools: str | None = None, stop: list[str] | None = None,
               result: Completion | None = None, cancel: threading.Event | None = None,
               deadline: float | None = None) -> Iterator[str]:
        outputs: queue.Queue = queue.Queue()
        ids, pump = self._request(messages, gen, adapter, tools, stop, outputs.put, deadline)
        last, shown = None, 0
        try:
            while (item := outputs.get()) is not END:
                piece, shown, last = new_text(item, shown)
                if piece:
                    yield piece
                if cancel is not None and cancel.is_set():
                    break
        finally:  # finished, cancelled, or the reader left: the request ends in vLLM too
            pump.cancel()
        fill(result, ids, last)

    async def astream(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
                      tools: str | None = None, stop: list[str] | None = None,
                      result: Completion | None = None, time_limit: float | None = None) -> AsyncIterator[str]:
        deadline = None if time_limit is None else time.monotonic() + time_limit
        caller, outputs = asyncio.get_running_loop(), asyncio.Queue()

        def put(item: Any) -> None:
            caller.call_soon_threadsafe(outputs.put_nowait, item)

        ids, pump = self._request(messages, gen, adapter, tools, stop, put, deadline)
        last, shown = None, 0
        try:
            while (item := await outputs.get()) is not END:
                piece, shown, last = new_text(item, shown)
                if piece:
                    yield piece
        finally:  # finished, or the reader left (a client gone): the request ends in vLLM too
            pump.cancel()
        fill(result, ids, last)

    def generate_batch(self, conversations: list[list[Message]], gen: GenerationConfig,
                       adapter: bool | str = True) -> list[Completion]:
        """All prompts submitted at once (vLLM batches them); answers in order."""

        async def one(messages: list[Message]) -> Completion:
            done = Completion()
            done.text = "".join([p async for p in self.astream(messages, gen, adapter, result=done)]).strip()
            return done

        async def every() -> list[Completion]:
            return list(await asyncio.gather(*(one(m) for m in conversations)))

        return asyncio.run(every())


def new_text(item: Any, shown: int) -> tuple[str, int, Any]:
    """What a RequestOutput (cumulative text) adds after `shown` characters, the new count, and the output; an
    exception from the pump is raised here, in the reader."""
    if isinstance(item, BaseException):
        raise item
    text = item.outputs[0].text
    return text[shown:], max(shown, len(text)), item


def fill(result: Completion | None, ids: list[int], last: Any) -> None:
    """Usage and finish reason from the last RequestOutput ('length' when cut short)."""
    if result is None:
        return
    result.prompt_tokens = len(ids)
    result.completion_tokens = len(last.outputs[0].token_ids) if last is not None else 0
    reason = last.outputs[0].finish_reason if last is not None and last.finished else None
    result.finish_reason = "stop" if reason == "stop" else "length"


LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts (vllm/config/lora.py)


def lora_rank_slot(needed: int) -> int:
    """The smallest rank vLLM reserves for that fits `needed` (one message when none does)."""
    fits = [r for r in LORA_RANKS if r >= needed]
    if not fits:
        raise ConfigError(f"model.vllm.max_lora_rank: vLLM serves adapters up to rank {LORA_RANKS[-1]}; this one "
                          f"needs {needed}")
    return fits[0]


def request_logging(version: str) -> dict[str, bool]:
    """vLLM's switch for logging every request, off: disable_log_requests up to 0.10.0, enable_log_requests after."""
    from packaging.version import Version

    return {"disable_log_requests": True} if Version(version) <= Version("0.10.0") else \
        {"enable_log_requests": False}


def check_servable(name: str, folder: Path, tokenizer: Any) -> None:
    """What vLLM cannot serve from an adapter folder, in one message: a reward model (a value head to score
    with), or a run that added tokens (its own tokenizer and embedding rows)."""
    from transformers import AutoTokenizer

    if run_info(folder).get("stage") == "rm":
        raise ConfigError(f"model.infer_backend: vllm: adapter '{name}' ({folder}) is a reward model (stage rm), "
                          "which scores with its value head; serve it with infer_backend: huggingface")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    grown = (folder / "tokenizer_config.json").is_file() and \
        len(AutoTokenizer.from_pretrained(folder)) > len(tokenizer)
    if grown or set(config.get("modules_to_save") or []) & {"embed_tokens", "lm_head"}:
        raise ConfigError(f"model.infer_backend: vllm: adapter '{name}' ({folder}) added tokens or trained the "
                          "embeddings, which a vLLM LoRA request cannot carry; merge it with `tuneforge export` "
                          "and serve the export, or use infer_backend: huggingface")


def adapter_rank(folder: Path) -> int:
    """The rank r in an adapter's adapter_config.json (0 when it names none)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return int(config.get("r") or 0)


def load_vllm_engine(model_cfg: ModelConfig, base_folder: Path, tokenizer: Any, template: Any,
                     system: str | None, info: dict[str, Any], stacked: list[Path],
                     separate: dict[str, Path]) -> VllmEngine:
    """The base model in vLLM with each adapter as a LoRA request (one stacked adapter at most: vLLM applies one
    adapter per request, so earlier ones must be merged first with `tuneforge export`)."""
    vllm = require_vllm()
    from vllm.lora.request import LoRARequest

    if len(stacked) > 1:
        raise ConfigError(f"model.adapter_path: vLLM applies one adapter per request and {len(stacked)} are "
                          "stacked; merge the earlier ones into the base with `tuneforge export`, then serve the "
                          "export with the last adapter")
    loaded = ([(stacked[0].parent.name if stacked[0].name == "adapter" else stacked[0].name, stacked[0])]
              if stacked else []) + list(separate.items())
    for name, folder in loaded:
        check_servable(name, folder, tokenizer)
    ranks = [adapter_rank(folder) for _, folder in loaded]
    settings = model_cfg.vllm
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(model_cfg.dtype, "auto")
    args = {"model": str(base_folder), "tokenizer": str(base_folder), "trust_remote_code": model_cfg.trust_remote_code,
            "dtype": dtype, "max_model_len": settings.max_len, "gpu_memory_utilization": settings.gpu_util,
            "enforce_eager": settings.enforce_eager, "disable_log_stats": True,
            **request_logging(getattr(vllm, "__version__", "0.11.0")), "enable_lora": bool(loaded),
            **({"max_lora_rank": lora_rank_slot(max([settings.max_lora_rank, *ranks])),
                "max_loras": len(loaded)} if loaded else {}),
            **settings.engine_args}
    llm = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**args))
    loras = {name: LoRARequest(name, index + 1, str(folder)) for index, (name, folder) in enumerate(loaded)}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="vllm-engine", daemon=True)
    thread.start()
    return VllmEngine(None, tokenizer, template, system, [name for name, _ in loaded], info=info, llm=llm,
                      loras=loras, loop=loop, thread=thread, positions=settings.max_len,
                      make_params=vllm.SamplingParams)
