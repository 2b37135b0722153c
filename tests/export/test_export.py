"""Merging and exporting, each artifact checked against base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message


def test_merged_equals_unmerged_logits_fp32(tiny_model_dir, tiny_run):
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)], dtype="fp32"))
    ids = torch.tensor([engine.prompt_ids([Message("user", "Who are you?")], None)])
    with torch.no_grad():
        unmerged = engine.model(input_ids=ids).logits
        with engine.model.disable_adapter():
            base = engine.model(input_ids=ids).logits
        merged = engine.model.merge_and_unload()(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter matters...
    assert (merged - unmerged).abs().max() < 1e-5  # ...and merging keeps it exactly


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, tiny_run):
    out = tmp_path_factory.mktemp("export") / "merged"
    code = main(["export", f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", f"export.dir={out}",
                 "export.size=0.002", "export.gguf=f16,q8_0"])
    return code, out


def test_export_writes_sharded_self_contained_folder(exported, tiny_model_dir, tiny_run):
    code, out = exported
    assert code == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "Modelfile"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    # plain transformers loads it and gives the same greedy answer as base + adapter
    model = AutoModelForCausalLM.from_pretrained(out)
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)]))
    ids = engine.prompt_ids([Message("user", "Who are you?")], None)
    with torch.no_grad():
        plain = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    expected = engine.complete([Message("user", "Who are you?")], GenerationConfig(max_new_tokens=8))
    assert expected.text.strip() and engine.tokenizer.decode(plain, skip_special_tokens=True).strip() == \
        expected.text.strip()


def test_exported_files_are_readable_by_others_and_render_as_training(exported, tiny_model_dir, tiny_run):
    """Files get the mode a plain open gives (umask), not the 0600 of the temporary files they were written
    through; the exported tokenizer's chat template renders exactly what training rendered."""
    import os
    import stat

    from transformers import AutoTokenizer

    _, out = exported
    mask = os.umask(0)
    os.umask(mask)
    for path in [*out.glob("*.safetensors"), out / "Modelfile", out / "chat_template.jinja", out / "config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(tiny_run)]))
    tokenizer = AutoTokenizer.from_pretrained(out)
    turns = [Message("user", "Who are you?"), Message("assistant", "A model."), Message("user", "Sure?")]
    for system in (None, "Be brief."):
        chat = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": m.role, "content": m.content} for m in turns]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rendered == engine.template.render_prompt(turns, system, None)
    assert "SmolLM" not in (out / "chat_template.jinja").read_text()  # not the base tokenizer's default system


def test_export_prints_verification_including_gguf(tmp_path, tiny_model_dir, tiny_run, capsys):
    out = tmp_path / "e"
    assert main(["export", f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", f"export.dir={out}",
                 "export.gguf=bf16", "export.modelfile=false"]) == 0
    printed = capsys.readouterr().out
    assert "safetensors-fp32" in printed and "gguf-bf16" in printed and "FAILED" not in printed
    assert (out / "model-bf16.gguf").stat().st_size > 1000


def test_gguf_round_trip_through_transformers(exported, tiny_model_dir):
    _, out = exported
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 2, 198, 1, 4093, 198]])
    with torch.no_grad():
        reference = merged(input_ids=ids).logits
    # tolerances tied to the logits' own range (~1.4 for the tiny model): f16 rounding measured ~1e-4 of it,
    # q8_0 ~4e-3; the bounds leave ~8x and ~3x room, far below anything that would change the model's behaviour
    spread = (reference.max(-1).values - reference.min(-1).values).min().item()  # smallest per-position range
    for kind, share in (("f16", 1e-3), ("q8_0", 1e-2)):
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"model-{kind}.gguf", dtype=torch.float32)
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        diff = (logits - reference).abs().max().item()
        assert diff < share * spread, (kind, diff, spread)
        if kind == "f16":
            assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_modelfile_has_template_stop_words_and_gguf(exported):
    _, out = exported
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf")
    assert "{{ .Prompt }}" in text and "{{ .Response }}" in text and "{{ if .System }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_failed_verification_exits_nonzero(tmp_path, tiny_model_dir, tiny_run, capsys):
    code = main(["export", f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}",
                 f"export.dir={tmp_path / 'x'}", "export.tolerance=-1", "export.modelfile=false"])
    assert code == 1 and "FAILED" in capsys.readouterr().out


def test_quantized_base_message_names_the_fix(tmp_path, tiny_model_dir, tiny_run, capsys):
    assert main(["export", f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}",
                 "model.quantization_bit=4", f"export.dir={tmp_path / 'q'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot merge adapters into a quantized base" in err and "remove model.quantization_bit" in err


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_export_dtype_and_overwriting_an_earlier_export(dtype, exported, tmp_path, tiny_model_dir, tiny_run):
    """An fp32 export (several shards, two GGUF files) is replaced by a one-shard export in `dtype`: its tensors are
    the fp32 export's rounded to `dtype`, no stale shard or GGUF stays, and the user's own file is kept."""
    import shutil

    from safetensors import safe_open

    first = exported[1]
    out = shutil.copytree(first, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    base = [f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", f"export.dir={out}",
            f"export.dtype={dtype}", "export.gguf=[]"]
    assert main(["export", *base]) == 2  # not empty, overwrite not set: nothing touched
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in first.iterdir()] + ["notes.txt"])
    assert main(["export", *base, "export.overwrite=true"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]  # one shard, GGUFs gone
    assert (out / "notes.txt").read_text() == "mine"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert json.loads((out / "config.json").read_text())["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    index = json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / "model.safetensors", "pt") as new:
        assert sorted(new.keys()) == sorted(index)
        for name in index:
            with safe_open(first / index[name], "pt") as old:
                reference = old.get_tensor(name)
            tensor = new.get_tensor(name)
            assert reference.dtype == torch.float32 and tensor.dtype == torch_dtype, name
            assert torch.equal(tensor, reference.to(torch_dtype)), name


def test_llamafactory_export_keys(tmp_path, tiny_model_dir, tiny_run):
    out = tmp_path / "lf"
    assert main(["export", "--model_name_or_path", str(tiny_model_dir), "--adapter_name_or_path", str(tiny_run),
                 "--template", "chatml", "--finetuning_type", "lora", "--export_dir", str(out),
                 "--export_size", "1", "--export_device", "cpu"]) == 0
    info = json.loads((out / "tuneforge_run.json").read_text())
    assert info["template"] == "chatml" and info["dtype"] == "fp32"
