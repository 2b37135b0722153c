"""Row converters (alpaca, sharegpt, openai -> canonical types), the dataset catalog and the file readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.config import load
from tuneforge.config.schema import DataConfig
from tuneforge.data.catalog import OPENAI_TAGS, Columns, Tags, get_spec, load_catalog, parse_entry
from tuneforge.data.formats import as_text, to_example
from tuneforge.data.pipeline import load_examples
from tuneforge.data.readers import RawRow, read_file
from tuneforge.data.types import Conversation, KTOExample, Message, PreferencePair, Text
from tuneforge.errors import DataError

from ..conftest import write_json


def spec(formatting: str = "alpaca", **entry):
    """A DatasetSpec parsed exactly as a dataset_info.json entry would be."""
    return parse_entry("t", {"file_name": "t.json", "formatting": formatting, **entry}, Path("/base"), "test")


def convert(data: dict, formatting: str = "alpaca", want_text: bool = False, **entry):
    return to_example(RawRow(data, "t.json", 7), spec(formatting, **entry), want_text=want_text)


def user(text: str) -> Message:
    return Message("user", text)


def bot(text: str) -> Message:
    return Message("assistant", text)


def data_config(dataset_dir: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset_dir=str(dataset_dir), template="chatml", **kwargs)


# ---------------------------------------------------------------------------------------------------- alpaca


def test_alpaca_row_becomes_a_conversation_with_history_and_system():
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be terse.",
           "history": [["Hi", "Hello!"], ["How are you?", "Fine."]]}
    example = convert(row, columns={"system": "system", "history": "history"})
    assert example == Conversation(
        [user("Hi"), bot("Hello!"), user("How are you?"), bot("Fine."), user("Translate\nbonjour"), bot("hello")],
        system="Be terse.", tools=None, origin="t.json: row 7")


def test_alpaca_joins_instruction_and_input_only_when_both_are_given():
    assert convert({"instruction": "Q", "input": "", "output": "A"}).messages[0] == user("Q")
    assert convert({"instruction": "", "input": "only input", "output": "A"}).messages[0] == user("only input")
    assert convert({"instruction": "Q", "output": "A"}).messages == [user("Q"), bot("A")]  # no input column at all


def test_alpaca_system_and_history_are_ignored_unless_their_columns_are_set():
    row = {"instruction": "Q", "output": "A", "system": "S", "history": [["h", "r"]]}
    example = convert(row)
    assert example.system is None and example.messages == [user("Q"), bot("A")]


def test_alpaca_custom_column_names_and_a_list_of_responses_refused():
    row = {"q": "Name a colour", "ctx": "warm", "answers": "red"}
    example = convert(row, columns={"prompt": "q", "query": "ctx", "response": "answers"})
    assert example.messages == [user("Name a colour\nwarm"), bot("red")]
    row["answers"] = ["red", "orange"]  # LF 0.9.5 drops such a row; here it is named, not trained on
    with pytest.raises(DataError, match="field 'answers' must be one answer .* \"ranking\": true"):
        convert(row, columns={"prompt": "q", "query": "ctx", "response": "answers"})


def test_alpaca_ranking_row_becomes_a_preference_pair():
    row = {"instruction": "Pick", "input": "1 or 2", "chosen": "1", "rejected": "2", "history": [["a", "b"]]}
    example = convert(row, ranking=True, columns={"chosen": "chosen", "rejected": "rejected", "history": "history"})
    assert example == PreferencePair([user("a"), bot("b"), user("Pick\n1 or 2")], bot("1"), bot("2"),
                                     None, None, "t.json: row 7")


def test_alpaca_ranking_rejects_an_empty_rejected_answer():
    with pytest.raises(DataError, match=r"t.json: row 7: field 'rejected' is empty"):
        convert({"instruction": "Pick", "chosen": "1", "rejected": " "}, ranking=True,
                columns={"chosen": "chosen", "rejected": "rejected"})


@pytest.mark.parametrize(("tag", "label"), [(True, True), (False, False), ("true", True), ("False", False)])
def test_alpaca_kto_row_carries_its_label(tag, label):
    example = convert({"instruction": "Q", "output": "A", "ok": tag}, columns={"kto_tag": "ok"})
    assert example == KTOExample([user("Q"), bot("A")], label, None, None, "t.json: row 7")


def test_prompt_only_alpaca_row_is_plain_text():
    assert convert({"instruction": "Some text to pretrain on."}) == Text("Some text to pretrain on.", "t.json: row 7")
    assert convert({"text": "c4 style"}, columns={"prompt": "text"}) == Text("c4 style", "t.json: row 7")


def test_pretraining_asks_for_text_from_a_conversation():
    text = convert({"instruction": "Q", "input": "I", "output": "A"}, want_text=True)
    assert text == Text("Q\nI\nA", "t.json: row 7")
    pair = PreferencePair([user("p")], bot("good"), bot("bad"), origin="x")
    assert as_text(pair) == Text("p\ngood", "x")


# -------------------------------------------------------------------------------------------- sharegpt/openai


def test_sharegpt_with_explicit_tags_and_a_leading_system_turn():
    row = {"conversations": [{"from": "system", "value": "You are Zed."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Goodbye"}]}
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    example = convert(row, "sharegpt", tags=tags)
    assert example == Conversation([user("Hi"), bot("Hello"), user("Bye"), bot("Goodbye")], "You are Zed.", None,
                                   "t.json: row 7")


def test_sharegpt_with_custom_role_and_content_names():
    row = {"dialog": [{"speaker": "sys", "text": "Rules."}, {"speaker": "me", "text": "Q"},
                      {"speaker": "bot", "text": "A"}]}
    example = convert(row, "sharegpt", columns={"messages": "dialog"},
                      tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot",
                            "system_tag": "sys"})
    assert example.messages == [user("Q"), bot("A")] and example.system == "Rules."


def test_sharegpt_default_tags_do_not_accept_openai_roles():
    with pytest.raises(DataError, match=r"turn 1: role 'user' \(key 'from'\) is unknown"):
        convert({"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}, "sharegpt")


def test_system_column_wins_over_a_system_turn():
    row = {"conversations": [{"from": "system", "value": "inline"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}], "sys": "column"}
    assert convert(row, "sharegpt", columns={"system": "sys"}).system == "column"
    row["sys"] = " "
    assert convert(row, "sharegpt", columns={"system": "sys"}).system == "inline"


def test_openai_messages_use_role_and_content_by_default():
    row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    example = convert(row, "openai")
    assert example == Conversation([user("Q"), bot("A")], "Be kind.", None, "t.json: row 7")
    openai = spec("openai")
    assert openai.tags == OPENAI_TAGS and openai.columns.messages == "messages"


def test_tool_turns_map_to_function_and_observation_roles():
    call = {"name": "weather", "arguments": {"city": "Paris"}}
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": call},
                             {"from": "observation", "value": "18C, sunny"},
                             {"from": "gpt", "value": "It is 18C and sunny."}]}
    example = convert(row, "sharegpt")
    assert [m.role for m in example.messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(example.messages[1].content) == call  # an object call is stored as its JSON text
    openai_row = {"messages": [{"role": "user", "content": "Q"},
                               {"role": "function_call", "content": None, "tool_calls": [call]},
                               {"role": "tool", "content": "result"}, {"role": "assistant", "content": "A"}]}
    example = convert(openai_row, "openai")
    assert [m.role for m in example.messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(example.messages[1].content) == [call]


def test_sharegpt_ranking_and_kto():
    base = [{"from": "human", "value": "Q"}]
    pair = convert({"conversations": base, "chosen": {"from": "gpt", "value": "good"}, "rejected": "bad"},
                   "sharegpt", ranking=True, columns={"chosen": "chosen", "rejected": "rejected"})
    assert pair == PreferencePair([user("Q")], bot("good"), bot("bad"), None, None, "t.json: row 7")
    kto = convert({"conversations": base + [{"from": "gpt", "value": "A"}], "label": "false"}, "sharegpt",
                  columns={"kto_tag": "label"})
    assert isinstance(kto, KTOExample) and kto.label is False and kto.messages == [user("Q"), bot("A")]


def test_blank_system_and_tools_mean_none():
    """The LLaMA-Factory tutorial's conversion script writes " " for a missing system prompt and tools."""
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": " ",
           "tools": " "}
    example = convert(row, "sharegpt", columns={"system": "system", "tools": "tools"})
    assert example.system is None and example.tools is None
    alpaca = convert({"instruction": "Q", "output": "A", "system": " ", "tools": " "},
                     columns={"system": "system", "tools": "tools"})
    assert alpaca.system is None and alpaca.tools is None
    turn = convert({"conversations": [{"from": "system", "value": "  "}, *row["conversations"]]}, "sharegpt")
    assert turn.system is None and turn.messages == [user("Q"), bot("A")]


