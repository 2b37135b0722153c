"""Launches beyond one process with tuneforge's loop: real 2-process runs of the tiny model over gloo (DeepSpeed
ZeRO-2/3 and FSDP2 against DDP, their resumes, two nodes through tuneforge's torchrun re-launch), LLaMA-Factory's
own DeepSpeed examples under torchrun and accelerate configs under `accelerate launch`, and the config and launcher
checks (in-process). A launch through torchrun or accelerate costs ~12 s here, nearly all of it two processes
importing torch and transformers; the comparison runs therefore start their two ranks from tests/launch.py's
forkserver (torchrun's environment, the same entry point, imports paid once), and the launchers keep the runs that
test them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.launch import two_ranks
from tuneforge.errors import ConfigError
from tuneforge.train.distributed import fill_deepspeed_config, free_port, read_deepspeed_config

LF = Path(__file__).parents[1] / "fixtures" / "llamafactory"
DS = LF / "examples" / "deepspeed"


def write_config(tmp_path: Path, model: Path, out: str, **train) -> Path:
    # 3 validation rows evaluated one per forward at steps 3 and 4: the two processes make 2 and 1 forward passes, which
    # sharded weights (gathered inside each forward) must get through without hanging
    cfg = {"model": {"path": str(model)}, "finetune": {"method": "lora"},
           "data": {"dataset": ["identity"], "template": "chatml", "cutoff_len": 128, "max_samples": 24,
                    "val_size": 3, "cache_dir": str(tmp_path / "cache")},
           "train": {"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "max_steps": 4,
                     "logging_steps": 1, "save_steps": 0, "group_by_length": False, "eval_steps": 3,
                     "eval_batch_size": 1, **train},
           "output": {"dir": str(tmp_path / out), "plot_loss": False}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m tuneforge ...` (gloo on this CPU host)."""

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def records(run: Path) -> list[dict]:
    """The training lines of metrics.jsonl."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def evals(run: Path) -> list[dict]:
    """The evaluation lines of metrics.jsonl."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items()}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir) -> Path:
    """DDP with bf16 autocast (2 processes): the reference run."""
    tmp = tmp_path_factory.mktemp("ddp")
    two_ranks("train", str(write_config(tmp, tiny_model_dir, "ddp", precision="bf16")))
    return tmp / "ddp"


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_model_dir) -> Path:
    """ZeRO-3 (LF's ds_z3_config.json), LoRA, bf16, a checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("zero3")
    path = write_config(tmp, tiny_model_dir, "z3", precision="bf16", deepspeed=str(DS / "ds_z3_config.json"),
                        save_steps=2)
    assert "x 2 process(es)" in two_ranks("train", str(path)).stderr
    return tmp / "z3"


def matches_ddp_up_to_bf16(run: Path, ddp: Path) -> None:
    # DeepSpeed's bf16 casts the whole module (LoRA weights too, fp32 master copies in the optimizer) where DDP
    # autocasts: the same run up to bf16 rounding. AdamW moves each weight by at most ~lr (1e-3) per step.
    ours, ref = records(run), records(ddp)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]
    assert [r["lr"] for r in ours] == [r["lr"] for r in ref]
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert worst(adapter(run), adapter(ddp)) < 4 * 1e-3
    # evaluation over partitioned weights: the processes' uneven forward counts kept in step, fillers not counted
    assert [r["step"] for r in evals(run)] == [r["step"] for r in evals(ddp)] == [3, 4]
    assert [r["eval_loss"] for r in evals(run)] == pytest.approx([r["eval_loss"] for r in evals(ddp)], rel=2e-3)


def test_zero3_lora_bf16_matches_ddp_within_bf16_tolerance(zero3, ddp):
    matches_ddp_up_to_bf16(zero3, ddp)


def test_zero2_lora_bf16_matches_ddp_within_bf16_tolerance(ddp, tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, "z2", precision="bf16", deepspeed=str(DS / "ds_z2_config.json"))
    two_ranks("train", str(path))
    matches_ddp_up_to_bf16(tmp_path / "z2", ddp)


def test_zero3_resume_gives_the_same_weights(zero3, tmp_path, tiny_model_dir):
    step2 = zero3 / "checkpoints" / "step-2"
    assert sorted(p.name for p in (step2 / "deepspeed").iterdir()) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    # the checkpoint's user-facing adapter holds the gathered weights, not ZeRO-3's empty partitions
    saved = load_file(str(step2 / "adapter" / "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in saved.values())
    # a run that starts from the step-2 checkpoint (as after a kill) ends where the whole run ended
    resumed = write_config(tmp_path, tiny_model_dir, "resumed", precision="bf16", save_steps=2,
                           deepspeed=str(DS / "ds_z3_config.json"), resume_from_checkpoint="auto")
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / "step-2")
    done = two_ranks("train", str(resumed))
    assert "resumed from" in done.stderr
    assert worst(adapter(tmp_path / "resumed"), adapter(zero3)) == 0.0
    assert [r["loss"] for r in records(tmp_path / "resumed")] == [r["loss"] for r in records(zero3)[2:]]


@pytest.mark.parametrize("example", ["train_lora/qwen3_lora_sft_ds3.yaml", "train_full/qwen3_full_sft.yaml"])
def test_llamafactorys_deepspeed_examples_run_under_torchrun(example, tmp_path, tiny_model_dir):
    # LF's files unchanged (deepspeed: examples/deepspeed/ds_z3_config.json, relative to LF's folder, as LF runs
    # them); only the model, output and sizes change.
    out = tmp_path / "run"
    torchrun("train", str(LF / "examples" / example), f"model_name_or_path={tiny_model_dir}", f"output_dir={out}",
             "max_samples=8", "cutoff_len=96", "max_steps=2", "preprocessing_num_workers=1",
             "dataloader_num_workers=0", "save_steps=1", cwd=LF)
    assert records(out)[-1]["step"] == 2
    weights = out / ("adapter/adapter_model.safetensors" if "lora" in example else "model/model.safetensors")
    assert weights.is_file()
    assert (out / "checkpoints" / "step-1" / "deepspeed").is_dir()


def test_two_nodes_through_the_relaunch_match_one_node(ddp, tmp_path, tiny_model_dir):
    # Two `tuneforge train` commands, each one node of one process (LLaMA-Factory's NNODES / NODE_RANK /
    # NPROC_PER_NODE / MASTER_ADDR / MASTER_PORT, FORCE_TORCHRUN: tuneforge re-launches itself under torchrun),
    # rendezvous on 127.0.0.1 and train what one node with 2 processes trained.

    path = write_config(tmp_path, tiny_model_dir, "nodes", precision="bf16")
    port = str(free_port())
    procs = []
    for rank in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
        env.update(FORCE_TORCHRUN="1", NNODES="2", NODE_RANK=rank, NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    assert "x 2 process(es)" in outputs[0][1]
    assert [r["loss"] for r in records(tmp_path / "nodes")] == pytest.approx(
        [r["loss"] for r in records(ddp)], rel=1e-6)
    assert worst(adapter(tmp_path / "nodes"), adapter(ddp)) < 1e-6


def accelerate_launch(config_file: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file FILE -m tuneforge ...` (the file's num_processes: 2)."""

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                           "--main_process_port", str(free_port()), "-m", "tuneforge", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_llamafactorys_fsdp2_config_shards_lora_and_matches_ddp(ddp, tmp_path, tiny_model_dir):
    # LF's accelerate config unchanged (use_cpu: false, FSDP2 with FULL_SHARD). accelerate itself would train plain
    # DDP on this CPU host without saying so; tuneforge shards with fully_shard: LoRA with autocast bf16 is then the
    # same computation as DDP's, and the checkpoint holds each rank's shard.
    path = write_config(tmp_path, tiny_model_dir, "fsdp", precision="bf16", save_steps=2)
    done = accelerate_launch(LF / "examples" / "accelerate" / "fsdp2_config.yaml", "train", str(path))
    assert "FSDP2 over 2 process(es)" in done.stderr and done.stdout.count("run folder:") == 1
    ours, ref = records(tmp_path / "fsdp"), records(ddp)
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], rel=1e-6)
    assert worst(adapter(tmp_path / "fsdp"), adapter(ddp)) < 1e-6
    assert [r["eval_loss"] for r in evals(tmp_path / "fsdp")] == pytest.approx(
        [r["eval_loss"] for r in evals(ddp)], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-2" / "fsdp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    # resumed from the step-2 checkpoint (train.fsdp under torchrun this time): the same last steps, bit for bit
    resumed = write_config(tmp_path, tiny_model_dir, "resumed", precision="bf16", save_steps=2,
                           resume_from_checkpoint="auto", fsdp={"enabled": True})
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    assert "resumed from" in two_ranks("train", str(resumed)).stderr
    assert worst(adapter(tmp_path / "resumed"), adapter(tmp_path / "fsdp")) == 0.0
    assert [r["loss"] for r in records(tmp_path / "resumed")] == [r["loss"] for r in records(tmp_path / "fsdp")[2:]]


def test_fsdp_full_finetuning_matches_ddp_and_resumes_exactly(tmp_path, tiny_model_dir):
    # DDP under torchrun against LF's FSDP1 accelerate config (run as FSDP2 with the same sharding; the YAML's
    # mixed_precision gives way to the run's precision, fp32 here, as LF's own bf16/fp16 keys do)
    full = {"finetune": {"method": "full"}}
    runs = {}
    for name in ("ddp", "fsdp"):
        path = write_config(tmp_path, tiny_model_dir, name, precision="fp32", save_steps=2)
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **full}))
        if name == "ddp":
            two_ranks("train", str(path))
        else:
            done = accelerate_launch(LF / "examples" / "accelerate" / "fsdp_config.yaml", "train", str(path))
            assert "FSDP2 over 2 process(es)" in done.stderr
        runs[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    ours, ref = records(tmp_path / "fsdp"), records(tmp_path / "ddp")
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    # the norm sums fp32 squares over shards and ranks in another order than DDP's bucketed all-reduce
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in ref], rel=5e-4)
    # every weight moved by the same updates (fp32 sums in another order), the tied head saved once as DDP does
    assert runs["fsdp"].keys() == runs["ddp"].keys()
    assert worst(runs["fsdp"], runs["ddp"]) < 1e-6
    assert [r["step"] for r in evals(tmp_path / "fsdp")] == [3, 4]
    assert [r["eval_loss"] for r in evals(tmp_path / "fsdp")] == pytest.approx(
        [r["eval_loss"] for r in evals(tmp_path / "ddp")], rel=1e-6)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all((runs["fsdp"][k] - start[k]).abs().max() > 0 for k in runs["fsdp"])
    # the user-facing checkpoint weights are gathered whole (not rank 0's shard)
    step2 = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert {k: tuple(v.shape) for k, v in step2.items() if k in start} == {
        k: tuple(start[k].shape) for k in step2 if k in start}
    resumed = write_config(tmp_path, tiny_model_dir, "resumed", precision="fp32", save_steps=2,
                           resume_from_checkpoint="auto", fsdp={"enabled": True})
    resumed.write_text(yaml.safe_dump({**yaml.safe_load(resumed.read_text()), **full}))
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    two_ranks("train", str(resumed))
    assert worst(load_file(str(tmp_path / "resumed" / "model" / "model.safetensors")), runs["fsdp"]) == 0.0
    assert [r["loss"] for r in records(tmp_path / "resumed")] == [r["loss"] for r in ours[2:]]


