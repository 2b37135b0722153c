"""The inference engine (transformers backend): a base model with named adapters, prompts built by the training
template, streaming and stop words. Generations run one at a time under a lock, so concurrent callers queue safely;
a server can start a continuous batcher (chat/batching.py) that decodes concurrent greedy requests together, and
the locked path pauses it while it runs.

Reward models (stage rm) are served by the same engine: a value head saved beside an adapter (or in a full model
folder) is loaded with it, and `score` gives the head's value at each sequence's last token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.encode import EncodeOptions, encode_pairwise
from tuneforge.data.types import Message
from tuneforge.errors import ModelError
from tuneforge.finetune.methods import merge_adapters, no_bitsandbytes_layers
from tuneforge.models.hub import resolve_model_dir
from tuneforge.models.load import adopt_saved_vocab, load_model, load_tokenizer
from tuneforge.models.valuehead import ValueHead, WithValueHead, find_value_head, hidden_size, load_value_head
from tuneforge.paths import RUN_INFO
from tuneforge.templates import get_template
from tuneforge.templates.base import Template

BASE = False  # pass as `adapter` to answer with the base model
MODEL_HEAD = ""  # value_heads key of a head that belongs to the model itself (a full reward model), not an adapter
SCORE_BATCH = 8  # sequences per scoring forward pass; the engine's lock is taken once per batch
DEFAULT_MAX_POSITIONS = 1024  # scoring cut when the model's config names no max_position_embeddings (as LF)


def adapter_folder(path: str | Path) -> Path:
    """An adapter path may be a run folder (its final adapter), a checkpoint folder, or an adapter folder."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"{path} holds no LoRA adapter (adapter_config.json); give a run folder, one of its "
                     "checkpoints, or an adapter folder")


