"""infer_backend: vllm. vLLM needs an NVIDIA GPU, so here: the one-line refusals (no GPU, no package, what vLLM
cannot do), and the engine's use of vLLM's API, checked against a stand-in `vllm` module that records what it is
given (the calls follow vLLM's AsyncLLMEngine / SamplingParams / LoRARequest as documented)."""

from __future__ import annotations

import asyncio
import sys
import types
from collections import namedtuple

import pytest

from tuneforge.chat import vllm_engine
from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.config.schema import GenerationConfig, ModelConfig, VllmConfig
from tuneforge.data.types import Message
from tuneforge.errors import ConfigError

WORDS = ["I", " am", " Orb", "weaver", "."]  # the stand-in's answer, one token per piece
Output = namedtuple("Output", "text token_ids finish_reason")
RequestOutput = namedtuple("RequestOutput", "outputs finished")


class StandInEngine:
    """vllm.AsyncLLMEngine's surface: from_engine_args, async generate (cumulative outputs), abort, shutdown."""

    made: list = []
    delay = 0.01  # seconds per token

    def __init__(self, args):
        self.args, self.requests, self.aborted = args, [], []
        StandInEngine.made.append(self)

    @classmethod
    def from_engine_args(cls, args):
        return cls(args)

    async def generate(self, prompt, params, request_id, *, lora_request=None):
        self.requests.append((prompt["prompt_token_ids"], params, request_id, lora_request))
        try:
            for n in range(1, len(WORDS) + 1):
                await asyncio.sleep(self.delay)
                done = n == len(WORDS) or n == params.max_tokens
                reason = ("stop" if n == len(WORDS) else "length") if done else None
                yield RequestOutput([Output("".join(WORDS[:n]), list(range(n)), reason)], done)
                if done:
                    return
        except (asyncio.CancelledError, GeneratorExit):  # as vLLM's AsyncLLM.generate: a caller gone aborts
            await self.abort(request_id)
            raise

    async def abort(self, request_id):
        self.aborted.append(request_id)


class Recorded:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.kwargs = kwargs


@pytest.fixture
def stand_in(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.11.0"
    vllm.AsyncLLMEngine, vllm.AsyncEngineArgs, vllm.SamplingParams = StandInEngine, Recorded, Recorded
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = namedtuple("LoRARequest", "lora_name lora_int_id lora_path")
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")),
                         ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: True)
    StandInEngine.made = []
    return StandInEngine.made


def test_without_a_gpu_vllm_is_refused_in_one_line(tiny_model_dir, capsys):
    assert main(["chat", f"model.path={tiny_model_dir}", "model.infer_backend=vllm"]) == 2
    err = capsys.readouterr().err
    assert "infer_backend: vllm needs an NVIDIA GPU" in err and "huggingface" in err and "Traceback" not in err


def test_without_the_package_vllm_is_refused_in_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: True)
    with pytest.raises(ConfigError, match="pip install vllm"):
        load_engine(ModelConfig(path=str(tiny_model_dir), infer_backend="vllm"))


def test_llamafactory_vllm_keys_map():
    cfg = load(None, ["infer_backend=vllm", "vllm_maxlen=2048", "vllm_gpu_util=0.5", "vllm_enforce_eager=true",
                      "vllm_max_lora_rank=64", 'vllm_config={"max_num_seqs": 8}'])
    assert cfg.model.infer_backend == "vllm"
    assert cfg.model.vllm == VllmConfig(max_len=2048, gpu_util=0.5, enforce_eager=True, max_lora_rank=64,
                                        engine_args={"max_num_seqs": 8})
    with pytest.raises(ConfigError, match="infer_backend: 'sglang'"):
        load(None, ["infer_backend=sglang"])


def test_engine_sends_the_training_prompt_ids_settings_and_adapter(stand_in, tiny_model_dir, tiny_run):
    settings = VllmConfig(max_len=512, gpu_util=0.5, max_lora_rank=1, engine_args={"max_num_seqs": 8})
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)], infer_backend="vllm",
                                     vllm=settings), "chatml")
    (llm,) = stand_in
    assert llm.args.kwargs == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir),
                               "trust_remote_code": False, "dtype": "auto", "max_model_len": 512,
                               "gpu_memory_utilization": 0.5, "enforce_eager": False, "disable_log_stats": True,
                               "enable_log_requests": False, "enable_lora": True, "max_loras": 1,
                               "max_lora_rank": 8,  # the smallest rank vLLM takes
                               "max_num_seqs": 8}
    question = [Message("user", "Who are you?")]
    done = engine.complete(question, GenerationConfig(max_new_tokens=16))
    assert (done.text, done.completion_tokens, done.finish_reason) == ("I am Orbweaver.", 5, "stop")
    ids, params, _, lora = llm.requests[0]
    reference = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)]), "chatml")
    assert ids == reference.prompt_ids(question, None) and done.prompt_tokens == len(ids)
    assert params.kwargs == {"n": 1, "max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                             "repetition_penalty": 1.0, "seed": None, "stop": ["<|im_end|>", "<|im_start|>"],
                             "stop_token_ids": reference.stop_ids(), "skip_special_tokens": False}
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("tiny_a", 1, str(tiny_run / "adapter"))
    # the base model without the adapter; sampling settings as given
    sampled = engine.complete(question, GenerationConfig(max_new_tokens=2, temperature=0.7, top_p=0.9, top_k=5,
                                                         seed=3), adapter=False)
    assert (sampled.text, sampled.finish_reason) == ("I am", "length")
    _, params, _, lora = llm.requests[1]
    assert lora is None and (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.9, 5, 3)
    engine.shutdown()