@pytest.mark.parametrize("given", [
    '[{"name": "f", "parameters": {}}]',
    ' [ {"name" : "f", "parameters" : {}} ] ',
    '{"name": "f", "parameters": {}}',
    [{"name": "f", "parameters": {}}],
    {"name": "f", "parameters": {}},
])
def test_tools_normalise_to_a_json_list_string(given):
    example = convert({"instruction": "Q", "output": "A", "tools": given}, columns={"tools": "tools"})
    assert example.tools == '[{"name": "f", "parameters": {}}]'


def test_tools_keep_non_ascii_text():
    example = convert({"instruction": "Q", "output": "A", "tools": [{"name": "天气"}]}, columns={"tools": "tools"})
    assert example.tools == '[{"name": "天气"}]'


def test_empty_tool_list_as_json_text_means_none():
    assert convert({"instruction": "Q", "output": "A", "tools": "[]"}, columns={"tools": "tools"}).tools is None


def test_empty_tool_list_means_none():
    assert convert({"instruction": "Q", "output": "A", "tools": []}, columns={"tools": "tools"}).tools is None


def test_tools_that_are_not_function_objects_are_refused():
    with pytest.raises(DataError, match=r"t.json: row 7: field 'tools' must be a list of function schemas"):
        convert({"instruction": "Q", "output": "A", "tools": '["f"]'}, columns={"tools": "tools"})