# ------------------------------------------------------------------------------------ config checks (in-process)


def test_autos_are_filled_from_the_run_config():
    filled = fill_deepspeed_config(read_deepspeed_config(str(DS / "ds_z3_config.json")), 4, 0.5, "bf16", "z3")
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 1
    assert filled["gradient_clipping"] == 0.5 and filled["train_batch_size"] == "auto"
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 3


def test_broken_deepspeed_configs_give_one_message(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: .* line 1, column 35"):
        read_deepspeed_config(str(bad))
    bad.write_text('{"zero_optimization": {"stage": 4}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="zero_optimization.stage 4 does not exist"):
        read_deepspeed_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        read_deepspeed_config(str(tmp_path / "missing.json"))
    config = {"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps"):
        fill_deepspeed_config(config, 2, 1.0, "bf16", "ds.json")
    with pytest.raises(ConfigError, match="train.precision is fp32"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, 2, 1.0, "fp32", "ds.json")


def test_a_world_size_the_group_does_not_have_is_refused(monkeypatch):
    from tuneforge.train.distributed import check_world_size

    class Alone:  # what accelerate reports when the launcher's processes failed to form one group
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE.*each process would train on its own"):
        check_world_size(Alone())


def test_the_deepspeed_key_maps_from_llamafactory():
    from tuneforge.config.llamafactory import map_key

    assert map_key("deepspeed", "examples/deepspeed/ds_z3_config.json")[0] == [
        ("train.deepspeed", "examples/deepspeed/ds_z3_config.json")]


def test_the_relaunch_follows_llamafactorys_environment(monkeypatch):
    from tuneforge.train.distributed import torchrun_command

    for key in ("WORLD_SIZE", "LOCAL_RANK", "FORCE_TORCHRUN", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
                "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert torchrun_command(["cfg.yaml"]) is None  # one process, no GPUs: no relaunch
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("MASTER_PORT", "29555")
    command = torchrun_command(["cfg.yaml", "train.max_steps=3"])
    assert command[1:] == ["-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", "29555", "-m", "tuneforge", "train",
                           "cfg.yaml", "train.max_steps=3"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under a launcher
    assert torchrun_command(["cfg.yaml"]) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        torchrun_command(["cfg.yaml"])


def test_the_plan_shards_memory_by_zero_stage(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.train.plan import estimate_memory

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # full tuning, fp32
    n = sum(p.numel() for p in model.parameters())
    plain = estimate_memory(model, 256, "fp32")
    # per process, over 2: stage 1 halves AdamW's 8 bytes per weight, stage 2 also the 4 bytes of gradient,
    # stage 3 also the 4 bytes of weight (fp32 needs no master copy)
    saved = {stage: plain - estimate_memory(model, 256, "fp32", zero_stage=stage, world=2) for stage in (0, 1, 2, 3)}
    assert saved == {0: 0, 1: 4 * n, 2: 6 * n, 3: 8 * n}
    # FSDP2 over 2: weights (4 bytes), gradients (4) and AdamW's moments (8) all halved, but the root unit (the tied
    # embedding/head, the final norm) and two decoder layers are held whole while they compute
    vocab, hidden, inter, kv = model.config.vocab_size, 64, 128, 32
    layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3 + 2 * hidden
    root = vocab * hidden + hidden
    assert n == root + 2 * layer
    assert plain - estimate_memory(model, 256, "fp32", world=2, fsdp=True) == 16 * n / 2 - 4 * (root + 2 * layer)


def test_accelerate_configs_asking_for_fsdp_or_deepspeed(monkeypatch, tmp_path):
    from tuneforge.train.distributed import launcher_backend

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_backend(None) is None and launcher_backend("ds.json") == "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --config_file with DeepSpeed
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_z3_config.json")
    assert launcher_backend(None) == "ds_z3_config.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    with pytest.raises(ConfigError, match="deepspeed_config_file"):
        launcher_backend(None)


def test_accelerates_fsdp_settings_become_train_fsdp(monkeypatch):
    # what `accelerate launch --config_file` puts in the environment for LF's fsdp2_config.yaml / fsdp_config.yaml
    from tuneforge.config.schema import FsdpConfig
    from tuneforge.train.distributed import fsdp_from_launcher

    for key in [k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"]:
        monkeypatch.delenv(key)
    assert fsdp_from_launcher(FsdpConfig()) == FsdpConfig()  # no FSDP asked for
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    assert fsdp_from_launcher(FsdpConfig()) == FsdpConfig(enabled=True, reshard_after_forward=False,
                                                          layer_classes=["LlamaDecoderLayer"])
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 runs as FSDP2 with the same sharding
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert fsdp_from_launcher(FsdpConfig()) == FsdpConfig(enabled=True, reshard_after_forward=False,
                                                          offload_params=True, layer_classes=["LlamaDecoderLayer"])
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="fsdp_sharding_strategy HYBRID_SHARD is not supported"):
        fsdp_from_launcher(FsdpConfig())
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(ConfigError, match="SIZE_BASED_WRAP is not supported.*TRANSFORMER_BASED_WRAP"):
        fsdp_from_launcher(FsdpConfig())


def test_llamafactorys_fsdp_keys_map_to_train_fsdp(tmp_path):
    from tuneforge.config.llamafactory import map_key

    assert map_key("fsdp", "full_shard auto_wrap")[0] == [("train.fsdp.enabled", True),
                                                          ("train.fsdp.reshard_after_forward", True)]
    assert map_key("fsdp", ["shard_grad_op", "offload"])[0] == [
        ("train.fsdp.enabled", True), ("train.fsdp.reshard_after_forward", False), ("train.fsdp.offload_params", True)]
    assert map_key("fsdp", "")[0] == []
    file = tmp_path / "fsdp.json"
    file.write_text(json.dumps({"fsdp_version": 2, "fsdp_reshard_after_forward": False,
                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                "activation_checkpointing": True, "cpu_ram_efficient_loading": True}))
    assert map_key("fsdp_config", str(file))[0] == [
        ("train.fsdp.reshard_after_forward", False), ("train.fsdp.layer_classes", ["LlamaDecoderLayer"]),
        ("train.gradient_checkpointing", True)]
    with pytest.raises(ConfigError, match="fsdp_config: fsdp_version 3 does not exist"):
        map_key("fsdp_config", {"fsdp_version": 3})
    with pytest.raises(ConfigError, match="fsdp_config: xla is not a setting tuneforge knows"):
        map_key("fsdp_config", {"xla": True})


@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"deepspeed": str(DS / "ds_z3_config.json")}}, "use one of DeepSpeed and FSDP"),
    ({"stage": "grpo", "grpo": {"reward_funcs": ["length"]}}, "the grpo stage generates with the policy"),
    ({"train": {"optimizer": "adam_mini"}}, "train.optimizer adam_mini does not run on sharded weights"),
    ({"train": {"fsdp": {"enabled": True, "offload_params": True}}}, "without a GPU everything is in CPU memory"),
])
def test_fsdp_where_it_cannot_run_is_one_message(change, message, tmp_path, tiny_model_dir):
    from tuneforge.config import load

    cfg = yaml.safe_load(write_config(tmp_path, tiny_model_dir, "x").read_text())
    cfg["train"]["fsdp"] = {"enabled": True}
    for section, values in change.items():
        if isinstance(values, dict):
            cfg[section] = {**cfg.get(section, {}), **values}
        else:
            cfg[section] = values
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=f"cfg.yaml: FSDP .* cannot run: .*{message}"):
        load(str(path))


def test_sharded_weights_get_one_forward_per_micro_batch():
    # Each forward over FSDP's or ZeRO-3's shards gathers weights with the other processes: a token budget that cuts
    # one process's micro-batch into more passes than another's would put them out of step.
    from tuneforge.config.schema import FsdpConfig, TrainConfig
    from tuneforge.run import forward_tokens

    assert forward_tokens(TrainConfig(device="cpu")) == 1024  # CPU default without sharding
    assert forward_tokens(TrainConfig(device="cpu", deepspeed=str(DS / "ds_z2_config.json"))) == 1024
    assert forward_tokens(TrainConfig(device="cpu", deepspeed=str(DS / "ds_z3_config.json"))) == 0
    assert forward_tokens(TrainConfig(device="cpu", fsdp=FsdpConfig(enabled=True))) == 0
    with pytest.raises(ConfigError, match="train.forward_tokens .* out of step"):
        forward_tokens(TrainConfig(device="cpu", forward_tokens=256, fsdp=FsdpConfig(enabled=True)))