def run_info(folder: Path) -> dict[str, Any]:
    """What training recorded beside the weights (base model, template, default system), or {}."""
    path = folder / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class Completion:
    """One finished answer with token counts and why it stopped ('stop' or 'length')."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class ChatEngine:
    """A model ready to answer: weights, tokenizer, template, and the names of its adapters."""

    model: Any
    tokenizer: Any
    template: Template
    default_system: str | None
    adapters: list[str] = field(default_factory=list)
    lock: Any = field(default_factory=threading.Lock)
    value_heads: dict[str, ValueHead] = field(default_factory=dict)  # adapter name (or MODEL_HEAD) -> its value head
    info: dict[str, Any] = field(default_factory=dict)  # what training recorded beside the last loaded weights
    batcher: Any = None  # a running chat.batching.Batcher, when a server started one
    closing: threading.Event = field(default_factory=threading.Event)  # set at shutdown: generations end now

    def shutdown(self) -> None:
        """End every generation now (each caller gets what was generated so far) and stop the batcher."""
        self.closing.set()
        self.stop_batching()

    def start_batching(self, settings: Any) -> None:
        """Decode concurrent greedy requests for the default weights together (see chat/batching.py)."""
        from tuneforge.chat.batching import Batcher

        if self.batcher is None:
            self.batcher = Batcher(self.model, self.stop_ids(), self.tokenizer.pad_token_id, settings)

    def stop_batching(self) -> None:
        """Stop the batcher; requests it was running get an error."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    @contextmanager
    def exclusive(self, adapter: bool | str) -> Iterator[None]:
        """The model to this caller alone, with `adapter`'s weights: the lock, and the batcher (if any) paused
        between steps; the batcher's weights are selected again before it resumes."""
        batcher = self.batcher
        with self.lock, (batcher.paused() if batcher is not None else nullcontext()):
            try:
                with self.adapter_context(adapter), torch.no_grad():
                    yield
            finally:
                if batcher is not None and self.adapters:
                    self.model.set_adapter(self.adapters[-1])

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapters)

    def head_key(self, adapter: bool | str) -> str:
        """Which weights `adapter` selects: an adapter's name, or MODEL_HEAD for the model without adapters."""
        if isinstance(adapter, str):
            return adapter
        return self.adapters[-1] if adapter and self.adapters else MODEL_HEAD

    def is_reward_model(self, adapter: bool | str = True) -> bool:
        """Whether these weights have a value head (a reward model, stage rm)."""
        return self.head_key(adapter) in self.value_heads

    def reward_model(self, adapter: bool | str = True) -> WithValueHead:
        """Base + adapter + value head of the selected weights; one clear error when they have no head."""
        key = self.head_key(adapter)
        if key not in self.value_heads:
            what = f"adapter '{key}'" if key else "the model"
            raise ModelError(f"{what} has no value head (value_head.safetensors); only reward models trained with "
                             "stage rm give scores")
        return WithValueHead(self.model, self.value_heads[key])

    def score(self, sequences: list[list[int]], adapter: bool | str = True,
              batch_size: int = SCORE_BATCH) -> list[float]:
        """Value-head score at each sequence's last token, batch by batch (the lock is held for one batch)."""
        from tuneforge.stages.base import attention_mask, pad
        from tuneforge.stages.rm import last_token_scores

        reward = self.reward_model(adapter)
        if not all(sequences):
            raise ModelError("cannot score an empty sequence: each text needs at least one token")
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            part = sequences[start:start + batch_size]
            batch = {"input_ids": pad(part, self.tokenizer.pad_token_id), "attention_mask": attention_mask(part)}
            with self.exclusive(adapter):
                device = next(self.model.parameters()).device
                scores += last_token_scores(reward, {k: v.to(device) for k, v in batch.items()}).tolist()
        return scores

    def max_positions(self) -> int:
        """Longest sequence the model takes (its config's max_position_embeddings, else 1024 as LLaMA-Factory)."""
        return int(self.model.config.to_dict().get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)

    def text_ids(self, text: str, max_length: int | None = None) -> list[int]:
        """A raw text to score, tokenized as LLaMA-Factory's score API does: no template, no special tokens,
        the end cut so at most max_length (default: the model's max positions) tokens remain."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))[: max_length or self.max_positions()]

    def answer_ids(self, messages: list[Message], system: str | None, tools: str | None = None,
                   max_length: int | None = None) -> list[int]:
        """A conversation ending with an answer, encoded exactly as training encoded a preference pair's side:
        the template's prompt pieces, then the answer with its end-of-turn tokens, cut by the same rule."""
        pieces = self.template.encode_pairs(messages, system, tools)
        prompt = [t for p, r in pieces[:-1] for t in p + r] + pieces[-1][0]
        answer = pieces[-1][1]
        opts = EncodeOptions(cutoff_len=max_length or self.max_positions())
        return encode_pairwise(prompt, answer, answer, opts, tail=len(pieces[-1][0]))["chosen_input_ids"]

    def generate(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
                 tools: str | None = None, stop: list[str] | None = None) -> str:
        """The whole answer (greedy when temperature is 0), cut at the stop words."""
        return self.complete(messages, gen, adapter, tools, stop).text

    def complete(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
                 tools: str | None = None, stop: list[str] | None = None) -> Completion:
        """The answer with its usage figures."""
        result = Completion()
        result.text = "".join(self.stream(messages, gen, adapter, tools, stop, result))
        return result

    def stream(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
               tools: str | None = None, stop: list[str] | None = None,
               result: Completion | None = None, cancel: threading.Event | None = None,
               deadline: float | None = None) -> Iterator[str]:
        """Yield the answer piece by piece; `result` (if given) receives token counts and the finish reason.
        Generation ends early (finish reason 'length') when `cancel` is set, at `deadline` (time.monotonic()),
        or when the engine shuts down."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = self.prompt_ids(messages, gen.system, tools)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        kwargs = self._generate_kwargs(ids, gen)
        stop_words = list(self.template.stop_words) + list(stop or [])
        if stop_words:  # generation itself ends at multi-token stop strings too
            kwargs.update(stop_strings=stop_words, tokenizer=self.tokenizer)
        closing, cut = self.closing, threading.Event()

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if closing.is_set() or (cancel is not None and cancel.is_set()) or \
                        (deadline is not None and time.monotonic() > deadline):
                    cut.set()
                return torch.full((input_ids.shape[0],), cut.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs["stopping_criteria"] = StoppingCriteriaList([Interrupted()])
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self.exclusive(adapter):
                    if gen.seed is not None:
                        torch.manual_seed(gen.seed)
                    outcome["ids"] = self.model.generate(**kwargs, streamer=streamer)[0, len(ids):]
            except BaseException as err:  # surfaced in the caller's thread below
                outcome["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        stopped = yield from cut_at_stop_words(streamer, stop_words)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        if result is not None:
            generated = outcome["ids"]
            hit_eos = len(generated) and int(generated[-1]) in self.stop_ids()
            result.prompt_tokens = len(ids)
            result.completion_tokens = len(generated)
            ended = stopped or hit_eos or len(generated) < gen.max_new_tokens
            result.finish_reason = "stop" if ended and not cut.is_set() else "length"

    def batchable(self, gen: GenerationConfig, adapter: bool | str, prompt_tokens: int) -> bool:
        """Whether the batcher can run this request: greedy or unseeded sampling, no repetition penalty, the
        default weights, and a prompt + answer that fit its cache."""
        sample = self.sampling(gen)["temperature"] > 0
        default = adapter is True or (not self.adapters and adapter is BASE) or \
            (bool(self.adapters) and adapter == self.adapters[-1])
        return (self.batcher is not None and self.batcher.running and not (sample and gen.seed is not None)
                and gen.repetition_penalty == 1.0 and default
                and self.batcher.fits(prompt_tokens, gen.max_new_tokens))

    @staticmethod
    def sampling(gen: GenerationConfig) -> dict[str, Any]:
        """temperature / top_p / top_k as `generate` gets them; temperature 0 means greedy."""
        if not (gen.do_sample if gen.do_sample is not None else gen.temperature > 0):
            return {"temperature": 0.0}
        return {"temperature": gen.temperature or 1.0, "top_p": gen.top_p, "top_k": gen.top_k or 0}

    async def astream(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
                      tools: str | None = None, stop: list[str] | None = None,
                      result: Completion | None = None, time_limit: float | None = None) -> AsyncIterator[str]:
        """`stream` for an event loop: through the batcher when it can run the request, else the locked path in a
        worker thread. Both give the same text, token counts and finish reason. A caller that stops reading
        (a client gone) ends its generation; after `time_limit` seconds the answer is cut (finish 'length')."""
        ids = self.prompt_ids(messages, gen.system, tools)
        deadline = None if time_limit is None else time.monotonic() + time_limit
        if not self.batchable(gen, adapter, len(ids)):
            cancel = threading.Event()
            pieces = self.stream(messages, gen, adapter, tools, stop, result, cancel, deadline)
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    yield piece
            finally:
                cancel.set()  # the reader left (or finished): the worker's generation stops at its next token
            return
        cutter = StopCutter(list(self.template.stop_words) + list(stop or []))
        generated: list[int] = []
        shown, counted, finished = 0, 0, False  # counted: tokens whose text went through the cutter
        updates = self.batcher.tokens(ids, gen.max_new_tokens, **self.sampling(gen), deadline=deadline)
        async with aclosing(updates):
            async for generated, finished in updates:
                # token by token (an update may bring several), so that a stop word ends the answer at the token
                # that completes it, as generate's stop_strings do on the locked path
                for end in range(counted + 1, len(generated) + 1):
                    text = self.tokenizer.decode(generated[:end], skip_special_tokens=False)
                    if text.endswith("\ufffd") and not (finished and end == len(generated)) and end - counted < 4:
                        continue  # an incomplete character: wait for the next token (a UTF-8 one has <= 4 bytes)
                    piece, shown, counted = text[shown:], len(text), end
                    if out := cutter.feed(piece):
                        yield out
                    if cutter.stopped:
                        break
                if cutter.stopped:
                    break
        if not cutter.stopped and (tail := cutter.flush()):
            yield tail
        if result is not None:
            hit_eos = bool(generated) and generated[-1] in self.stop_ids()
            ended = cutter.stopped or (finished and (hit_eos or len(generated) < gen.max_new_tokens))
            result.prompt_tokens = len(ids)
            result.completion_tokens = counted if cutter.stopped else len(generated)
            result.finish_reason = "stop" if ended else "length"  # unfinished: cut by the time limit

    async def acomplete(self, messages: list[Message], gen: GenerationConfig, adapter: bool | str = True,
                        tools: str | None = None, stop: list[str] | None = None,
                        time_limit: float | None = None) -> Completion:
        """`complete` for an event loop (batched when possible)."""
        result = Completion()
        result.text = "".join([piece async for piece in
                               self.astream(messages, gen, adapter, tools, stop, result, time_limit)])
        return result

    def generate_batch(self, conversations: list[list[Message]], gen: GenerationConfig,
                       adapter: bool | str = True) -> list[Completion]:
        """Answers for several prompts at once: left-padded into one batch, each cut at its stop words."""
        prompts = [self.prompt_ids(m, gen.system) for m in conversations]
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        kwargs = self._generate_kwargs(prompts[0], gen)
        kwargs.update(input_ids=input_ids, attention_mask=mask)
        with self.exclusive(adapter):
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            out = self.model.generate(**kwargs)[:, longest:]
        stops, results = set(self.stop_ids()), []
        for prompt, row in zip(prompts, out.tolist()):
            ended = next((i for i, t in enumerate(row) if t in stops), None)
            kept = row if ended is None else row[:ended]
            text = "".join(cut_at_stop_words(iter([self.tokenizer.decode(kept)]), self.template.stop_words))
            results.append(Completion(text.strip(), len(prompt), len(kept) + (ended is not None),
                                      "length" if ended is None and len(row) >= gen.max_new_tokens else "stop"))
        return results

    def prompt_ids(self, messages: list[Message], system: str | None, tools: str | None = None) -> list[int]:
        """Token ids of the prompt, encoded exactly as training encoded prompts."""
        return self.template.encode_prompt(messages, system if system is not None else self.default_system, tools)

    def _generate_kwargs(self, ids: list[int], gen: GenerationConfig) -> dict[str, Any]:
        sampling = self.sampling(gen)
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "max_new_tokens": gen.max_new_tokens, "do_sample": sampling["temperature"] > 0,
            "repetition_penalty": gen.repetition_penalty, "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.stop_ids(),
        }
        if kwargs["do_sample"]:
            kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"],
                          top_k=sampling["top_k"] or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def stop_ids(self) -> list[int]:
        """Stop words that are single tokens (longer ones are cut from the text), plus eos."""
        ids = []
        for word in self.template.stop_words:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def adapter_context(self, adapter: bool | str) -> Any:
        """Select an adapter by name (True: the last loaded) or switch adapters off (False) for what follows."""
        if not self.adapters:
            if isinstance(adapter, str):
                raise ModelError(f"no adapter named '{adapter}' is loaded")
            return nullcontext()
        if adapter is False:
            return self.model.disable_adapter()
        name = self.adapters[-1] if adapter is True else adapter
        if name not in self.adapters:
            raise ModelError(f"no adapter named '{name}'; loaded: {', '.join(self.adapters)}")
        self.model.set_adapter(name)
        return nullcontext()


class StopCutter:
    """Text in, piece by piece; text out until a stop word appears (then `stopped`), holding back what could be
    the start of a stop word until the next piece shows it is not."""

    def __init__(self, stop_words: list[str]) -> None:
        self.stop_words = [w for w in stop_words if w]
        self.hold = max((len(w) for w in self.stop_words), default=0)
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text now safe to show ('' when nothing is)."""
        self.buffer += piece
        hits = [self.buffer.index(w) for w in self.stop_words if w in self.buffer]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        if len(self.buffer) <= self.hold:
            return ""
        out, self.buffer = self.buffer[: len(self.buffer) - self.hold], self.buffer[len(self.buffer) - self.hold:]
        return out

    def flush(self) -> str:
        """What was held back, at the end of the text."""
        out, self.buffer = self.buffer, ""
        return out