# --------------------------------------------------------------------------------------------------- catalog


TUTORIAL_INFO = {
    "my_alpaca": {"file_name": "my_alpaca.json"},
    "my_sharegpt": {
        "file_name": "my_sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    },
}
WEATHER = [{"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_llamafactory_tutorial_dataset_info_works_unchanged(dataset_dir):
    write_json(dataset_dir / "dataset_info.json", TUTORIAL_INFO)
    write_json(dataset_dir / "my_alpaca.json", [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
    ])
    write_json(dataset_dir / "my_sharegpt.json", [
        {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                           {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                           {"from": "observation", "value": '{"temp": 18}'},
                           {"from": "gpt", "value": "18 degrees."}],
         "system": "You are a weather bot.", "tools": json.dumps(WEATHER)},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
         "system": " ", "tools": " "},
    ])
    data = data_config(dataset_dir, dataset=["my_alpaca", "my_sharegpt"])
    alpaca = load_examples(data, "my_alpaca", "sft", seed=0)
    assert alpaca.raw_count == 2 and alpaca.spec.location == str(dataset_dir / "my_alpaca.json")
    assert alpaca.examples[1].messages == [user("Translate to French\ngood morning"), bot("bonjour")]
    assert alpaca.examples[1].origin == f"{dataset_dir / 'my_alpaca.json'}: row 2"
    share = load_examples(data, "my_sharegpt", "sft", seed=0)
    first, second = share.examples
    assert [m.role for m in first.messages] == ["user", "function", "observation", "assistant"]
    assert first.system == "You are a weather bot." and json.loads(first.tools) == WEATHER
    assert second.system is None and second.tools is None


def test_user_dataset_info_overrides_a_builtin_name(dataset_dir, tmp_path):
    builtin = load_examples(data_config(tmp_path / "nowhere"), "identity", "sft", seed=0)
    assert builtin.raw_count > 10 and "builtin" in builtin.spec.location
    write_json(dataset_dir / "mine.json", [{"instruction": "Who are you?", "output": "Mine."}])
    write_json(dataset_dir / "dataset_info.json", {"identity": {"file_name": "mine.json"}})
    loaded = load_examples(data_config(dataset_dir), "identity", "sft", seed=0)
    assert loaded.raw_count == 1 and loaded.examples[0].messages[-1] == bot("Mine.")
    assert loaded.spec.defined_in == str(dataset_dir / "dataset_info.json")


def test_inline_definition_with_path(dataset_dir, tmp_path):
    outside = write_json(tmp_path / "elsewhere" / "rows.json", [{"instruction": "Q", "output": "A"}])
    write_json(dataset_dir / "rel.json", [{"prompt": "P", "answer": "R"}])
    inline = {"abs": {"path": str(outside)},
              "rel": {"path": "rel.json", "columns": {"prompt": "prompt", "response": "answer"}}}
    data = data_config(dataset_dir, inline=inline)
    assert load_examples(data, "abs", "sft", seed=0).examples[0].messages == [user("Q"), bot("A")]
    rel = load_examples(data, "rel", "sft", seed=0)
    assert rel.examples[0].messages == [user("P"), bot("R")]
    assert rel.spec.location == str(dataset_dir / "rel.json") and rel.spec.defined_in == "config data.inline"


def test_inline_definition_from_a_yaml_config_overrides_dataset_info(dataset_dir, tmp_path):
    write_json(dataset_dir / "a.json", [{"instruction": "from info", "output": "A"}])
    (dataset_dir / "b.jsonl").write_text(json.dumps({"instruction": "from inline", "output": "B"}) + "\n",
                                         encoding="utf-8")
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset_dir": str(dataset_dir), "dataset": ["a"],
                                               "inline": {"a": {"path": "b.jsonl"}}}}), encoding="utf-8")
    cfg = load(config)
    assert load_examples(cfg.data, "a", "sft", seed=0).examples[0].messages[0] == user("from inline")


