"""Optimizers: each is the package's own class with the configured settings, trains the tiny model, and saves and
restores its state; LLaMA-Factory's keys map onto train.optimizer and the train.galore/apollo/badam sections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tuneforge.config import load
from tuneforge.errors import ConfigError
from tuneforge.train import loop
from tuneforge.train.optim import build_optimizer, build_scheduler, muon_split

from .conftest import snapshot, train_in_process

FAST = ["data.max_samples=4", "train.scheduler=constant", "train.max_steps=4"]
DS_Z2 = Path(__file__).parents[1] / "fixtures" / "llamafactory" / "examples" / "deepspeed" / "ds_z2_config.json"


@pytest.fixture
def built(monkeypatch):
    """The optimizers the loop builds, in order (the production builder, recorded)."""
    made = []

    def record(*args, **kwargs):
        made.append(build_optimizer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "build_optimizer", record)
    return made


def losses(cfg) -> list[float]:
    lines = (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def moved(before: dict, model: torch.nn.Module) -> set[str]:
    after = snapshot(model)
    return {n for n in before if not torch.equal(before[n], after[n])}


def tiny_model(make_cfg, *overrides: str):
    """The tiny model with the configured method applied, as training gets it."""
    from tuneforge.run import load_for_training

    cfg = make_cfg(*overrides)
    return cfg, load_for_training(cfg, "fp32")


def fake_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, seed: int = 0) -> None:
    """One optimizer step on random gradients of every parameter that requires them."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- plain rules and LLaMA-Factory's optim names -------------------------------------------------------------


def test_adam_betas_and_epsilon_come_from_the_config(make_cfg):
    cfg, model = tiny_model(make_cfg, "finetune.method=full", "train.adam_beta1=0.8", "train.adam_beta2=0.95",
                            "train.adam_epsilon=1e-6", "train.weight_decay=0.1")
    opt = build_optimizer(model, cfg.train)
    assert type(opt) is torch.optim.AdamW
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.95)} and {g["eps"] for g in opt.param_groups} == {1e-6}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert decay[id(names["model.layers.0.input_layernorm.weight"])] == 0.0
    assert decay[id(names["model.layers.0.self_attn.q_proj.weight"])] == 0.1


