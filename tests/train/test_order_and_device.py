"""disable_shuffling (train.shuffle), data_seed (train.data_seed) and use_cpu (train.device)."""

from __future__ import annotations

import torch

from tuneforge.config import load
from tuneforge.train.batches import BatchPlan, step_batches

LENGTHS = [5, 50, 7, 30, 9, 70, 11, 3]


def epoch_rows(plan: BatchPlan, seed: int, epoch: int = 0, group_by_length: bool = True) -> list[list[int]]:
    steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
    return [b for step in steps for b in step_batches(LENGTHS, plan, step, seed, group_by_length, rank=0)]


def test_disable_shuffling_trains_in_dataset_order_every_epoch():
    cfg = load(None, ["disable_shuffling=true"])
    assert cfg.train.shuffle is False
    plan = BatchPlan(len(LENGTHS), 2, 2, 1, 2, shuffle=cfg.train.shuffle)
    for epoch in (0, 1):  # length grouping would reorder rows, so it is off too
        assert epoch_rows(plan, seed=42, epoch=epoch) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shuffled = BatchPlan(len(LENGTHS), 2, 2, 1, 2)
    assert epoch_rows(shuffled, seed=42) != [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_data_seed_alone_decides_the_order():
    assert load(None, ["data_seed=5"]).train.data_seed == 5
    with_data_seed = BatchPlan(len(LENGTHS), 2, 2, 1, 1, data_seed=5)
    plain = BatchPlan(len(LENGTHS), 2, 2, 1, 1)
    assert epoch_rows(with_data_seed, seed=42) == epoch_rows(plain, seed=5)
    assert epoch_rows(with_data_seed, seed=42) == epoch_rows(with_data_seed, seed=7)  # run seed has no say
    assert epoch_rows(plain, seed=42) != epoch_rows(plain, seed=5)


def test_use_cpu_trains_on_the_cpu_even_with_a_gpu_visible(monkeypatch):
    from tuneforge.run import forward_tokens, make_accelerator

    cfg = load(None, ["use_cpu=true", "bf16=true"])
    assert cfg.train.device == "cpu" and load(None, ["use_cpu=false"]).train.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is "visible"
    acc, precision = make_accelerator(cfg.train)
    assert acc.device.type == "cpu" and precision == "bf16"
    assert forward_tokens(cfg.train) == 1024  # the CPU's forward budget


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about_and_auto_picks_fp32(monkeypatch, caplog):
    """Emulated bf16 matmuls run ~100x slower than fp32 (1 GFLOP/s against 133 on a 2-core AVX2 EPYC): an explicit
    bf16 (LLaMA-Factory's bf16: true) still trains in bf16 but says so and how to change it; auto picks fp32."""
    from tuneforge.run import make_accelerator

    messages = {}
    for native in (False, True):
        monkeypatch.setattr("tuneforge.devices.cpu_bf16_supported", lambda native=native: native)
        caplog.clear()
        assert make_accelerator(load(None, ["use_cpu=true", "bf16=true"]).train)[1] == "bf16"
        messages[native] = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
        assert make_accelerator(load(None, ["train.device=cpu"]).train)[1] == ("bf16" if native else "fp32")
    assert messages[True] == [] and len(messages[False]) == 1
    assert "without native bf16" in messages[False][0]
    assert "train.precision=auto or fp32 (LLaMA-Factory: remove bf16)" in messages[False][0]