def test_inline_entries_are_validated_like_dataset_info():
    with pytest.raises(DataError, match=r"config data.inline: dataset 'x': unknown key 'paht'. Did you mean 'path'"):
        load_catalog("/nonexistent", {"x": {"paht": "x.json"}})


def test_catalog_sources_and_defaults(monkeypatch):
    assert spec().columns == Columns() and spec().tags == Tags()
    assert spec(file_name="/abs/f.json").location == "/abs/f.json"
    assert spec().location == "/base/t.json"
    hub = parse_entry("h", {"hf_hub_url": "org/set", "ms_hub_url": "ms/set", "subset": "en", "split": "test"},
                      Path("/base"), "test")
    assert (hub.source, hub.location, hub.subset, hub.split) == ("hf_hub", "org/set", "en", "test")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    hub = parse_entry("h", {"hf_hub_url": "org/set", "ms_hub_url": "ms/set"}, Path("/base"), "test")
    assert (hub.source, hub.location) == ("ms_hub", "ms/set")
    with pytest.raises(DataError, match="num_samples must be a positive whole number"):
        spec(num_samples=0)
    with pytest.raises(DataError, match="script_url and cloud_file_name are not supported"):
        parse_entry("s", {"script_url": "x"}, Path("/base"), "test")


def test_get_spec_suggests_a_close_name(tmp_path):
    catalog = load_catalog(tmp_path)
    with pytest.raises(DataError, match=r"dataset 'identiti' is not registered. Did you mean 'identity'\?"):
        get_spec(catalog, "identiti", tmp_path)


# --------------------------------------------------------------------------------------------------- readers


def test_csv_reader(dataset_dir):
    (dataset_dir / "a.csv").write_text('instruction,input,output\nSay hi,,hi\n"Quote, with comma",x,"said ""yes"""\n',
                                       encoding="utf-8")
    rows = list(read_file(dataset_dir / "a.csv"))
    assert [r.row for r in rows] == [1, 2]
    assert rows[1].data == {"instruction": "Quote, with comma", "input": "x", "output": 'said "yes"'}
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.csv"}})
    examples = load_examples(data_config(dataset_dir), "a", "sft", seed=0).examples
    assert examples[0].messages == [user("Say hi"), bot("hi")]
    assert examples[1].messages == [user("Quote, with comma\nx"), bot('said "yes"')]


def test_csv_quoted_field_keeps_its_line_breaks(dataset_dir):
    (dataset_dir / "a.csv").write_text('instruction,output\n"line1\nline2",ok\n', encoding="utf-8")
    assert next(read_file(dataset_dir / "a.csv")).data["instruction"] == "line1\nline2"