def test_adamw_uses_the_fused_kernel_which_makes_the_per_tensor_update(make_cfg):
    import copy

    cfg, model = tiny_model(make_cfg, "finetune.method=full", "train.weight_decay=0.1")
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.train)
    assert all(g["fused"] for g in opt.param_groups)
    # the per-tensor loop (torch's default) on a copy: the same update up to float rounding, step after step
    ours = {id(p): n for n, p in model.named_parameters()}
    theirs = dict(twin.named_parameters())
    loop_opt = torch.optim.AdamW([{"params": [theirs[ours[id(q)]] for q in g["params"]],
                                   "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                                 lr=cfg.train.learning_rate, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                 eps=cfg.train.adam_epsilon, foreach=False)
    torch.manual_seed(0)
    for _ in range(3):
        for name, param in model.named_parameters():
            grad = torch.randn_like(param)
            param.grad, theirs[name].grad = grad, grad.clone()
        opt.step()
        loop_opt.step()
    assert max((p - theirs[n]).abs().max().item() for n, p in model.named_parameters()) < 1e-6
    # sharded weights keep the default
    for sharded in ("train.fsdp.enabled=true", f"train.deepspeed={DS_Z2}"):
        cfg2 = make_cfg("finetune.method=full", sharded)
        assert not any(g.get("fused") for g in build_optimizer(model, cfg2.train).param_groups)


def test_eight_bit_adamw_from_bitsandbytes_trains(make_cfg, built):
    import bitsandbytes as bnb

    cfg = make_cfg("finetune.method=full", "optim=paged_adamw_8bit", "train.adam_beta2=0.99", *FAST)
    assert cfg.train.optimizer == "paged_adamw_8bit"
    model, before, _ = train_in_process(cfg)
    assert isinstance(built[0], bnb.optim.AdamW) and built[0].param_groups[0]["betas"] == (0.9, 0.99)
    assert built[0].args.optim_bits == 8
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


def test_unknown_optim_is_refused_with_the_supported_list():
    with pytest.raises(ConfigError, match="adamw_torch_fused.*use_galore"):
        load(None, ["optim=lion_8bit"])


# --- LoRA+ ---------------------------------------------------------------------------------------------------


def test_loraplus_trains_b_matrices_at_lr_times_ratio(make_cfg):
    cfg, model = tiny_model(make_cfg, "loraplus_lr_ratio=16", "train.learning_rate=1e-3", "train.weight_decay=0.1")
    opt = build_optimizer(model, cfg.train, cfg.finetune.lora)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b_mats = [p for n, p in named if "lora_B" in n]
    a_mats = [p for n, p in named if "lora_A" in n]
    assert b_mats and a_mats and len(lr_of) == len(named)
    assert {lr_of[id(p)][0] for p in b_mats} == {1e-3 * 16}
    assert {lr_of[id(p)] for p in a_mats} == {(1e-3, 0.1)}
    assert type(opt) is torch.optim.AdamW


def test_loraplus_run_moves_only_adapters(make_cfg, built):
    cfg = make_cfg("finetune.lora.plus_lr_ratio=4", *FAST)
    model, before, _ = train_in_process(cfg)
    changed = moved(before, model)
    assert changed and all("lora_" in n for n in changed)
    assert max(g["lr"] for g in built[0].param_groups) == pytest.approx(cfg.train.learning_rate * 4)
    assert losses(cfg)[-1] < losses(cfg)[0]


# --- GaLore and APOLLO ---------------------------------------------------------------------------------------


def test_galore_is_galore_torch_with_the_configured_projection(make_cfg, built):
    from galore_torch import GaLoreAdamW

    cfg = make_cfg("finetune.method=full", "use_galore=true", "galore_rank=4", "galore_update_interval=2",
                   "galore_scale=0.5", "galore_target=mlp", *FAST)
    model, before, _ = train_in_process(cfg)
    opt = built[0]
    assert type(opt) is GaLoreAdamW
    lowrank = [g for g in opt.param_groups if "rank" in g]
    assert len(lowrank) == 1
    assert (lowrank[0]["rank"], lowrank[0]["update_proj_gap"], lowrank[0]["scale"]) == (4, 2, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in lowrank[0]["params"]} == {"gate_proj", "up_proj", "down_proj"}
    projector = opt.state[lowrank[0]["params"][0]]["projector"]
    assert projector.ortho_matrix.shape[0] == 4  # the gradient really is projected to rank 4
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


def test_apollo_is_apollo_torch_with_the_configured_scaling(make_cfg, built):
    from apollo_torch import APOLLOAdamW

    cfg = make_cfg("finetune.method=full", "use_apollo=true", "apollo_rank=4", "apollo_scale=8",
                   "apollo_scale_type=tensor", "apollo_scale_front=true", *FAST)
    model, before, _ = train_in_process(cfg)
    opt = built[0]
    assert type(opt) is APOLLOAdamW and opt.scale_front is True
    lowrank = [g for g in opt.param_groups if "rank" in g]
    assert (lowrank[0]["rank"], lowrank[0]["scale"], lowrank[0]["scale_type"], lowrank[0]["proj"]) == \
        (4, 8.0, "tensor", "random")
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


def test_layerwise_galore_steps_each_weight_in_its_gradient_hook(make_cfg, built):
    from galore_torch import GaLoreAdamW

    from tuneforge.train.optimizers.joint import JointOptimizer

    cfg = make_cfg("finetune.method=full", "use_galore=true", "galore_rank=4", "galore_layerwise=true",
                   "train.learning_rate=1e-3", *FAST)
    model, before, _ = train_in_process(cfg)
    opt = built[0]
    assert isinstance(opt, JointOptimizer) and opt.stepped_in_hooks
    assert all(type(part) is GaLoreAdamW and len(part.param_groups[0]["params"]) == 1 for part in opt.parts.values())
    assert len(opt.parts) == sum(p.requires_grad for p in model.parameters())
    assert {g["lr"] for g in opt.param_groups} == {1e-3}  # the one scheduler drives every per-weight optimizer
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


# --- BAdam ---------------------------------------------------------------------------------------------------


def test_badam_trains_one_layer_at_a_time_and_switches_after_the_interval(make_cfg):
    from badam import BlockOptimizer

    cfg, model = tiny_model(make_cfg, "finetune.method=full", "use_badam=true", "badam_switch_interval=2")
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, BlockOptimizer) and type(opt.base_optimizer) is torch.optim.AdamW
    trained_layers = []
    for step in range(5):
        before = snapshot(model)
        fake_step(opt, model, step)
        trained_layers.append({n.split(".")[2] if ".layers." in n else n for n in moved(before, model)})
    # The package counts steps from 0 and switches when (step + 1) % interval == 0 after stepping, so the first
    # block trains one step, then each block switch_interval steps (as in LLaMA-Factory).
    assert trained_layers == [{"0"}, {"1"}, {"1"}, {"0"}, {"0"}]


def test_badam_runs_in_the_loop_without_touching_embeddings_and_norm(make_cfg, built):
    cfg = make_cfg("finetune.method=full", "use_badam=true", "badam_switch_interval=1", "train.max_steps=2",
                   "data.max_samples=4", "train.learning_rate=1e-3", "train.save_steps=1")
    model, before, _ = train_in_process(cfg)
    assert {n.split(".")[2] for n in moved(before, model)} == {"0", "1"}
    checkpoint = Path(cfg.output.dir) / "checkpoints" / "step-1" / "trainable.safetensors"
    from safetensors.torch import load_file

    assert len(load_file(str(checkpoint))) == len(before)  # every trained weight, not only the active block


def test_badam_ratio_mode_updates_a_share_of_each_weight(make_cfg, built):
    from badam import BlockOptimizerRatio

    cfg = make_cfg("finetune.method=full", "use_badam=true", "badam_mode=ratio", "badam_update_ratio=0.25",
                   "train.max_steps=1", "data.max_samples=4")
    model, before, _ = train_in_process(cfg)
    assert isinstance(built[0], BlockOptimizerRatio) and built[0].update_ratio == 0.25
    weight = "model.layers.0.mlp.up_proj.weight"
    changed = (snapshot(model)[weight] != before[weight]).float().mean().item()
    assert changed == pytest.approx(0.25, abs=0.01)  # adjacent mask: a quarter of the entries move
    assert "model.embed_tokens.weight" not in moved(before, model)


# --- Adam-mini and Muon --------------------------------------------------------------------------------------


def test_adam_mini_gets_the_models_heads(make_cfg, built):
    from adam_mini import Adam_mini

    cfg = make_cfg("finetune.method=full", "use_adam_mini=true", "train.adam_beta1=0.85", *FAST)
    model, before, _ = train_in_process(cfg)
    opt = built[0]
    assert type(opt) is Adam_mini
    assert (opt.dim, opt.n_heads, opt.n_kv_heads) == (64, 4, 2)
    assert {g["beta1"] for g in opt.param_groups} == {0.85}
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


def test_muon_on_hidden_matrices_and_adamw_on_the_rest(make_cfg, built):
    from tuneforge.train.optimizers.joint import JointOptimizer

    cfg = make_cfg("finetune.method=full", "use_muon=true", *FAST)
    model, before, _ = train_in_process(cfg)
    opt = built[0]
    assert isinstance(opt, JointOptimizer)
    assert type(opt.parts["muon"]) is torch.optim.Muon and type(opt.parts["adamw"]) is torch.optim.AdamW
    muon_names = {n for n, _ in muon_split(model)[0]}
    assert "model.layers.0.self_attn.q_proj.weight" in muon_names and "model.embed_tokens.weight" not in muon_names
    muon_ids = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    assert all(p.ndim == 2 for g in opt.parts["muon"].param_groups for p in g["params"]) and len(muon_ids) == 14
    assert opt.parts["muon"].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert moved(before, model) == set(before)
    assert losses(cfg)[-1] < losses(cfg)[0]


# --- checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    ["train.galore.enabled=true", "train.galore.rank=4"],
    ["train.apollo.enabled=true", "train.apollo.rank=4"],
    ["train.optimizer=muon"],
    ["train.badam.enabled=true", "train.badam.switch_interval=1"],
], ids=["galore", "apollo", "muon", "badam"])
def test_checkpoint_restores_the_optimizer_state(make_cfg, tmp_path, overrides):
    from tuneforge.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

    cfg, model = tiny_model(make_cfg, "finetune.method=full", *overrides)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(opt, cfg.train, 10)
    for seed in range(3):
        fake_step(opt, model, seed)
        scheduler.step()
    save_checkpoint(tmp_path / "step-3", model, opt, scheduler, TrainState(step=3), names=names)
    saved = opt.state_dict()
    _, model2 = tiny_model(make_cfg, "finetune.method=full", *overrides)  # a new process resuming
    fresh = build_optimizer(model2, cfg.train)
    load_checkpoint(tmp_path / "step-3", model2, fresh, build_scheduler(fresh, cfg.train, 10))
    assert_same_state(fresh.state_dict(), saved)
    if cfg.train.badam.enabled:
        assert (fresh.active_block, fresh.current_block_idx, fresh.global_step) == \
            (opt.active_block, opt.current_block_idx, opt.global_step)
    # both continue identically
    fake_step(opt, model, 7)
    fake_step(fresh, model2, 7)
    assert snapshot(model).keys() == snapshot(model2).keys()
    assert all(torch.equal(snapshot(model)[n], p) for n, p in snapshot(model2).items())


def assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


# --- the plan, the config dialect and its rules --------------------------------------------------------------


def test_plan_and_manifest_name_the_optimizer(make_cfg):
    from tuneforge.run import prepare
    from tuneforge.train.plan import plan_dict

    job = prepare(make_cfg("finetune.method=full", "use_galore=true", "galore_rank=4"))
    assert job.plan.optimizer.startswith("galore_torch.GaLoreAdamW (rank 4")
    assert plan_dict(job.plan)["optimizer"] == job.plan.optimizer


def test_llamafactory_keys_map_onto_the_sections(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text("use_muon: true\nfinetuning_type: full\noptim: adamw_torch\nadam_beta1: 0.8\n"
                    "adam_beta2: 0.95\nadam_epsilon: 1.0e-6\n", encoding="utf-8")
    cfg = load(path)
    assert cfg.train.optimizer == "muon"  # use_muon wins over optim wherever it stands, as in LLaMA-Factory
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_epsilon) == (0.8, 0.95, 1e-6)
    cfg = load(None, ["finetuning_type=full", "use_galore=true", "galore_target=q_proj,v_proj", "galore_rank=8",
                      "galore_update_interval=100", "galore_scale=0.25", "galore_proj_type=left",
                      "galore_layerwise=true", "gradient_accumulation_steps=1", "optim=adamw_8bit"])
    g = cfg.train.galore
    assert (g.enabled, g.target, g.rank, g.update_interval, g.scale, g.proj_type, g.layerwise) == \
        (True, ["q_proj", "v_proj"], 8, 100, 0.25, "left", True)
    assert cfg.train.optimizer == "adamw_8bit"
    cfg = load(None, ["finetuning_type=full", "use_apollo=true", "apollo_rank=2", "apollo_proj=svd",
                      "apollo_proj_type=right", "apollo_scale_type=tensor", "apollo_scale_front=true"])
    a = cfg.train.apollo
    assert (a.enabled, a.rank, a.proj, a.proj_type, a.scale_type, a.scale_front, a.scale) == \
        (True, 2, "svd", "right", "tensor", True, 32.0)
    cfg = load(None, ["finetuning_type=full", "use_badam=true", "badam_mode=ratio", "badam_update_ratio=0.1",
                      "badam_mask_mode=scatter", "badam_switch_interval=10", "badam_verbose=1"])
    b = cfg.train.badam
    assert (b.enabled, b.mode, b.update_ratio, b.mask_mode, b.switch_interval, b.verbose) == \
        (True, "ratio", 0.1, "scatter", 10, 1)
    cfg = load(None, ["loraplus_lr_ratio=16", "loraplus_lr_embedding=1e-5", "use_adam_mini=true"])
    assert (cfg.finetune.lora.plus_lr_ratio, cfg.finetune.lora.plus_lr_embedding) == (16.0, 1e-5)
    assert cfg.train.optimizer == "adam_mini"