def cut_at_stop_words(pieces: Iterator[str], stop_words: list[str]) -> Iterator[str]:
    """Pass text through until a stop word appears (returns True then); hold back a possible stop-word start."""
    cutter = StopCutter(stop_words)
    for piece in pieces:
        if out := cutter.feed(piece):
            yield out
        if cutter.stopped:
            for _ in pieces:  # let the generator finish so the worker thread ends
                pass
            return True
    if tail := cutter.flush():
        yield tail
    return False


def load_engine(model_cfg: ModelConfig, template: str = "auto", default_system: str | None = None,
                enable_thinking: bool = True, named: dict[str, str] | None = None,
                tool_format: str | None = None) -> ChatEngine:
    """Base + adapters. model.adapter_path entries stack (earlier ones merged, the last switchable); `named`
    adapters are loaded side by side, each selectable by name. Template and system prompt come from the last
    adapter's run (or a full model folder's) unless given; value heads saved beside the weights load too."""
    from peft import PeftModel

    stacked = [adapter_folder(a) for a in model_cfg.adapter_path]
    separate = {name: adapter_folder(path) for name, path in (named or {}).items()}
    folders = stacked + list(separate.values())
    base = model_cfg
    if folders:
        info = run_info(folders[-1])
        if model_cfg.path == ModelConfig.path and info.get("base_model"):
            base = replace(model_cfg, path=info["base_model"])  # the run knows its base
    base_folder = resolve_model_dir(base)
    if not folders:
        info = run_info(base_folder)  # a full run's model/ folder records its template and stage too
    if model_cfg.infer_backend == "vllm":
        from tuneforge.chat.vllm_engine import load_vllm_engine, require_vllm

        require_vllm()  # before anything loads
        tokenizer = load_tokenizer(replace(base, adapter_path=[]), padding_side="left")
        chosen, system = engine_template(tokenizer, info, template, default_system, enable_thinking, tool_format)
        return load_vllm_engine(base, base_folder, tokenizer, chosen, system, info, stacked, separate)
    tokenizer = load_tokenizer(replace(base, adapter_path=[]), padding_side="left")
    model = load_model(base)
    tokenizer = adopt_saved_vocab(model, tokenizer, folders, base.trust_remote_code)  # tokens a run added
    names: list[str] = []
    loaded = ([(stacked[-1].parent.name if stacked[-1].name == "adapter" else stacked[-1].name, stacked[-1])]
              if stacked else []) + list(separate.items())
    model = merge_adapters(model, [str(folder) for folder in stacked[:-1]])
    with no_bitsandbytes_layers(model):
        for name, folder in loaded:
            if not names:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                model.load_adapter(str(folder), adapter_name=name)
            names.append(name)
    model.eval()
    heads = load_value_heads(model, [(MODEL_HEAD, base_folder), *loaded])
    chosen, system = engine_template(tokenizer, info, template, default_system, enable_thinking, tool_format)
    return ChatEngine(model, tokenizer, chosen, system, names, value_heads=heads, info=info)


def engine_template(tokenizer: Any, info: dict[str, Any], template: str, default_system: str | None,
                    enable_thinking: bool, tool_format: str | None) -> tuple[Template, str | None]:
    """The template and default system prompt: as given, else as the run recorded them."""
    template_name = template if template != "auto" else info.get("template", "auto")
    system = default_system if default_system is not None else info.get("default_system")
    chosen = get_template(template_name, tokenizer, system, info.get("enable_thinking", enable_thinking),
                          tool_format or info.get("tool_format"))
    return chosen, system


def load_value_heads(model: Any, sources: list[tuple[str, Path]]) -> dict[str, ValueHead]:
    """The value head saved in each (name, folder), if any; a folder whose run was stage rm must have one."""
    heads: dict[str, ValueHead] = {}
    for name, folder in sources:
        found = find_value_head(folder)
        if found is None:
            if run_info(folder).get("stage") == "rm":
                raise ModelError(f"{folder} was trained with stage rm but its value head is missing (expected "
                                 "value_head.safetensors beside the weights)")
            continue
        head = ValueHead(hidden_size(model), dropout=0.0)
        load_value_head(found, head)
        heads[name] = head.to(next(model.parameters()).device).eval()
    return heads
