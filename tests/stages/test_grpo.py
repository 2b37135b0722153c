"""Stage grpo on the tiny model through the production path (run.prepare + run.fit_job): learning, exact resume,
reference only with beta > 0, extra columns reaching reward functions, completions.jsonl; prompt data; config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_json
from tests.train.conftest import snapshot, train_in_process

PROMPTS = [{"instruction": "Count to three.", "output": "1 2 3", "target": "a"},
           {"instruction": "Name a colour.", "output": "red", "target": "b"},
           {"instruction": "Say hello.", "output": "hello", "target": "c"},
           {"instruction": "Add 1 and 1.", "output": "2", "target": "d"}]

REWARDS = '''
import json, os


def low_ids(completions, completion_ids, **kwargs):
    """Share of completion tokens whose id is below 24000 (about half of them for an untrained model)."""
    return [sum(t < 24000 for t in ids) / len(ids) for ids in completion_ids]


def seen(prompts, completions, completion_ids, target, answer, **kwargs):
    """Records what it was called with; rewards the completion length."""
    with open(os.environ["GRPO_SEEN"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "target": target, "answer": answer}) + "\\n")
    return [float(len(ids)) for ids in completion_ids]
'''


@pytest.fixture
def grpo_cfg(tmp_path, tiny_model_dir, dataset_dir):
    """A grpo config on a four-prompt alpaca set with extra columns, rewards from a file."""
    from tuneforge.config import load

    write_json(dataset_dir / "prompts.json", PROMPTS)
    write_json(dataset_dir / "dataset_info.json", {"prompts": {"file_name": "prompts.json"}})
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS, encoding="utf-8")

    def make(*overrides: str, reward: str = "low_ids", out: str = "run"):
        base = [f"model.path={tiny_model_dir}", "stage=grpo", "data.dataset=prompts", f"data.dataset_dir={dataset_dir}",
                "data.template=chatml", "data.cutoff_len=128", "train.batch_size=2", "train.gradient_accumulation_steps=1",
                "train.max_steps=3",
                "train.logging_steps=1", "train.save_steps=0", "train.precision=fp32", "train.learning_rate=1e-2",
                "finetune.method=full", "generation.top_k=4", "grpo.num_generations=4",
                "grpo.max_completion_length=8", f"grpo.reward_funcs=[{rewards}:{reward}]",
                f"output.dir={tmp_path / out}", f"data.cache_dir={tmp_path / 'cache'}"]
        return load(None, base + list(overrides))

    return make


def records(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_mean_reward(grpo_cfg):
    # Sampling among each position's 4 likeliest tokens, a reward on which of them is picked is learnable fast.
    cfg = grpo_cfg("train.max_steps=12")
    model, before, _ = train_in_process(cfg)
    rewards = [r["reward"] for r in records(cfg)]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    first = records(cfg)[0]
    for key in ("reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert key in first, key
    assert "kl" not in first  # beta 0: no reference, no KL
    # with one iteration per rollout the ratio is exactly 1: the clipped surrogate never clips
    assert first["clip_ratio/region_mean"] == 0.0
    assert first["completions/mean_length"] == 8.0 and first["completions/clipped_ratio"] == 1.0
    after = snapshot(model)
    assert any(not torch.equal(after[n], before[n]) for n in after)


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_mid_run_reproduces_the_uninterrupted_run(grpo_cfg, tmp_path, iterations):
    from tuneforge.run import fit_job, prepare

    steps = [f"grpo.num_iterations={iterations}", "train.max_steps=5", "train.save_steps=3"]
    whole = grpo_cfg(*steps, out="whole")
    whole_model, _, _ = train_in_process(whole)
    # a second run that starts from the first run's step-3 checkpoint (step 3 is mid-rollout with 2 iterations)
    resumed = grpo_cfg(*steps, "train.resume_from_checkpoint=auto", out="resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    job = prepare(resumed)
    fit_job(job)
    a, b = snapshot(whole_model), snapshot(job.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    tail = [{k: v for k, v in r.items() if k.startswith(("reward", "completions", "loss"))}
            for r in records(whole)[3:]]
    assert tail == [{k: v for k, v in r.items() if k.startswith(("reward", "completions", "loss"))}
                    for r in records(resumed)]


def test_beta_zero_loads_no_reference_and_beta_positive_trains_against_one(grpo_cfg):
    from tuneforge.run import prepare

    assert prepare(grpo_cfg()).stage.reference is None
    cfg = grpo_cfg("grpo.beta=0.1", "train.max_steps=2", "finetune.method=lora")
    model, _, _ = train_in_process(cfg)
    logged = records(cfg)
    # step 1: a new adapter is the base, so policy == reference and k3 KL is 0; after an update it is > 0
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert logged[1]["kl"] > 0


def test_extra_columns_reach_reward_functions_and_completions_are_written(grpo_cfg, tmp_path, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("GRPO_SEEN", str(seen))
    cfg = grpo_cfg("train.max_steps=2", "grpo.completions_logged=3", reward="seen")
    train_in_process(cfg)
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2
    by_prompt = {p["instruction"]: p for p in PROMPTS}
    for call in calls:
        assert len(call["prompts"]) == 8  # 2 prompts x 4 completions, each prompt repeated contiguously
        assert call["prompts"][:4] == [call["prompts"][0]] * 4
        assert call["target"] == [by_prompt[p]["target"] for p in call["prompts"]]
        assert call["answer"] == [by_prompt[p]["output"] for p in call["prompts"]]
    lines = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 1, 1, 2, 2, 2]
    assert all(line["prompt"] in by_prompt and isinstance(line["completion"], str) for line in lines)
    assert all(line["reward"] == line["rewards"]["seen"] for line in lines)


def test_validation_prompts_are_sampled_scored_and_leave_training_alone(grpo_cfg, dataset_dir, tmp_path,
                                                                        monkeypatch):
    from tuneforge.run import prepare
    from tuneforge.train.loop import LossModule, evaluate

    monkeypatch.setenv("GRPO_SEEN", str(tmp_path / "seen.jsonl"))
    write_json(dataset_dir / "held_out.json", [{"instruction": "Spell cat.", "output": "c a t", "target": "e"},
                                               {"instruction": "Name a day.", "output": "Monday", "target": "f"}])
    write_json(dataset_dir / "dataset_info.json", {"prompts": {"file_name": "prompts.json"},
                                                   "held_out": {"file_name": "held_out.json"}})
    plain = grpo_cfg("train.max_steps=2", reward="seen", out="plain")
    plain_model, _, _ = train_in_process(plain)
    evaluated = grpo_cfg("train.max_steps=2", "data.eval_dataset=held_out", "train.eval_steps=1",
                         "train.eval_batch_size=1", reward="seen", out="evaluated")
    model, _, _ = train_in_process(evaluated)
    # sampling for evaluation uses its own seeds: the training run is the same as without it
    a, b = snapshot(plain_model), snapshot(model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    logged = records(evaluated)
    evals = [r for r in logged if "eval_reward" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:  # the reward is the completion length in tokens, so both metrics must agree
        assert r["eval_reward"] == pytest.approx(r["eval_completions/mean_length"])
        assert r["eval_rewards/seen/mean"] == pytest.approx(r["eval_reward"])
    calls = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    eval_prompts = [c["prompts"] for c in calls if c["target"][0] in ("e", "f")]
    assert eval_prompts == [["Spell cat."] * 4, ["Name a day."] * 4] * 2  # batch 1: one prompt x 4 completions
    # evaluating the same weights twice samples the same completions
    job = prepare(grpo_cfg("data.eval_dataset=held_out", "train.eval_batch_size=2", reward="seen", out="twice"))
    module = job.context.accelerator.prepare(LossModule(job.model, job.stage))
    first = evaluate(module, job.stage, job.val_rows, 2, job.context.accelerator)
    assert evaluate(module, job.stage, job.val_rows, 2, job.context.accelerator) == first
    assert job.stage.step == 0 and not (tmp_path / "twice" / "completions.jsonl").exists()


def test_plan_counts_the_rollout(grpo_cfg, tmp_path):
    from tuneforge.run import measure_time, prepare

    job = prepare(grpo_cfg())
    assert "2 prompts x 4 = 8 completions, up to 64 generated tokens" in job.plan.stage
    # generation memory of one rollout batch, by hand: tiny Llama, 2 layers x 2 KV heads x head dim 16, fp32
    # weights; 2 prompts x 4 completions = 8 rows of (longest prompt + 8 new tokens); 4 fp32 [rows, vocab] buffers
    longest = max(len(r["input_ids"]) for r in job.train_rows)
    vocab = job.model.config.vocab_size
    expected = 2 * 2 * 2 * 16 * 8 * (longest + 8) * 4 + 4 * 8 * vocab * 4
    assert job.plan.generation_gb * 2**30 == pytest.approx(expected)
    # --plan measures two steps: the rollout's share is reported, nothing is written to the run folder
    measure_time(job)
    assert 0 < job.plan.generation_seconds <= job.plan.rollout_seconds
    assert not (tmp_path / "run" / "completions.jsonl").exists()


def test_prompt_rows_of_every_format_keep_the_answer_and_extra_columns(dataset_dir, tokenizer):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.build import build_datasets
    from tuneforge.templates import get_template

    write_json(dataset_dir / "a.json", [{"instruction": "2+3?", "input": "", "output": "5", "level": 1}])
    write_json(dataset_dir / "s.json", [{"conversations": [{"from": "human", "value": "2+2?"},
                                                           {"from": "gpt", "value": "4"}], "solution": "4"}])
    write_json(dataset_dir / "o.json", [{"messages": [{"role": "system", "content": "Be brief"},
                                                      {"role": "user", "content": "1+1?"}], "answer": "2"}])
    openai_tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                   "system_tag": "system"}
    write_json(dataset_dir / "dataset_info.json", {
        "a": {"file_name": "a.json"}, "s": {"file_name": "s.json", "formatting": "sharegpt"},
        "o": {"file_name": "o.json", "formatting": "openai", "columns": {"messages": "messages"}, "tags": openai_tags}})
    template = get_template("chatml", tokenizer, None, True, None)
    data = build_datasets(DataConfig(dataset=["a", "s", "o"], dataset_dir=str(dataset_dir)), "prompt", template, 1)
    rows = list(data.train)
    assert [json.loads(r["columns"]) for r in rows] == [{"level": 1, "answer": "5"}, {"solution": "4", "answer": "4"},
                                                        {"answer": "2"}]
    assert [r["prompt"] for r in rows] == ["2+3?", "2+2?", "1+1?"]
    from tuneforge.data.types import Message

    assert rows[2]["input_ids"] == template.encode_prompt([Message("user", "1+1?")], "Be brief", None)
    assert rows[1]["input_ids"] == template.encode_prompt([Message("user", "2+2?")], None, None)


def test_grpo_config_keys_and_rules(grpo_cfg):
    from tuneforge.config.llamafactory import map_key
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="num_generations"):
        grpo_cfg("grpo.num_generations=1")
    with pytest.raises(ConfigError, match="reward function"):
        grpo_cfg("grpo.reward_funcs=[]")
    with pytest.raises(ConfigError, match="reward_weights"):
        grpo_cfg("grpo.reward_weights=[1.0, 2.0]")
    assert grpo_cfg("grpo.beta=0").grpo.beta == 0  # pref_beta 0 is valid for grpo (not a dpo/kto beta)
    keys = {"num_generations": 4, "grpo_loss": "bnpo", "pref_beta": 0.04, "reward_funcs": ["r.py:f"]}
    assignments = dict(a for key, value in keys.items() for a in map_key(key, value)[0])
    assert assignments["grpo.num_generations"] == 4 and assignments["grpo.loss_type"] == "bnpo"
    assert assignments["grpo.beta"] == 0.04 and assignments["grpo.reward_funcs"] == ["r.py:f"]


def test_nucleus_from_top_k_keeps_what_transformers_top_p_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    from tuneforge.stages.grpo import NucleusFromTopK

    torch.manual_seed(0)
    # rows from peaked (nucleus inside the top 64) to flat (nucleus past them: those rows are sorted whole)
    scores = torch.randn(12, 5000) * torch.linspace(0.5, 12, 12)[:, None]
    for top_p in (0.5, 0.9, 0.95):
        expected = TopPLogitsWarper(top_p)(None, scores.clone())
        got = NucleusFromTopK(top_p, k=64)(None, scores.clone())
        assert torch.equal(got, expected)
        narrow = ((scores.topk(64).values - scores.logsumexp(-1, keepdim=True)).exp().sum(-1) >= top_p).sum()
        assert 0 < narrow < 12  # both paths were taken