def test_a_reader_that_leaves_aborts_the_request(stand_in, tiny_model_dir):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), infer_backend="vllm"), "chatml")
    (llm,) = stand_in

    async def first_piece_only():
        pieces = engine.astream([Message("user", "hi")], GenerationConfig(max_new_tokens=16))
        first = await anext(pieces)
        await pieces.aclose()
        return first

    assert asyncio.run(first_piece_only()) == "I"
    (_, _, request_id, _), = llm.requests
    for _ in range(100):  # the abort runs on the engine's own loop
        if llm.aborted:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert llm.aborted == [request_id]
    batch = engine.generate_batch([[Message("user", "a")], [Message("user", "b")]], GenerationConfig())
    assert [c.text for c in batch] == ["I am Orbweaver."] * 2 and len(llm.requests) == 3
    engine.shutdown()


def test_lora_ranks_and_request_logging_follow_vllms_rules():
    # vLLM takes max_lora_rank from a fixed list (vllm/config/lora.py); request logging changed its switch in 0.10.1
    assert [vllm_engine.lora_rank_slot(n) for n in (1, 8, 9, 24, 320, 321)] == [8, 8, 16, 32, 320, 512]
    with pytest.raises(ConfigError, match="up to rank 512"):
        vllm_engine.lora_rank_slot(513)
    assert vllm_engine.request_logging("0.9.2") == {"disable_log_requests": True}
    assert vllm_engine.request_logging("0.10.0") == {"disable_log_requests": True}
    assert vllm_engine.request_logging("0.11.0") == {"enable_log_requests": False}


def test_shutdown_ends_a_waiting_reader(stand_in, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(StandInEngine, "delay", 0.5)
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), infer_backend="vllm"), "chatml")
    (llm,) = stand_in
    pieces = engine.stream([Message("user", "hi")], GenerationConfig(max_new_tokens=16))
    assert next(pieces) == "I"
    engine.shutdown()  # the request is cancelled on the engine's loop; the reader gets its end, not a hang
    assert list(pieces) == [] and len(llm.aborted) == 1
    assert not engine.thread.join(5) and not engine.thread.is_alive()


def test_what_vllm_cannot_do_is_refused(stand_in, tiny_model_dir, tiny_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="one adapter per request and 2 are stacked"):
        load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run), str(tiny_run)],
                                infer_backend="vllm"))
    assert main(["eval", f"model.path={tiny_model_dir}", "model.infer_backend=vllm", "data.dataset=identity",
                 "data.template=chatml", "eval.modes=[loss]", f"eval.dir={tmp_path / 'eval'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.modes: loss" in err and "infer_backend: huggingface" in err and "Traceback" not in err


def test_what_vllm_cannot_serve_is_refused_at_load(tiny_model_dir, tiny_run, tmp_path, tokenizer):
    import json
    import shutil

    # evaluation after training that needs logits: refused when the config loads, not after training
    with pytest.raises(ConfigError, match="eval.modes: loss after training"):
        load(None, ["model.infer_backend=vllm", "eval.after_training=true"])
    load(None, ["model.infer_backend=vllm", "eval.after_training=true", "eval.modes=[predict]"])
    with pytest.raises(ConfigError, match="a reward model \\(stage rm\\) scores with its value head"):
        load(None, ["model.infer_backend=vllm", "stage=rm", "data.dataset=dpo_en_demo"])
    with pytest.raises(ConfigError, match="vllm_config: not valid JSON"):
        load(None, ["infer_backend=vllm", "vllm_config={max_num_seqs: 8"])
    with pytest.raises(ConfigError, match="model.vllm.gpu_util must be in"):
        load(None, ["model.infer_backend=vllm", "model.vllm.gpu_util=1.5"])
    # a reward model's adapter (a value head to score with), and one that trained the embeddings
    reward = shutil.copytree(tiny_run / "adapter", tmp_path / "rm")
    info = json.loads((reward / "tuneforge_run.json").read_text())
    (reward / "tuneforge_run.json").write_text(json.dumps({**info, "stage": "rm"}))
    with pytest.raises(ConfigError, match="is a reward model"):
        vllm_engine.check_servable("rm", reward, tokenizer)
    grown = shutil.copytree(tiny_run / "adapter", tmp_path / "grown")
    config = json.loads((grown / "adapter_config.json").read_text())
    (grown / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(ConfigError, match="added tokens or trained the embeddings"):
        vllm_engine.check_servable("grown", grown, tokenizer)
    vllm_engine.check_servable("plain", tiny_run / "adapter", tokenizer)  # an ordinary adapter passes