@pytest.mark.parametrize("overrides, message", [
    (["use_galore=true"], "cannot be used with LoRA"),
    (["finetuning_type=full", "use_galore=true", "use_badam=true"], "cannot be used together"),
    (["finetuning_type=freeze", "use_badam=true"], "needs finetune.method=full"),
    (["finetuning_type=full", "loraplus_lr_ratio=16"], "for LoRA only"),
    (["finetuning_type=full", "use_galore=true", "galore_layerwise=true", "gradient_accumulation_steps=4"],
     "gradient_accumulation_steps=1"),
    (["finetuning_type=full", "use_apollo=true", "optim=sgd"], "apollo runs on train.optimizer adamw"),
    (["finetuning_type=full", "use_galore=true", "optim=sgd"], "galore runs on train.optimizer"),
    (["finetuning_type=full", "use_badam=true", "badam_mode=ratio", "fp16=true"], "sparse gradients"),
    (["train.optimizer=lion"], "is not known"),
])
def test_rules_refuse_what_llamafactory_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(None, overrides)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant", "constant_with_warmup", "polynomial"])
def test_learning_rate_curve_with_warmup(scheduler):
    """lr at each of 10 steps with 2 warmup steps (warmup_ratio 0.2), against the curves written out by hand:
    linear warmup from 0, then linear / cosine decay to 0, constant, or polynomial (power 1, to 1e-7)."""
    from tuneforge.config.schema import TrainConfig
    from tuneforge.train.optim import build_scheduler

    base, total, warm = 0.5, 10, 2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = build_scheduler(optimizer, TrainConfig(scheduler=scheduler, warmup_ratio=0.2), total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()

    def expected(step: int) -> float:
        if scheduler == "constant":
            return base
        if step < warm:
            return base * step / warm
        progress = (step - warm) / (total - warm)
        return {"linear": base * (1 - progress), "cosine": base * 0.5 * (1 + math.cos(math.pi * progress)),
                "constant_with_warmup": base,
                "polynomial": (base - 1e-7) * (1 - progress) + 1e-7}[scheduler]

    assert seen == pytest.approx([expected(s) for s in range(total)], abs=1e-9)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop", "adagrad", "adafactor"])
def test_each_plain_optimizer_by_name(make_cfg, name):
    """train.optimizer (LF optim) builds that optimizer's own class, and one step moves the adapters only."""
    from transformers.optimization import Adafactor

    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad, "adafactor": Adafactor}[name]
    cfg, model = tiny_model(make_cfg, f"train.optimizer={name}")
    optimizer = build_optimizer(model, cfg.train)
    assert type(optimizer) is expected
    before = snapshot(model)
    fake_step(optimizer, model)
    changed = moved(before, model)
    assert changed and changed == {n for n, p in model.named_parameters() if p.requires_grad}
