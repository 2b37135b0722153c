"""The loop: learning, accumulation equivalence, packing, resume after kill or Ctrl-C, DDP, plan formula."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.launch import one_process, two_ranks
from tuneforge.train.batches import BatchPlan, pack_rows

from .conftest import snapshot, train_in_process


def test_steps_formula_matches_llamafactory():
    assert BatchPlan(1000, 8, 8, 1, 30).total_steps == 450
    assert BatchPlan(1000, 4, 8, 2, 30).total_steps == 450
    assert BatchPlan(10, 4, 8, 1, 3).total_steps == 3  # fewer micro-batches than accumulation: one step/epoch
    assert BatchPlan(1000, 8, 8, 1, 30, max_steps=7).total_steps == 7
    assert BatchPlan(1000, 8, 8, 1, 2.5).total_steps == 38  # ceil(2.5 * 15)


def test_model_learns_loss_falls_below_half(make_cfg):
    _, _, result = train_in_process(make_cfg("finetune.method=full", "data.max_samples=4", "train.max_steps=40",
                                             "train.learning_rate=3e-3", "train.scheduler=constant"))
    records = [json.loads(line) for line in (Path(make_cfg().output.dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first / 2, (first, last)


def test_grad_accumulation_equals_a_big_batch(make_cfg, tmp_path):
    common = ["finetune.method=full", "train.group_by_length=false", "train.max_steps=2",
              "train.scheduler=constant", "train.learning_rate=1e-1", "train.optimizer=sgd"]
    small, _, _ = train_in_process(make_cfg(*common, "train.batch_size=1", "train.gradient_accumulation_steps=4",
                                            f"output.dir={tmp_path / 'a'}"))
    big, _, _ = train_in_process(make_cfg(*common, "train.batch_size=4", "train.gradient_accumulation_steps=1",
                                          f"output.dir={tmp_path / 'b'}"))
    a, b = snapshot(small), snapshot(big)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_losses_agree(make_cfg, attn):
    from tuneforge.data.build import build_datasets
    from tuneforge.models.load import load_model, load_tokenizer
    from tuneforge.run import training_rows
    from tuneforge.stages.causal_lm import SFTStage
    from tuneforge.templates import get_template

    cfg = make_cfg(f"model.attn_implementation={attn}", "data.max_samples=8")
    tokenizer = load_tokenizer(cfg.model)
    stage = SFTStage(tokenizer.pad_token_id)
    rows, _ = training_rows(build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), 1), cfg, stage)
    model = load_model(cfg.model)
    with torch.no_grad():
        plain = stage.loss(model, stage.collate(rows))
        packed_rows = pack_rows(rows, 512, seed=0)
        assert len(packed_rows) < len(rows)
        packed = stage.loss(model, stage.collate(packed_rows))
    assert int(plain.units) == int(packed.units)
    assert torch.allclose(plain.loss_sum, packed.loss_sum, rtol=1e-5), (plain.loss_sum, packed.loss_sum)


def test_fused_loss_equals_plain_cross_entropy(make_cfg):
    from tuneforge.models.load import load_model
    from tuneforge.stages.causal_lm import causal_lm_loss

    model = load_model(make_cfg().model)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    ours = causal_lm_loss(model, batch)
    logits = model(input_ids=ids).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                  reduction="sum")
    assert torch.allclose(ours.loss_sum, reference, rtol=1e-5) and int(ours.units) == 2 * 7  # labels 5..11 of 12


def write_config(tmp_path: Path, tiny_model_dir: Path, out: str, data: dict | None = None, **train) -> Path:
    cfg = {"model": {"path": str(tiny_model_dir)}, "finetune": {"method": "lora"},
           "data": {"dataset": ["identity"], "template": "chatml", "cutoff_len": 128, "max_samples": 24,
                    "cache_dir": str(tmp_path / "cache"), **(data or {})},
           "train": {"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "precision": "fp32",
                     "logging_steps": 1, **train},
           "output": {"dir": str(tmp_path / out), "plot_loss": False}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


def test_sigkill_then_resume_gives_the_same_weights(tmp_path, tiny_model_dir):
    from tuneforge.cli.main import main

    steps = dict(max_steps=20, save_steps=5)
    reference = write_config(tmp_path, tiny_model_dir, "reference", **steps)
    assert main(["train", str(reference)]) == 0
    killed = write_config(tmp_path, tiny_model_dir, "killed", **steps)
    proc = one_process("train", str(killed))
    state = tmp_path / "killed" / "checkpoints" / "step-5" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.process.is_alive():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert state.exists() and not (tmp_path / "killed" / "adapter").exists(), "run was not interrupted mid-way"
    assert main(["train", str(killed), "train.resume_from_checkpoint=auto"]) == 0
    assert_same(adapter_weights(tmp_path / "killed"), adapter_weights(tmp_path / "reference"), 1e-6)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 20


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model_dir, capsys):
    from tuneforge.cli.main import main

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=60, save_steps=0)
    proc = one_process("train", str(config))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or not metrics.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    code, err = proc.wait(120), proc.stderr()
    assert code == 130, err
    assert "checkpoint saved at step" in err and "Traceback" not in err
    saved = list((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1
    stopped = int(saved[0].name.removeprefix("step-"))
    assert 1 <= stopped < 60, "run was not interrupted mid-way"
    # resuming with another batch layout would not continue the run exactly: refused, naming what changed
    assert main(["train", str(config), "train.resume_from_checkpoint=auto", "train.batch_size=1"]) == 2
    refused = capsys.readouterr().err
    assert "train.batch_size: 2 -> 1" in refused and "train.resume_anyway" in refused, refused
    assert main(["train", str(config), "train.resume_from_checkpoint=auto"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # the resumed run continued at the step after the checkpoint: every step logged once, in order, to the end
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, 61))


def test_two_process_ddp_matches_one_process(tmp_path, tiny_model_dir):
    """Same weights, and the same validation loss: 5 held-out rows (an odd count) evaluated at step 3 are shared
    between the two processes and gathered, each row counted once."""
    from tuneforge.cli.main import main

    common = dict(max_steps=3, save_steps=0, eval_steps=3, gradient_accumulation_steps=1, group_by_length=False)
    val = {"val_size": 5}
    single = write_config(tmp_path, tiny_model_dir, "single", data=val, batch_size=4, **common)
    double = write_config(tmp_path, tiny_model_dir, "ddp", data=val, batch_size=2, **common)
    assert main(["train", str(single)]) == 0
    assert "x 2 process(es)" in two_ranks("train", str(double)).stderr
    assert_same(adapter_weights(tmp_path / "ddp"), adapter_weights(tmp_path / "single"), 1e-5)

    def eval_losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["eval_loss"] for x in lines if "eval_loss" in json.loads(x)]

    assert len(eval_losses("single")) == 1 and eval_losses("ddp") == pytest.approx(eval_losses("single"), rel=1e-5)


def test_save_total_limit_keeps_the_newest(make_cfg):
    from tuneforge.run import train
    from tuneforge.train.checkpoint import list_checkpoints

    run = train(make_cfg("train.max_steps=6", "train.save_steps=1", "train.save_total_limit=2"))
    assert [p.name for p in list_checkpoints(run)] == ["step-4", "step-5"]


def test_split_by_tokens_respects_the_budget():
    from tuneforge.train.batches import split_by_tokens

    rows = [{"input_ids": [0] * n} for n in (100, 120, 90, 600, 10)]
    parts = split_by_tokens(rows, 256)
    assert [[len(r["input_ids"]) for r in p] for p in parts] == [[100, 120], [90], [600], [10]]
    assert split_by_tokens(rows, 0) == [rows]


def test_forward_token_budget_does_not_change_the_result(make_cfg, tmp_path):
    common = ["finetune.method=full", "train.max_steps=2", "train.optimizer=sgd", "train.learning_rate=1e-1",
              "train.scheduler=constant"]
    whole, _, _ = train_in_process(make_cfg(*common, "train.forward_tokens=0", f"output.dir={tmp_path / 'a'}"))
    split, _, _ = train_in_process(make_cfg(*common, "train.forward_tokens=64", f"output.dir={tmp_path / 'b'}"))
    a, b = snapshot(whole), snapshot(split)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


def test_gradient_clipping_bounds_the_update(make_cfg, tmp_path):
    """Plain SGD at lr 1 for one step moves the trained weights by exactly the clipped gradient: its global norm
    is max_grad_norm when clipping applies, larger without clipping."""
    def update_norm(*extra: str) -> float:
        model, before, _ = train_in_process(make_cfg("train.optimizer=sgd", "train.learning_rate=1",
                                                     "train.scheduler=constant", "train.max_steps=1", *extra))
        after = snapshot(model)
        return math.sqrt(sum(float(((after[n] - before[n]) ** 2).sum()) for n in after if "lora_" in n))

    assert update_norm("train.max_grad_norm=0.001") == pytest.approx(0.001, rel=1e-3)
    assert update_norm("train.max_grad_norm=0", f"output.dir={tmp_path / 'free'}") > 0.01


def test_sigterm_and_sigint_stop_the_loop_at_a_step_boundary():
    """Either signal only raises the flag the loop checks after each step (it then saves and returns); the
    previous handlers come back afterwards."""
    from tuneforge.train.loop import stop_on_signals

    previous = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with stop_on_signals() as stopped:
            assert not stopped()
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert stopped()
    assert signal.getsignal(signal.SIGTERM) is previous
