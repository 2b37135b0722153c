"""finetune.method=oft (LLaMA-Factory's finetuning_type: oft): only the OFT rotations train; the saved adapter
reloads through peft (chat) and merges into the base (export) with the trained model's logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.finetune.conftest import logits, snapshot, train_and_save
from tuneforge.config import load
from tuneforge.errors import ConfigError


def test_only_oft_parameters_train_and_the_saved_adapter_reloads_and_merges(make_cfg):
    from tuneforge.chat.engine import load_engine

    cfg = make_cfg("finetune.method=oft", "finetune.oft.block_size=16", "train.learning_rate=5e-2")
    job, before = train_and_save(cfg)
    model = job.model
    after = snapshot(model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved == trainable
    assert all(".oft_" in n for n in trainable)
    assert any("down_proj" in n for n in trainable) and any("q_proj" in n for n in trainable)  # 'all' targets

    model.eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60]])
    trained = logits(model, ids)
    folder = job.run_dir / "adapter"
    assert (folder / "adapter_config.json").is_file()
    engine = load_engine(replace(cfg.model, adapter_path=[str(job.run_dir)]), "chatml")
    assert torch.allclose(logits(engine.model, ids), trained, atol=1e-5)
    with engine.adapter_context(False):
        assert not torch.allclose(logits(engine.model, ids), trained, atol=1e-3)  # the adapter does something
    merged = engine.model.merge_and_unload()
    assert torch.allclose(logits(merged, ids), trained, atol=1e-4)


def test_llamafactory_oft_keys_map():
    cfg = load(None, [], {"finetuning_type": "oft", "oft_rank": 4, "oft_block_size": 0, "oft_target": "q_proj,v_proj",
                          "module_dropout": 0.1, "additional_target": "lm_head"})
    oft = cfg.finetune.oft
    assert (cfg.finetune.method, oft.rank, oft.block_size, oft.targets, oft.dropout, oft.modules_to_save) == \
        ("oft", 4, 0, ["q_proj", "v_proj"], 0.1, ["lm_head"])
    with pytest.raises(ConfigError, match="exactly one of rank"):
        load(None, ["finetune.method=oft", "finetune.oft.rank=4"])
