"""Training data built without holding every row: files read row by row, rows kept on disk (RowStore) and mixed,
split and encoded by reference, in this process or in workers."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from tuneforge.config import load
from tuneforge.data import build as build_module
from tuneforge.data.build import build_datasets
from tuneforge.data.pipeline import encode_examples, load_examples, mix, split_validation
from tuneforge.data.readers import read_file
from tuneforge.errors import DataError
from tuneforge.templates import get_template

from ..conftest import write_json

VALID = ['[]', ' [ ] \n', '[{"a": 1}]', '\ufeff[{"a": 1},\n{"b": "\u00e9\u4e16\U0001f600"}]', '\n[\n {"a": "x\u2028y"} ,\n\t{"b": [1, {"c": null}]}\n]\n',
         '[{"instruction": "\u4f60\u597d", "output": "\\u4e16\\u754c"}, {}]']
INVALID = ['[{"a": 1},\n {"b": "\u4e16\u4e16"}, {"c": "x"} {"d": 2}]', '[{"a": 1}, {"b": "x\ny"}]', '[{"a": 1} {"b": 2}]', '[{"a": 1},]', '[{"a": 1}', '[{"a": 1}] x', '[{"a": 1}]\n\n[', '[', '[{"a": }]',
           '[{"a": 1},\n {"b": 2}\n {"c": 3}]']


@pytest.mark.parametrize("block", [1 << 20, 7, 1])
@pytest.mark.parametrize("text", VALID)
def test_a_json_list_is_read_one_row_at_a_time_into_the_rows_json_loads_gives(text, block, tmp_path, monkeypatch):
    """Read in blocks of `block` bytes (rows and multi-byte characters cut across blocks, parsed text dropped)."""
    monkeypatch.setattr("tuneforge.data.readers._TextStream.BLOCK", block)
    (tmp_path / "a.json").write_text(text, "utf-8")
    rows = list(read_file(tmp_path / "a.json"))
    assert [r.data for r in rows] == json.loads(text.removeprefix("\ufeff"))
    assert [r.row for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize("block", [1 << 20, 7, 1])
@pytest.mark.parametrize("text", INVALID)
def test_a_broken_json_list_names_the_line_column_and_reason_json_loads_names(text, block, tmp_path, monkeypatch):
    monkeypatch.setattr("tuneforge.data.readers._TextStream.BLOCK", block)
    (tmp_path / "a.json").write_text(text, "utf-8")
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    err = reference.value
    with pytest.raises(DataError) as raised:
        list(read_file(tmp_path / "a.json"))
    assert str(raised.value) == f"{tmp_path / 'a.json'}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}"


def test_a_json_list_item_that_is_not_an_object_is_named_by_its_row(tmp_path):
    (tmp_path / "a.json").write_text('[{"a": 1}, {"a": 2}, "text"]', "utf-8")
    with pytest.raises(DataError, match=r"a.json: row 3: expected an object with named fields, got str"):
        list(read_file(tmp_path / "a.json"))


def test_a_json_list_with_a_bad_byte_names_its_line_and_byte(tmp_path, monkeypatch):
    monkeypatch.setattr("tuneforge.data.readers._TextStream.BLOCK", 5)
    content = b'[{"a": 1},\n {"a": "\xc3\xa9"},\n {"a": "\xe9"}]'
    (tmp_path / "a.json").write_bytes(content)
    bad = content.index(b"\xe9\"")
    with pytest.raises(DataError, match=rf"a.json: line 3: not UTF-8 text \(byte {bad}: b'\\xe9'\)"):
        list(read_file(tmp_path / "a.json"))


def test_json_lines_are_read_line_by_line_with_bom_crlf_and_a_bad_byte_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": "\xc3\xa9"}\n')
    assert [(r.data, r.row) for r in read_file(path)] == [({"a": 1}, 1), ({"a": "\u00e9"}, 3)]
    content = b'{"a": 1}\n{"a": 2}\n{"a": "\xe9"}\n'
    path.write_bytes(content)
    bad = content.index(b"\xe9")
    with pytest.raises(DataError, match=rf"a.jsonl: line 3: not UTF-8 text \(byte {bad}: "):
        list(read_file(path))


def rows(n: int, tag: str):
    return [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(n)]


def pairs(n: int):
    return [{"conversations": [{"from": "human", "value": f"pick {i}"}], "chosen": {"from": "gpt", "value": f"good {i}"},
             "rejected": {"from": "gpt", "value": f"bad {i}"}} for i in range(n)]


@pytest.mark.parametrize("kind,num_proc", [("sft", None), ("sft", 2), ("kto", 2), ("pairwise", None)])
def test_rows_built_by_reference_equal_the_rows_built_in_memory(kind, num_proc, dataset_dir, tokenizer, tmp_path,
                                                                monkeypatch):
    """Two datasets (one sampled past its size, so rows repeat) interleaved, split and encoded by reference, in
    chunks of 4 rows, equal the same examples loaded into memory and encoded in one go; kto reads each preference
    pair as a desirable and an undesirable row."""
    monkeypatch.setattr("tuneforge.data.pipeline.CHUNK", 4)
    if kind == "sft":
        write_json(dataset_dir / "a.json", rows(9, "a"))
        (dataset_dir / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows(7, "b")), "utf-8")
        info = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl", "num_samples": 10}}
    else:
        write_json(dataset_dir / "a.json", pairs(9))
        write_json(dataset_dir / "b.json", pairs(7))
        entry = {"formatting": "sharegpt", "ranking": True, "columns": {"messages": "conversations",
                                                                         "chosen": "chosen", "rejected": "rejected"}}
        info = {"a": dict(entry, file_name="a.json"), "b": dict(entry, file_name="b.json", num_samples=10)}
    write_json(dataset_dir / "dataset_info.json", info)
    extra = [f"data.num_proc={num_proc}"] if num_proc else []
    cfg = load(None, [f"data.dataset_dir={dataset_dir}", "data.template=chatml", "data.dataset=[a,b]",
                      "data.mix_strategy=interleave_over", "data.interleave_probs=[0.4,0.6]", "data.val_size=0.2",
                      f"data.cache_dir={tmp_path / 'cache'}", *extra])
    template = get_template("chatml", tokenizer)
    built = build_datasets(cfg.data, kind, template, seed=5)

    groups = [load_examples(cfg.data, name, kind, 5).examples for name in ("a", "b")]
    train, val = split_validation(mix(groups, "interleave_over", [0.4, 0.6], 5), 0.2, 5)
    expected, _ = encode_examples(train, template, built_options(cfg), kind)
    expected_val, _ = encode_examples(val, template, built_options(cfg), kind)
    assert len(built.train) == len(expected) > 16  # repeats and (kto) halves
    assert built.train.to_list() == [dict(r) for r in expected]
    assert built.val.to_list() == [dict(r) for r in expected_val]
    if kind == "kto":
        assert built.train["kto_label"] != [True] * len(expected) != [False] * len(expected)
    assert not list((tmp_path / "cache").glob("*tmp*")), "the build folder and its row files are gone"
    assert sorted(p.name for p in (tmp_path / "cache" / built.key).iterdir()) == ["report.json", "train.arrow",
                                                                                    "val.arrow"]


def built_options(cfg):
    from tuneforge.data.build import encode_options

    return encode_options(cfg.data)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_bad_row_found_while_encoding_is_named_and_leaves_no_cache(num_proc, dataset_dir, tokenizer, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr("tuneforge.data.pipeline.CHUNK", 4)
    data = rows(30, "a")
    data[21]["output"] = ["two", "answers"]
    write_json(dataset_dir / "a.json", data)
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    extra = [f"data.num_proc={num_proc}"] if num_proc else []
    cfg = load(None, [f"data.dataset_dir={dataset_dir}", "data.template=chatml", "data.dataset=a",
                      f"data.cache_dir={tmp_path / 'cache'}", *extra])
    with pytest.raises(DataError, match=r"a.json: row 22: field 'output' must be one answer.*run `tuneforge data check`"):
        build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), seed=1)
    assert not list((tmp_path / "cache").iterdir())


def test_an_empty_dataset_is_named_before_anything_is_encoded(dataset_dir, tokenizer, tmp_path):
    (dataset_dir / "a.jsonl").write_text("\n\n", "utf-8")
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.jsonl"}})
    cfg = load(None, [f"data.dataset_dir={dataset_dir}", "data.template=chatml", "data.dataset=a",
                      f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match="dataset 'a' has no rows"):
        build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), seed=1)


def test_building_memory_does_not_grow_with_the_dataset(dataset_dir, tokenizer, tmp_path, monkeypatch):
    """The same ~1 KB rows, 1,500 then 3,000 of them (JSON lines), stored, mixed, split and encoded in this process,
    chunks of 64 rows: the Python memory at its peak (tracemalloc) grows by less than a third of what the file
    grows by (row references and the split's bookkeeping, ~150 bytes a row). Holding the rows as Python objects,
    as the in-memory path does, grows it by about four times the file's growth."""
    monkeypatch.setattr("tuneforge.data.pipeline.CHUNK", 64)
    key = build_module.cache_key
    # the key hashes the tokenizer's JSON (~10 MB at its peak, whatever the data): measured from after it
    monkeypatch.setattr(build_module, "cache_key", lambda *args: (key(*args), tracemalloc.reset_peak())[0])
    template = get_template("chatml", tokenizer)
    words = " ".join(f"w{j}" for j in range(80))

    def peak(count: int) -> tuple[int, int, int]:
        folder = dataset_dir / str(count)
        folder.mkdir()
        with (folder / "big.jsonl").open("w", encoding="utf-8") as file:
            for i in range(count):
                file.write(json.dumps({"instruction": f"{i} {words}", "input": "", "output": f"{words} {i}"}) + "\n")
        write_json(folder / "dataset_info.json", {"big": {"file_name": "big.jsonl"}})
        cfg = load(None, [f"data.dataset_dir={folder}", "data.template=chatml", "data.dataset=big",
                          "data.cutoff_len=1024", "data.val_size=0.1", f"data.cache_dir={tmp_path / str(count)}"])
        tracemalloc.start()
        try:
            built = build_datasets(cfg.data, "sft", template, seed=1)
            top = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(built.train) == count * 9 // 10 and len(built.val) == count // 10
        return top, (folder / "big.jsonl").stat().st_size, len(load_examples(cfg.data, "big", "sft", 1).examples)

    peak(40)  # every module imported before measuring
    small, small_size, _ = peak(1500)
    large, large_size, _ = peak(3000)
    assert large_size - small_size > 1_000_000
    assert large - small < (large_size - small_size) / 3, (small, large, small_size, large_size)
