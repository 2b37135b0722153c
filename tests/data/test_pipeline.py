"""Loading, mixing, splitting, encoding and caching datasets."""

from __future__ import annotations

import pytest

from tuneforge.config import load
from tuneforge.data import build as build_module
from tuneforge.data.build import build_datasets
from tuneforge.data.pipeline import load_examples, mix, split_validation
from tuneforge.data.types import Conversation, Message
from tuneforge.templates import get_template

from ..conftest import write_json


def rows(n: int, tag: str = "q"):
    return [{"instruction": f"{tag} {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def config(dataset_dir, *extra):
    return load(None, [f"data.dataset_dir={dataset_dir}", "data.template=chatml", *extra])


def test_identity_substitution_and_max_samples(dataset_dir):
    write_json(dataset_dir / "identity.json", [{"instruction": "Who are you?", "input": "",
                                                "output": "I am {{name}}, made by {{author}}."}] * 3)
    write_json(dataset_dir / "dataset_info.json", {"identity": {"file_name": "identity.json"}})
    cfg = config(dataset_dir, "data.identity.name=Zed", "data.identity.author=Acme", "data.max_samples=2")
    loaded = load_examples(cfg.data, "identity", "sft", seed=1)
    assert len(loaded.examples) == 2
    assert loaded.examples[0].messages[-1].content == "I am Zed, made by Acme."


def test_builtin_identity_is_available_without_a_dataset_dir(tmp_path):
    cfg = load(None, [f"data.dataset_dir={tmp_path}", "data.identity.name=Zed"])
    loaded = load_examples(cfg.data, "identity", "sft", seed=1)
    assert len(loaded.examples) >= 40
    assert all("{{" not in e.messages[-1].content for e in loaded.examples)
    assert any("Zed" in e.messages[-1].content for e in loaded.examples)


def conv(tag: str) -> Conversation:
    return Conversation([Message("user", tag), Message("assistant", tag)], origin=tag)


def test_mix_concat_and_interleave():
    a, b = [conv(f"a{i}") for i in range(3)], [conv(f"b{i}") for i in range(10)]
    assert [e.origin for e in mix([a, b], "concat", [], 0)] == [e.origin for e in a + b]
    under = mix([a, b], "interleave_under", [0.5, 0.5], 0)
    assert sum(e.origin.startswith("a") for e in under) <= 3 and len(under) < 13
    over = mix([a, b], "interleave_over", [0.5, 0.5], 0)
    assert {e.origin for e in over} == {e.origin for e in a + b}
    assert mix([a, b], "interleave_under", [0.5, 0.5], 0) == under  # seeded


def test_validation_split_by_fraction_and_count():
    examples = [conv(str(i)) for i in range(20)]
    train, val = split_validation(examples, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert not {e.origin for e in train} & {e.origin for e in val}
    train, val = split_validation(examples, 4, seed=3)
    assert len(val) == 4
    assert split_validation(examples, 0.25, seed=3) == split_validation(examples, 0.25, seed=3)


def test_second_build_reuses_the_cache_without_tokenizing(dataset_dir, tokenizer, monkeypatch):
    write_json(dataset_dir / "a.json", rows(12))
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    cfg = config(dataset_dir, "data.dataset=a", "data.val_size=0.25")
    template = get_template("chatml", tokenizer)
    first = build_datasets(cfg.data, "sft", template, seed=1)
    assert not first.from_cache and len(first.train) == 9 and len(first.val) == 3

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(build_module, "encode_to_arrow", fail)
    second = build_datasets(cfg.data, "sft", template, seed=1)
    assert second.from_cache and second.train["input_ids"] == first.train["input_ids"]
    write_json(dataset_dir / "a.json", rows(12, tag="changed"))  # new content -> new key -> tokenizes again
    with pytest.raises(AssertionError, match="tokenized again"):
        build_datasets(cfg.data, "sft", template, seed=1)


def test_pretraining_packs_rows_into_full_blocks(dataset_dir, tokenizer):
    (dataset_dir / "c.txt").write_text("\n".join(f"line number {i} of the corpus" for i in range(50)), "utf-8")
    write_json(dataset_dir / "dataset_info.json", {"c": {"file_name": "c.txt", "columns": {"prompt": "text"}}})
    cfg = config(dataset_dir, "stage=pt", "data.dataset=c", "data.cutoff_len=64")
    data = build_datasets(cfg.data, "text", get_template("chatml", tokenizer), seed=1)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert all(n == 64 for n in lengths[:-1]) and lengths[-1] <= 64
    total = sum(len(tokenizer.encode(f"line number {i} of the corpus", add_special_tokens=False)) + 1
                for i in range(50))
    assert sum(lengths) == total


def test_multiprocess_tokenization_matches_single_process(dataset_dir, tokenizer, monkeypatch):
    monkeypatch.setattr("tuneforge.data.pipeline.CHUNK", 8)
    write_json(dataset_dir / "a.json", rows(30))
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    template = get_template("chatml", tokenizer)
    one = build_datasets(config(dataset_dir, "data.dataset=a").data, "sft", template, seed=1)
    two = build_datasets(config(dataset_dir, "data.dataset=a", "data.num_proc=2", "data.overwrite_cache=true").data,
                         "sft", template, seed=1)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


def test_arrow_encoding_keeps_the_same_rows_and_report_across_workers(tokenizer, monkeypatch, tmp_path):
    """Rows streamed to Arrow by two workers, chunk by chunk, equal the in-memory encoding: same kept rows in
    order, and a report that adds up every chunk's dropped, truncated and untrained rows."""
    from datasets import Dataset

    from tuneforge.data.encode import EncodeOptions
    from tuneforge.data.pipeline import encode_examples, encode_to_arrow

    monkeypatch.setattr("tuneforge.data.pipeline.CHUNK", 4)
    examples = []
    for i in range(22):
        answer = "word " * (60 if i % 5 == 0 else 3) + str(i)  # every fifth answer is too long for the cutoff
        examples.append(Conversation([Message("user", f"question {i}"), Message("assistant", answer)],
                                     origin=f"row {i}"))
    template = get_template("chatml", tokenizer)
    for overlong, dropped in (("drop", 5), ("truncate", 0)):
        opts = EncodeOptions(cutoff_len=40, overlong=overlong)
        rows, report = encode_examples(examples, template, opts, "sft")
        streamed = encode_to_arrow(examples, template, opts, "sft", tmp_path / f"{overlong}.arrow", num_proc=2)
        table = Dataset.from_file(str(tmp_path / f"{overlong}.arrow"))
        assert table["input_ids"] == [r["input_ids"] for r in rows] and table["labels"] == [r["labels"] for r in rows]
        assert table["origin"] == [r["origin"] for r in rows]
        assert streamed == report and len(report.dropped) == dropped and report.rows == 22
        assert len(rows) == 22 - dropped and (overlong == "drop" or len(report.truncated) == 5)


@pytest.mark.parametrize("strategy", ["concat", "interleave_under", "interleave_over"])
def test_mixing_strategies_through_the_config(strategy, dataset_dir, tokenizer, tmp_path):
    """Two datasets of 4 and 8 rows: concat keeps all 12 in order; interleave_under stops when the first runs out
    (so one dataset is used whole, the other in part); interleave_over goes on until both have run out once
    (every row of both used, the short one repeated)."""
    write_json(dataset_dir / "a.json", rows(4, "a"))
    write_json(dataset_dir / "b.json", rows(8, "b"))
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    cfg = config(dataset_dir, "data.dataset=[a,b]", f"data.mix_strategy={strategy}", "data.interleave_probs=[0.5,0.5]",
                 f"data.cache_dir={tmp_path / 'cache'}")
    built = build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), seed=3).train["origin"]
    origins = [o.removeprefix(f"{dataset_dir}/") for o in built]
    from_a = [o for o in origins if o.startswith("a.json")]
    from_b = [o for o in origins if o.startswith("b.json")]
    if strategy == "concat":
        assert origins == [f"a.json: row {i + 1}" for i in range(4)] + [f"b.json: row {i + 1}" for i in range(8)]
    elif strategy == "interleave_under":
        assert len(set(from_a)) == 4 or len(set(from_b)) == 8  # one ran out: the mix stopped there
        assert len(from_a) + len(from_b) < 12 and len(set(from_a)) == len(from_a) and len(set(from_b)) == len(from_b)
    else:
        assert len(set(from_a)) == 4 and len(set(from_b)) == 8 and len(origins) > 12  # both used whole, a repeated