def test_jsonl_reader_numbers_lines_and_skips_blank_ones(dataset_dir):
    lines = [json.dumps({"instruction": "one", "output": "1"}), "", "  ",
             json.dumps({"instruction": "four", "output": "4"}, ensure_ascii=False)]
    (dataset_dir / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = list(read_file(dataset_dir / "a.jsonl"))
    assert [(r.row, r.data["instruction"]) for r in rows] == [(1, "one"), (4, "four")]
    assert rows[1].origin == f"{dataset_dir / 'a.jsonl'}: row 4"


def test_json_lines_saved_with_a_json_suffix(dataset_dir):
    (dataset_dir / "a.json").write_text('{"instruction": "a", "output": "1"}\n{"instruction": "b", "output": "2"}\n',
                                        encoding="utf-8")
    assert [r.data["instruction"] for r in read_file(dataset_dir / "a.json")] == ["a", "b"]


def test_utf8_bom_is_accepted(dataset_dir):
    (dataset_dir / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "q", "output": "a"}]).encode())
    assert next(read_file(dataset_dir / "a.json")).data == {"instruction": "q", "output": "a"}


def test_jsonl_row_with_a_unicode_line_separator(dataset_dir):
    row = {"instruction": "first\u2028second", "output": "a\x85b"}
    (dataset_dir / "a.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r.data for r in read_file(dataset_dir / "a.jsonl")] == [row]


def test_parquet_reader(dataset_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["Q1", "Q2"], "input": [None, "ctx"], "output": ["A1", "A2"],
                      "history": [[["h", "r"]], []]})
    pq.write_table(table, dataset_dir / "a.parquet")
    rows = list(read_file(dataset_dir / "a.parquet"))
    assert [r.row for r in rows] == [1, 2] and rows[0].data["history"] == [["h", "r"]]
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.parquet", "columns": {"history": "history"}}})
    first, second = load_examples(data_config(dataset_dir), "a", "sft", seed=0).examples
    assert first.messages == [user("h"), bot("r"), user("Q1"), bot("A1")]
    assert second.messages == [user("Q2\nctx"), bot("A2")]


def test_txt_reader_gives_pretraining_text(dataset_dir):
    (dataset_dir / "corpus.txt").write_text("The first line.\n\nThe third line.\n", encoding="utf-8")
    rows = list(read_file(dataset_dir / "corpus.txt"))
    assert [(r.row, r.data) for r in rows] == [(1, {"text": "The first line."}), (3, {"text": "The third line."})]
    write_json(dataset_dir / "dataset_info.json", {"c": {"file_name": "corpus.txt", "columns": {"prompt": "text"}}})
    examples = load_examples(data_config(dataset_dir), "c", "text", seed=0).examples
    assert examples == [Text("The first line.", f"{dataset_dir / 'corpus.txt'}: row 1"),
                        Text("The third line.", f"{dataset_dir / 'corpus.txt'}: row 3")]


def test_folder_of_files_is_read_in_name_order(dataset_dir):
    write_json(dataset_dir / "set" / "b.json", [{"instruction": "b", "output": "2"}])
    (dataset_dir / "set" / "a.jsonl").write_text(json.dumps({"instruction": "a", "output": "1"}) + "\n",
                                                 encoding="utf-8")
    (dataset_dir / "set" / "notes.md").write_text("not data", encoding="utf-8")
    write_json(dataset_dir / "dataset_info.json", {"s": {"file_name": "set"}})
    examples = load_examples(data_config(dataset_dir), "s", "sft", seed=0).examples
    assert [e.messages[0].content for e in examples] == ["a", "b"]


def test_unsupported_file_type(dataset_dir):
    (dataset_dir / "a.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"a.xlsx: unsupported file type '.xlsx'"):
        list(read_file(dataset_dir / "a.xlsx"))


def test_a_dataset_info_with_multimodal_entries_serves_its_text_sets(dataset_dir):
    """LLaMA-Factory's data/dataset_info.json registers image/video/audio sets beside the text ones; only asking for
    one of those is refused (entries as in LF's file: mllm_demo with an images column, a script_url entry)."""
    write_json(dataset_dir / "a.json", [{"instruction": "Q", "input": "", "output": "A"}])
    write_json(dataset_dir / "dataset_info.json", {
        "alpaca_mine": {"file_name": "a.json"},
        "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "old_script": {"script_url": "some/script"},
    })
    data = data_config(dataset_dir)
    assert load_examples(data, "alpaca_mine", "sft", seed=0).examples[0].messages == [user("Q"), bot("A")]
    with pytest.raises(DataError, match="dataset 'mllm_demo': columns: 'images' columns \\(multimodal data\\)"):
        load_examples(data, "mllm_demo", "sft", seed=0)
    with pytest.raises(DataError, match="dataset 'old_script': script_url and cloud_file_name are not supported"):
        load_examples(data, "old_script", "sft", seed=0)
