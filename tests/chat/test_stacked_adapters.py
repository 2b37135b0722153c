"""model.adapter_path with several adapters: the earlier ones merged into the base, the last one loaded on top
(as LLaMA-Factory stacks `adapter_name_or_path`), the same model as built by hand with peft."""

from __future__ import annotations

import torch
from peft import PeftModel

from tuneforge.chat.engine import adapter_folder, load_engine
from tuneforge.config.schema import ModelConfig
from tuneforge.models.load import load_model


def test_earlier_adapters_are_merged_and_the_last_one_stays_an_adapter(tiny_model_dir, tiny_run, tiny_run_b):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run), str(tiny_run_b)]),
                         "chatml")
    by_hand = PeftModel.from_pretrained(load_model(ModelConfig(path=str(tiny_model_dir))),
                                        str(adapter_folder(tiny_run))).merge_and_unload()
    by_hand = PeftModel.from_pretrained(by_hand, str(adapter_folder(tiny_run_b))).eval()
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        expected = by_hand(input_ids=ids).logits
        got = engine.model(input_ids=ids).logits
        with engine.model.disable_adapter():  # the first adapter is in the base weights, not an adapter
            merged_only = engine.model(input_ids=ids).logits
        base = load_model(ModelConfig(path=str(tiny_model_dir)))(input_ids=ids).logits
    assert len(engine.adapters) == 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_only, base, atol=1e-4) and not torch.allclose(got, merged_only, atol=1e-4)
