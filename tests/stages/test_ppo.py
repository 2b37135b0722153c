"""Stage ppo on the tiny model through the production path: lora, full and api reward models, metrics, the value
head saved in LLaMA-Factory's layout, exact resume mid-cycle, LF keys and rules."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_json
from tests.train.conftest import snapshot, train_in_process

PROMPTS = [{"instruction": "Count to three.", "output": "1 2 3"}, {"instruction": "Name a colour.", "output": "red"},
           {"instruction": "Say hello.", "output": "hello"}, {"instruction": "Add 1 and 1.", "output": "2"}]
API_KEY = "secret-key"


def random_head(folder: Path, hidden: int = 64, seed: int = 3) -> None:
    from tuneforge.models.valuehead import ValueHead, save_value_head

    torch.manual_seed(seed)
    save_value_head(folder, ValueHead(hidden))


@pytest.fixture(scope="module")
def lora_reward(tmp_path_factory, tiny_model_dir) -> Path:
    """An rm-style LoRA adapter (random, non-zero B) with a value head, as stage rm saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora_rm")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    random_head(folder)
    return folder


@pytest.fixture(scope="module")
def full_reward(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model folder plus a value head: a full reward model."""
    folder = tmp_path_factory.mktemp("full_rm") / "model"
    shutil.copytree(tiny_model_dir, folder)
    random_head(folder, seed=4)
    return folder


@pytest.fixture
def ppo_cfg(tmp_path, tiny_model_dir, dataset_dir):
    from tuneforge.config import load

    write_json(dataset_dir / "prompts.json", PROMPTS)
    write_json(dataset_dir / "dataset_info.json", {"prompts": {"file_name": "prompts.json"}})

    def make(*overrides: str, out: str = "run"):
        base = [f"model.path={tiny_model_dir}", "stage=ppo", "data.dataset=prompts", f"data.dataset_dir={dataset_dir}",
                "data.template=chatml", "data.cutoff_len=128", "train.batch_size=2",
                "train.gradient_accumulation_steps=1", "train.max_steps=2", "train.logging_steps=1",
                "train.save_steps=0", "train.precision=fp32", "train.learning_rate=1e-2", "finetune.method=lora",
                "generation.max_new_tokens=6", f"output.dir={tmp_path / out}", f"data.cache_dir={tmp_path / 'cache'}"]
        return load(None, base + list(overrides))

    return make


def records(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]


def test_ppo_with_a_lora_reward_model(ppo_cfg, lora_reward):
    from tuneforge.run import fit_job, prepare, save_final

    cfg = ppo_cfg(f"reward_model.path={lora_reward}", "ppo.epochs=2")
    job = prepare(cfg)
    assert job.stage.reference.kind == "adapter-off" and job.stage.reward.kind == "lora"
    assert "2 epochs x 1 windows per rollout" in job.plan.stage
    before = snapshot(job.model)
    fit_job(job)
    first, second = records(cfg)
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "vf_clipfrac",
                "response_length", "loss"):
        assert key in first, key
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # a new adapter is the base: policy == reference
    assert first["kl_coef"] == pytest.approx(0.2)
    assert first["clipfrac"] == 0.0  # first pass over a rollout: ratio 1
    # epoch 2 trains on the same rollout: same scores, and the policy moved away from the rollout's
    assert second["reward"] == first["reward"] and second["response_length"] == first["response_length"]
    assert second["approx_kl"] > 0
    after = snapshot(job.model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert any("v_head" in n for n in changed) and any("lora" in n and ".default." in n for n in changed)
    assert not any(f".{'reward'}." in n for n in changed)  # the reward adapter stays frozen
    folder = save_final(Path(cfg.output.dir), job.model, job.tokenizer, job.template, cfg)
    assert (folder / "value_head.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        assert not any("reward" in k for k in f.keys())


def test_lora_reward_scores_match_peft_and_the_saved_head(ppo_cfg, lora_reward, tiny_model_dir):
    from tuneforge.run import prepare

    from ..evaluate.preference_runs import peft_model, reference_score, saved_head

    job = prepare(ppo_cfg(f"reward_model.path={lora_reward}"))
    seqs = [[1, 20, 300, 4000], [5, 60, 700]]
    got = job.stage.reward.score(job.model, seqs, job.tokenizer, job.stage.pad_id, torch.device("cpu"))
    model, head = peft_model(tiny_model_dir, lora_reward), saved_head(lora_reward)
    assert got.tolist() == pytest.approx([reference_score(model, head, s) for s in seqs], abs=1e-5)
    # scoring leaves the policy's own adapter active and trainable
    assert all(p.requires_grad for n, p in job.model.named_parameters() if ".default." in n)


def test_ppo_with_a_full_reward_model_and_full_tuning(ppo_cfg, full_reward):
    from tuneforge.run import prepare

    cfg = ppo_cfg(f"reward_model.path={full_reward}", "reward_model.type=full", "finetune.method=full")
    # the plan counts the separate reward model: the tiny model's fp32 parameters, summed by hand from its shapes
    config = json.loads((full_reward / "config.json").read_text())
    h, inter, layers, vocab = config["hidden_size"], config["intermediate_size"], 2, config["vocab_size"]
    per_layer = h * h * 2 + h * (h // 2) * 2 + 3 * h * inter + 2 * h  # q, o; k, v (2 of 4 heads); mlp; 2 norms
    assert prepare(cfg).plan.reward_model_gb * 2**30 == (vocab * h + layers * per_layer + h) * 4
    model, before, _ = train_in_process(cfg)
    logged = records(cfg)
    assert len(logged) == 2 and all("reward" in r and "value_loss" in r for r in logged)
    after = snapshot(model)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("pretrained_model."))


@pytest.fixture(scope="module")
def score_server(full_reward):
    """`tuneforge api` serving the full reward model on loopback with an API key."""
    import uvicorn

    from tuneforge.chat.engine import load_engine
    from tuneforge.config.schema import ModelConfig
    from tuneforge.serve.api import create_app

    app = create_app(load_engine(ModelConfig(path=str(full_reward))), "tiny-rm", api_key=API_KEY)
    from tuneforge.train.distributed import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/score/evaluation"
    server.should_exit = True
    thread.join(timeout=10)


def test_ppo_with_an_api_reward_model(ppo_cfg, score_server, full_reward):
    from tuneforge.errors import ModelError
    from tuneforge.stages.ppo import api_scores

    cfg = ppo_cfg(f"reward_model.path={score_server}", "reward_model.type=api", f"reward_model.api_key={API_KEY}")
    train_in_process(cfg)
    assert [type(r["reward"]) for r in records(cfg)] == [float, float]
    # the API's score of a text is the full reward model's score of its tokens (texts are decoded, so a run's
    # rewards may differ slightly from in-process scoring where decode/encode does not round-trip)
    from tuneforge.run import prepare

    job = prepare(ppo_cfg(f"reward_model.path={full_reward}", "reward_model.type=full", out="full"))
    ids = job.tokenizer.encode("hello world, a score", add_special_tokens=False)
    direct = job.stage.reward.score(job.model, [ids], job.tokenizer, job.stage.pad_id, torch.device("cpu"))
    assert api_scores(score_server, ["hello world, a score"], API_KEY) == pytest.approx(direct.tolist(), abs=1e-5)
    with pytest.raises(ModelError, match="HTTP 401.*api_key"):
        api_scores(score_server, ["hello"], "wrong")
    with pytest.raises(ModelError, match="cannot be reached"):
        api_scores("http://127.0.0.1:9/v1/score/evaluation", ["hello"], None, timeout=5)


def test_resume_mid_cycle_reproduces_the_uninterrupted_run(ppo_cfg, lora_reward, tmp_path):
    from tuneforge.run import fit_job, prepare

    steps = [f"reward_model.path={lora_reward}", "ppo.epochs=2", "ppo.score_norm=true", "train.max_steps=5",
             "train.save_steps=3"]
    whole = ppo_cfg(*steps, out="whole")
    whole_model, _, _ = train_in_process(whole)
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step-3" / "stage_state.json").read_text())
    resumed = ppo_cfg(*steps, "train.resume_from_checkpoint=auto", out="resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    job = prepare(resumed)
    fit_job(job)
    a, b = snapshot(whole_model), snapshot(job.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    keys = ("reward", "kl", "kl_coef", "loss", "value_loss", "response_length")
    assert [{k: r[k] for k in keys} for r in records(whole)[3:]] == [{k: r[k] for k in keys} for r in records(resumed)]
    # step 3 is the second pass over cycle 2's rollout: the rollout was checkpointed
    assert state["step"] == 3 and len(state["windows"]) == 1 and state["moments"]["count"] >= 4


def test_validation_prompts_are_scored_without_moving_the_kl_controller(ppo_cfg, lora_reward, dataset_dir):
    write_json(dataset_dir / "held_out.json", [{"instruction": "Spell cat.", "output": "c a t"},
                                               {"instruction": "Name a day.", "output": "Monday"}])
    write_json(dataset_dir / "dataset_info.json", {"prompts": {"file_name": "prompts.json"},
                                                   "held_out": {"file_name": "held_out.json"}})
    steps = [f"reward_model.path={lora_reward}", "ppo.epochs=1", "ppo.score_norm=true", "train.max_steps=3"]
    plain = ppo_cfg(*steps, out="plain")
    plain_model, _, _ = train_in_process(plain)
    evaluated = ppo_cfg(*steps, "data.eval_dataset=held_out", "train.eval_steps=1", out="evaluated")
    model, _, _ = train_in_process(evaluated)
    a, b = snapshot(plain_model), snapshot(model)
    assert all(torch.equal(a[n], b[n]) for n in a)  # same weights: evaluation changed no training state
    trained = [r for r in records(evaluated) if "eval_loss" not in r]
    assert [r["kl_coef"] for r in trained] == [r["kl_coef"] for r in records(plain)]
    evals = [r for r in records(evaluated) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    for key in ("eval_reward", "eval_kl", "eval_value_loss", "eval_response_length", "eval_reward_normalized"):
        assert key in evals[0], key
    assert 0 < evals[0]["eval_response_length"] <= 6


def test_ppo_config_keys_and_rules(ppo_cfg, lora_reward):
    from tuneforge.config.llamafactory import map_key
    from tuneforge.errors import ConfigError

    keys = {"reward_model": "saves/rm", "reward_model_type": "full", "reward_model_adapters": ["a"],
            "reward_model_quantization_bit": 4, "ppo_buffer_size": 2, "ppo_epochs": 3, "ppo_score_norm": True,
            "ppo_target": 4.0, "ppo_whiten_rewards": True}
    assignments = dict(a for key, value in keys.items() for a in map_key(key, value)[0])
    assert assignments == {"reward_model.path": "saves/rm", "reward_model.type": "full",
                           "reward_model.adapters": ["a"], "reward_model.quantization_bit": 4,
                           "ppo.buffer_size": 2, "ppo.epochs": 3, "ppo.score_norm": True, "ppo.target": 4.0,
                           "ppo.whiten_rewards": True}
    cfg = ppo_cfg(f"reward_model.path={lora_reward}")
    assert (cfg.ppo.epochs, cfg.ppo.buffer_size, cfg.ppo.target, cfg.ppo.init_kl_coef, cfg.ppo.vf_coef) == \
        (4, 1, 6.0, 0.2, 0.1)
    with pytest.raises(ConfigError, match="needs a reward model"):
        ppo_cfg()
    with pytest.raises(ConfigError, match="finetune.method=lora"):
        ppo_cfg(f"reward_model.path={lora_reward}", "finetune.method=full")
    with pytest.raises(ConfigError, match="http"):
        ppo_cfg(f"reward_model.path={lora_reward}", "reward_model.type=api")
    with pytest.raises(ConfigError, match="type=full"):
        ppo_cfg(f"reward_model.path={lora_reward}", "reward_model.quantization_bit=4")
    with pytest.raises(ConfigError, match="ppo.epochs"):
        ppo_cfg(f"reward_model.path={lora_reward}", "ppo.epochs=0")


def test_llamafactorys_ppo_example_runs_unchanged(tmp_path, tiny_model_dir, lora_reward):
    """LLaMA-Factory's llama3_lora_ppo.yaml (v0.9.3, its last PPO example): flat `reward_model: path`, its generation
    keys; only the model, output and sizes change."""
    from tuneforge.cli.main import main
    from tuneforge.config import load

    example = Path(__file__).parents[1] / "fixtures" / "llamafactory" / "llama3_lora_ppo_v0.9.3.yaml"
    cfg = load(example)
    assert (cfg.stage, cfg.reward_model.path, cfg.reward_model.type) == ("ppo", "saves/llama3-8b/lora/reward", "lora")
    assert (cfg.generation.max_new_tokens, cfg.generation.top_k, cfg.generation.top_p) == (512, 0, 0.9)
    out = tmp_path / "ppo"
    assert main(["train", str(example), "--model_name_or_path", str(tiny_model_dir), "--reward_model",
                 str(lora_reward), "--output_dir", str(out), "--template", "chatml", "--max_samples", "4",
                 "--max_steps", "2", "--max_new_tokens", "6", "--gradient_accumulation_steps", "1",
                 "--cutoff_len", "96"]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and "reward" in logged[-1]
