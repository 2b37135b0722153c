"""PiSSA (finetune.lora.pissa_init / pissa_iter / pissa_convert): fast-SVD iterations reach peft, and a converted
adapter applied to the original, unmodified base reproduces the trained model."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from tests.finetune.conftest import logits, train_and_save
from tuneforge.config import load


def test_llamafactory_pissa_keys_map_and_reach_peft(make_cfg):
    from tuneforge.run import load_for_training

    cfg = load(None, [], {"pissa_init": True, "pissa_iter": 4, "pissa_convert": True})
    assert (cfg.finetune.lora.pissa_init, cfg.finetune.lora.pissa_iter, cfg.finetune.lora.pissa_convert) == \
        (True, 4, True)
    assert load(None, ["finetune.lora.pissa_init=true"]).finetune.lora.pissa_iter == 16  # LF's default
    for iters, expected in ((4, "pissa_niter_4"), (-1, "pissa")):
        model = load_for_training(make_cfg("finetune.lora.pissa_init=true", f"finetune.lora.pissa_iter={iters}"),
                                  "fp32")
        assert model.peft_config["default"].init_lora_weights == expected


def test_converted_adapter_on_the_original_base_gives_the_trained_model(make_cfg):
    from tuneforge.chat.engine import load_engine

    cfg = make_cfg("finetune.lora.pissa_init=true", "finetune.lora.pissa_iter=2", "finetune.lora.pissa_convert=true",
                   "finetune.lora.rank=4", "train.learning_rate=5e-2")
    job, _ = train_and_save(cfg)
    job.model.eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60]])
    trained = logits(job.model, ids)
    saved = json.loads((job.run_dir / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    engine = load_engine(replace(cfg.model, adapter_path=[str(job.run_dir)]), "chatml")
    assert torch.allclose(logits(engine.model, ids), trained, atol=1e-4)
    with engine.adapter_context(False):  # the base really is the original: PiSSA's SVD did not run on it again
        base = logits(engine.model, ids)
    from tuneforge.models.load import load_model

    assert torch.allclose(base, logits(load_model(cfg.model), ids), atol=1e-6)
    assert torch.allclose(logits(engine.model.merge_and_unload(), ids), trained, atol=1e-4)
