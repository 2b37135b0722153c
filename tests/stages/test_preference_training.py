"""dpo, kto and rm on the tiny model through the production path (run.prepare + run.fit_job)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import snapshot, train_in_process

DPO = ["stage=dpo", "data.dataset=dpo_en_demo", "data.max_samples=8", "train.batch_size=2",
       "train.gradient_accumulation_steps=2", "train.learning_rate=5e-3"]
KTO = ["stage=kto", "data.dataset=kto_en_demo", "data.max_samples=8", "train.batch_size=2",
       "train.gradient_accumulation_steps=2"]
RM = ["stage=rm", "data.dataset=dpo_en_demo", "data.max_samples=8", "train.batch_size=2"]


def records(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_lora_dpo_first_step_is_ln2_with_zero_rewards(attention, make_cfg):
    """A new LoRA adapter starts at B = 0, so policy == reference: z = 0 and -log sigmoid(0) = ln 2. With SDPA for
    both passes the rewards are exactly 0 (and no pair counts as won). With `auto` on a CPU the policy's gradient
    pass uses the attention that keeps probabilities and the no-grad reference pass SDPA's (faster) forward: the
    same math, rounded differently, so the rewards are 0 only to fp32 rounding of the ~10^2-10^3 summed log-probs
    (bound: beta x 1e-6 x |logps|, ~7e-5 here; 1e-6 was seen on an AVX2 CPU, exactly 0 on AVX-512 ones), and which
    pairs count as won at this first step is rounding noise."""
    cfg = make_cfg(*DPO, "train.max_steps=2", f"model.attn_implementation={attention}")
    model, before, _ = train_in_process(cfg)
    first = records(cfg)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    exact = attention == "sdpa"
    beta = 0.1  # the default
    bound = 1e-7 if exact else 1e-6 * beta * max(abs(first["logps/chosen"]), abs(first["logps/rejected"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins") + (("rewards/accuracies",) if exact else ()):
        assert first[key] == pytest.approx(0.0, abs=bound), key
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    after = snapshot(model)
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert moved and all("lora_" in n for n in moved)
    assert records(cfg)[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the second step has moved


def independent_logps(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed log-prob and count of trained tokens from the model's own full logits (no code of ours)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    logps = F.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None]).squeeze(1)
    return float(logps.sum()), int(keep.sum())


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo", "sigmoid"])
def test_dpo_loss_uses_sums_or_per_token_means_as_each_variant_says(make_cfg, loss):
    from tuneforge.run import prepare

    job = prepare(make_cfg(*DPO, f"dpo.loss={loss}", "finetune.method=full"))
    rows = job.train_rows[:2]
    stage, model = job.stage, job.model
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():  # move the policy away from the reference
            p.add_(torch.randn_like(p) * 0.02)
        out = stage.loss(model, stage.collate(rows))
    beta = stage.beta
    expected = 0.0
    for row in rows:
        pc, nc = independent_logps(model, row["chosen_input_ids"], row["chosen_labels"])
        pr, nr = independent_logps(model, row["rejected_input_ids"], row["rejected_labels"])
        rc, _ = independent_logps(stage.reference.model, row["chosen_input_ids"], row["chosen_labels"]) \
            if stage.reference else (0.0, 0)
        rr, _ = independent_logps(stage.reference.model, row["rejected_input_ids"], row["rejected_labels"]) \
            if stage.reference else (0.0, 0)
        if loss == "ipo":  # per-token means for policy and reference
            z = (pc / nc - rc / nc) - (pr / nr - rr / nr)
            expected += (z - 1 / (2 * beta)) ** 2
        elif loss == "simpo":  # per-token means, no reference; default beta 2.0, gamma 1.0
            expected += math.log1p(math.exp(-(beta * (pc / nc - pr / nr) - 1.0)))
        elif loss == "orpo":  # per-token means, no reference: NLL of chosen + beta * odds-ratio loss
            mc, mr = pc / nc, pr / nr
            log_odds = (mc - mr) - (math.log(1 - math.exp(mc)) - math.log(1 - math.exp(mr)))
            expected += -mc + beta * math.log1p(math.exp(-log_odds))
        else:  # sums
            expected += math.log1p(math.exp(-beta * ((pc - rc) - (pr - rr))))
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-4)
    assert (beta, stage.reference is None) == ({"simpo": (2.0, True), "orpo": (0.1, True)}.get(loss, (0.1, False)))


def test_reference_is_the_starting_adapter_when_continuing_one(make_cfg, tiny_run):
    cfg = make_cfg(*DPO, f"model.adapter_path={tiny_run / 'adapter'}", "train.max_steps=1")
    from tuneforge.run import prepare

    job = prepare(cfg)
    assert job.stage.reference.kind == "adapter-copy"
    assert "starting adapter" in job.plan.stage
    from tuneforge.run import finish, fit_job

    finish(job, fit_job(job))
    first = records(cfg)[0]
    # policy == reference == the SFT adapter at step 1; with the bare base as reference (LLaMA-Factory's behaviour)
    # the rewards would be the SFT adapter's log-ratio, far from 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    saved = list((Path(cfg.output.dir) / "adapter").iterdir())
    assert not [p for p in saved if p.is_dir()], "the frozen reference copy must not be saved beside the adapter"


def test_full_tuning_uses_a_frozen_copy_and_the_plan_counts_it(make_cfg):
    from tuneforge.run import prepare

    job = prepare(make_cfg(*DPO, "finetune.method=full"))
    assert job.stage.reference.kind == "frozen-copy"
    assert job.plan.reference_gb > 0
    assert not any(p.requires_grad for p in job.stage.reference.model.parameters())


def test_precomputed_and_live_reference_give_the_same_training(make_cfg, tmp_path):
    live_cfg = make_cfg(*DPO, "train.max_steps=3", f"output.dir={tmp_path / 'live'}")
    pre_cfg = make_cfg(*DPO, "train.max_steps=3", "reference.precompute=true", f"output.dir={tmp_path / 'pre'}")
    live, _, _ = train_in_process(live_cfg)
    pre, _, _ = train_in_process(pre_cfg)
    for a, b in zip(records(live_cfg), records(pre_cfg)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    a, b = snapshot(live), snapshot(pre)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    cached = list(Path(pre_cfg.data.cache_dir).rglob("reference-*.safetensors"))
    assert len(cached) == 1


def test_kto_trains_and_logs_kl_and_rewards(make_cfg):
    cfg = make_cfg(*KTO, "train.max_steps=3")
    model, before, _ = train_in_process(cfg)
    first = records(cfg)[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the start
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every row, weights 1
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(first)
    after = snapshot(model)
    assert any(not torch.equal(after[n], before[n]) for n in after)


def test_kto_kl_is_estimated_from_mismatched_pairs(make_cfg):
    from tuneforge.run import prepare
    from tuneforge.stages.kto import mismatched

    job = prepare(make_cfg(*KTO, "finetune.method=full"))
    stage, model = job.stage, job.model
    rows = job.train_rows[:3]
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pairs = mismatched(rows, 10_000)
    # row i gets row i-1's answer (cyclically)
    for i in range(len(rows)):
        prev = rows[i - 1]
        start = next(j for j, t in enumerate(prev["labels"]) if t != -100)
        assert pairs[i]["input_ids"][-(len(prev["input_ids"]) - start):] == prev["input_ids"][start:]
    diffs = []
    for pair in pairs:
        policy, _ = independent_logps(model, pair["input_ids"], pair["labels"])
        ref, _ = independent_logps(stage.reference.model, pair["input_ids"], pair["labels"])
        diffs.append(policy - ref)
    stage.prepare_step(model, [rows[:2], rows[2:]], job.context.accelerator)
    assert float(stage.kl) == pytest.approx(max(sum(diffs) / 3, 0.0), rel=1e-4, abs=1e-6)


def test_ranking_data_is_unpaired_for_kto(make_cfg):
    from tuneforge.run import prepare

    job = prepare(make_cfg("stage=kto", "data.dataset=dpo_en_demo", "data.max_samples=4"))
    labels = [r["kto_label"] for r in job.train_rows]
    assert len(labels) == 8 and sum(labels) == 4


def test_rm_trains_value_head_and_lora_and_saves_lf_layout(make_cfg):
    from safetensors import safe_open

    from tuneforge.run import finish, fit_job, prepare

    cfg = make_cfg(*RM, "train.max_steps=3")
    job = prepare(cfg)
    before = snapshot(job.model)
    finish(job, fit_job(job))
    after = snapshot(job.model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    # the head's bias cancels in s_chosen - s_rejected: its gradient is zero up to the rounding of a sum, which
    # AdamW can still blow up to a full step, so whether it moves says nothing
    assert "v_head.summary.weight" in moved
    assert all("lora_" in n or n.startswith("v_head") for n in moved)
    assert "accuracy" in records(cfg)[0]
    head = Path(cfg.output.dir) / "adapter" / "value_head.safetensors"
    with safe_open(str(head), "pt") as f:
        assert set(f.keys()) == {"v_head.summary.weight", "v_head.summary.bias"}
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("v_head.summary.weight"), after["v_head.summary.weight"])
    assert (Path(cfg.output.dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_rm_loss_is_the_pairwise_logistic_loss_of_last_token_scores(make_cfg):
    from tuneforge.run import prepare

    job = prepare(make_cfg(*RM, "finetune.method=full"))
    model, stage = job.model, job.stage
    model.eval()
    rows = job.train_rows[:2]
    with torch.no_grad():
        out = stage.loss(model, stage.collate(rows))
        expected, hits = 0.0, 0
        for row in rows:
            scores = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                hidden = model.pretrained_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
                scores.append(float(hidden @ model.v_head.summary.weight[0] + model.v_head.summary.bias[0]))
            expected += math.log1p(math.exp(-(scores[0] - scores[1])))
            hits += scores[0] > scores[1]
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-4)
    assert float(out.metrics["accuracy"][0]) == hits


def dpo_config(tmp_path: Path, tiny_model_dir: Path, out: str, **train) -> Path:
    import yaml

    cfg = {"stage": "dpo", "model": {"path": str(tiny_model_dir)}, "finetune": {"method": "lora"},
           "data": {"dataset": ["dpo_en_demo"], "template": "chatml", "cutoff_len": 128, "max_samples": 16,
                    "cache_dir": str(tmp_path / "cache")},
           "dpo": {"loss": "sigmoid", "bco_weight": 0.5},  # BCO keeps a running mean: resume must restore it
           "train": {"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "precision": "fp32",
                     "logging_steps": 1, **train},
           "output": {"dir": str(tmp_path / out), "plot_loss": True}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_dpo_resume_continues_exactly(tmp_path, tiny_model_dir):
    from tests.train.test_loop import adapter_weights, assert_same
    from tuneforge.cli.main import main

    config = dpo_config(tmp_path, tiny_model_dir, "run", max_steps=4, save_steps=2)
    assert main(["train", str(config)]) == 0
    first = adapter_weights(tmp_path / "run")
    logged = records_at(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert json.loads((checkpoint / "stage_state.json").read_text())["bco_count"] > 0
    assert main(["train", str(config), f"train.resume_from_checkpoint={checkpoint}"]) == 0
    assert_same(adapter_weights(tmp_path / "run"), first, 1e-6)
    again = records_at(tmp_path / "run")
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in logged], abs=1e-6)
    # the preference panel makes the plot two panels wide (12 in at 110 dpi)
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "run" / "plots" / "loss.png")).shape[1] == 1320


def records_at(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_dpo_matches_one_process(tmp_path, tiny_model_dir):
    from tests.launch import two_ranks
    from tests.train.test_loop import adapter_weights, assert_same
    from tuneforge.cli.main import main

    common = dict(max_steps=2, save_steps=0, gradient_accumulation_steps=1, group_by_length=False)
    single = dpo_config(tmp_path, tiny_model_dir, "single", **{**common, "batch_size": 4})
    double = dpo_config(tmp_path, tiny_model_dir, "ddp", **{**common, "batch_size": 2})
    for path in (single, double):  # BCO's running mean is per process; compare plain DPO here
        path.write_text(path.read_text().replace("bco_weight: 0.5", "bco_weight: 0.0"))
    assert main(["train", str(single)]) == 0
    assert "x 2 process(es)" in two_ranks("train", str(double)).stderr
    # Adam's first steps divide by |g|: gradients equal to ~1e-7 still differ by a few 1e-5 in the weights
    assert_same(adapter_weights(tmp_path / "ddp"), adapter_weights(tmp_path / "single"), 1e-4)
    one, two = records_at(tmp_path / "single"), records_at(tmp_path / "ddp")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):  # sums of ~400: fp32 roundoff
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-7, abs=1e-5), key


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_qlora_trains_each_preference_stage(make_cfg, stage):
    settings = {"dpo": DPO, "kto": KTO, "rm": RM}[stage]
    model, before, _ = train_in_process(make_cfg(*settings, "model.quantization_bit=4", "train.precision=bf16",
                                                 "train.max_steps=2"))
    after = snapshot(model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all("lora_" in n or n.startswith("v_head") for n in moved)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(make_cfg()))


def test_plan_of_a_dpo_run_names_the_reference_and_counts_its_memory(make_cfg, tmp_path, capsys):
    from tuneforge.cli.main import main

    cfg = make_cfg()
    assert main(["train", "--plan", f"model.path={cfg.model.path}", "stage=dpo", "data.dataset=dpo_en_demo",
                 "data.template=chatml", "finetune.method=full", "data.max_samples=8",
                 f"output.dir={tmp_path / 'plan'}"]) == 0
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the table wraps long cells
    assert "reference: a frozen copy of the starting model" in err
    assert "of it the reference model" in err and "from two measured steps" in err


def test_rm_continuing_an_adapter_loads_its_value_head(make_cfg, tmp_path):
    from safetensors.torch import load_file

    from tuneforge.run import finish, fit_job, prepare

    first = make_cfg(*RM, "train.max_steps=2", f"output.dir={tmp_path / 'first'}")
    job = prepare(first)
    finish(job, fit_job(job))
    saved = load_file(str(tmp_path / "first" / "adapter" / "value_head.safetensors"))
    again = prepare(make_cfg(*RM, f"model.adapter_path={tmp_path / 'first' / 'adapter'}",
                             f"output.dir={tmp_path / 'second'}"))
    assert "loaded from" in again.plan.stage
    assert torch.equal(again.model.v_head.summary.weight.detach(), saved["v_head.summary.weight"])
    assert torch.equal(again.model.v_head.summary.bias.detach(), saved["v_head.summary.bias"])


def test_kto_warns_about_class_balance_and_missing_classes(caplog):
    from tuneforge.config.schema import KTOConfig
    from tuneforge.stages.kto import KTOStage

    rows = [{"kto_label": True}] * 6 + [{"kto_label": False}] * 2
    with caplog.at_level("WARNING"):
        KTOStage(0, KTOConfig()).check_rows(rows)  # 1*6 / (1*2) = 3: far from 1
    assert "= 3.00" in caplog.text and "kto.rejected_weight" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        KTOStage(0, KTOConfig(rejected_weight=3.0)).check_rows(rows)  # 6 / 6 = 1: balanced
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        KTOStage(0, KTOConfig()).check_rows([{"kto_label": False}] * 3)
    assert "every row is undesirable" in caplog.text
