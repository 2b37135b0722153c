"""LoRA on an unquantized model does not import bitsandbytes (~1.5 s of start-up); a quantized one still gets
peft's bitsandbytes LoRA layers, in the same process afterwards."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from tuneforge.config import load
from tuneforge.finetune.methods import apply_method, merge_adapters
from tuneforge.models.load import load_model

base = [f"model.path={sys.argv[1]}", "finetune.method=lora"]
for name, extra in (("plain", []), ("quantized", ["model.quantization_bit=4"])):
    cfg = load(None, base + extra)
    model = apply_method(load_model(cfg.model), cfg.finetune, [], quantized=bool(extra))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    print(name, "bitsandbytes" in sys.modules, type(layer).__module__, type(layer).__name__)
    if not extra:  # an adapter loaded back and merged (as chat, export and full runs on adapters do)
        model.save_pretrained(sys.argv[2])
        merged = merge_adapters(load_model(cfg.model), [sys.argv[2]])
        print("merged", "bitsandbytes" in sys.modules, type(merged.model.layers[0].self_attn.q_proj).__name__)
"""


def test_only_a_quantized_model_imports_bitsandbytes(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model_dir), str(tmp_path / "adapter")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["plain False peft.tuners.lora.layer Linear",
                   "merged False Linear",
                   "quantized True peft.tuners.lora.bnb Linear4bit"]
