"""Golden fixtures for tuneforge's named templates, made by LLaMA-Factory 0.9.5 itself.

Run it with LF's own interpreter (LF is never imported by tuneforge or its tests):

    DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 ~/.cache/tuneforge-bench/lf-0.9.5/bin/python \
        scripts/make_lf_template_fixtures.py [--tokenizer DIR] [--out tests/fixtures/lf_templates] [names...]

For each template name it builds SmolLM2's real tokenizer augmented with that family's special tokens (the rule is
`special_tokens` below; the fixture records the result so the tests rebuild the very same tokenizer), lets LF fix
the tokenizer and the template (`get_template_and_fix_tokenizer`), and stores, per conversation, what LF's
supervised processor trains on (`input_ids`, `labels`) and what its chat engine generates from (`prompt_ids`).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

from llamafactory.data import tool_utils
from llamafactory.data.mm_plugin import get_mm_plugin
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.data.template import TEMPLATES, ReasoningTemplate, get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer

LF_VERSION = "0.9.5"
DEFAULT_TOKENIZER = Path.home() / ".cache/tuneforge/models/smollm2-135m-instruct"
OUT = Path(__file__).resolve().parents[1] / "tests/fixtures/lf_templates"
FIXED_DATE = "26 Jul 2024"  # llama3's tool prompt prints today's date; fixtures freeze it

# Text templates tuneforge ships (LF 0.9.5 has 121 names; the others are multimodal or use gemma4's tool syntax).
NAMES = """
alpaca bailing bailing_v2 breeze chatglm3 chatml chatml_de cohere cpm4 dbrx deepseek deepseek3 deepseekr1 hy3
deepseekcoder default empty ernie ernie_nothink exaone falcon falcon_h1 fewshot gemma gemma2 gemma3 gemma3n glm4
glm4_moe glm4_7 glmz1 gpt_oss granite3 granite4 index hunyuan hunyuan_small intern2 lfm2 llama2 llama2_zh llama3
llama4 moonlight mimo mimo_v2 minimax1 minimax2 ministral mistral mistral_small ministral3 olmo openchat openchat-3.6
opencoder phi phi_small phi4 pixtral qwen qwen3 qwen3_nothink qwen2_vl qwen3_vl qwen3_vl_nothink qwen3_5
qwen3_5_nothink qwen3_6 sailor seed_coder seed_oss smollm smollm2 solar starchat telechat2 vicuna xuanyuan yi youtu
yuan zephyr aeva
""".split()
# Tool formats tried on a chatml-style (qwen) and a plain (default) template through LF's `tool_format` override.
TOOL_FORMATS = ["default", "glm4", "llama3", "mistral", "qwen", "qwen3_5", "glm4_moe", "seed_oss", "minimax1",
                "minimax2", "ling", "lfm2"]
TOOL_FORMAT_HOSTS = ["qwen", "default"]
TOOL_CONVERSATIONS = ("tools", "tools_no_system", "tools_parallel")

# The family's bos/eos (None: the family's tokenizer has none). Unlisted names use <s> and </s>.
FAMILY_TOKENS = {
    **{n: (None, "<|endoftext|>") for n in ("qwen", "qwen3", "qwen3_nothink", "qwen2_vl", "qwen3_vl",
                                             "qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink", "qwen3_6", "mimo",
                                             "mimo_v2", "chatml", "chatml_de", "dbrx", "opencoder", "sailor",
                                             "glm4", "glm4_moe", "glm4_7", "glmz1", "aeva", "chatglm3", "falcon",
                                             "falcon_h1", "olmo", "phi4", "lfm2", "moonlight")},
    **{n: ("<|begin_of_text|>", "<|end_of_text|>") for n in ("llama3", "llama4", "openchat-3.6")},
    **{n: ("<bos>", "<eos>") for n in ("gemma", "gemma2", "gemma3", "gemma3n")},
    **{n: ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>") for n in ("deepseek3", "deepseekr1", "deepseekcoder")},
    **{n: ("<|im_start|>", "<|im_end|>") for n in ("smollm", "smollm2", "yi", "intern2", "cpm4")},
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "gpt_oss": ("<|startoftext|>", "<|return|>"),
    "granite3": ("<|end_of_text|>", "<|end_of_text|>"),
    "granite4": ("<|end_of_text|>", "<|end_of_text|>"),
    "hunyuan": ("<|startoftext|>", "<|eos|>"),
    "seed_coder": ("<[begin▁of▁sentence]>", "<[end▁of▁sentence]>"),
    "seed_oss": ("<seed:bos>", "<seed:eos>"),
    "exaone": ("[BOS]", "[|endofturn|]"),
    "phi": ("<s>", "<|endoftext|>"),
    "phi_small": ("<|endoftext|>", "<|endoftext|>"),
    "openchat": ("<s>", "<|end_of_turn|>"),
    "minimax1": (None, "<end_of_sentence>"),
    "minimax2": ("]~!b[", "[e~["),
    "ernie": ("<s>", "</s>"),
}
# Tag-like strings in a template's formats that its family's tokenizer holds as single tokens.
TAG = re.compile(r"<\|[^<>\s]*?\|>|<｜[^<>]*?｜>|<\[[^<>\]]*?\]>|\[\|[a-z]+\|\]|\[/?[A-Z_]+\]|\[gMASK\]|"
                 r"</?[a-z_:]+>|\]~!?b\[|\[e~\[")


def special_tokens(template, name: str) -> tuple[str | None, str, list[str]]:
    """The augmentation rule: the family's bos/eos, its literal token slots, stop words and tag-like strings."""
    bos, eos = FAMILY_TOKENS.get(name, ("<s>", "</s>"))
    texts, tokens = [], []
    for formatter in (template.format_prefix, template.format_system, template.format_user,
                      template.format_assistant, template.format_function, template.format_observation):
        for slot in formatter.slots:
            if isinstance(slot, str):
                texts.append(slot)
            elif isinstance(slot, dict):
                tokens.append(slot["token"])
    texts += list(template.thought_words) + list(template.tool_call_words)
    tokens += list(template.stop_words)
    tokens += [m for text in texts for m in TAG.findall(text)]
    tokens += [t for t in (bos, eos) if t]
    return bos, eos, list(dict.fromkeys(tokens))


def build_tokenizer(base: Path, spec: dict):
    """SmolLM2's tokenizer plus the recorded special tokens, bos and eos (tests do the same on their side)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(spec["added_special_tokens"], special_tokens=True)
    tokenizer.bos_token = spec["bos_token"]
    tokenizer.eos_token = spec["eos_token"]
    return tokenizer


TOOLS = [
    {"name": "get_weather", "description": "Get the current weather of a city",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string", "description": "City name, e.g. Paris"},
         "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}},
         "required": ["city"]}},
    {"type": "function", "function": {
        "name": "search_news", "description": "Search recent news",
        "parameters": {"type": "object", "properties": {
            "topics": {"type": "array", "description": "Topics to search", "items": {"type": "string"}},
            "limit": {"type": "integer", "description": "How many results"}}, "required": ["topics"]}}},
]


def conversations(thought: tuple[str, str]) -> dict[str, dict]:
    """Conversations in LF's message format; reasoning text uses the template's own thought words."""
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    calls = [call, {"name": "search_news", "arguments": {"topics": ["巴黎", "weather"], "limit": 3}}]
    think = f"{thought[0]}The user asks for a sum; 2 + 2 is 4.{thought[1]}"

    def m(role, content):
        return {"role": role, "content": content}

    return {
        "single": {"messages": [m("user", "Hello there!"), m("assistant", "Hi! How can I help?")]},
        "single_system": {"system": "You are a careful assistant.",
                          "messages": [m("user", "Hello there!"), m("assistant", "Hi! How can I help?")]},
        "multi_turn": {"system": "Be brief.", "messages": [
            m("user", "Hello there!"), m("assistant", "Hi! How can I help?"),
            m("user", "What is 2 + 2?"), m("assistant", "2 + 2 = 4."),
            m("user", "And 3 + 3?"), m("assistant", "6.")]},
        "cjk": {"messages": [m("user", "你好，请介绍一下北京。"), m("assistant", "北京是中国的首都。"),
                             m("user", "日本の首都は？"), m("assistant", "東京です。")]},
        "whitespace": {"system": "  Spaced system.\n", "messages": [
            m("user", "\n  Indented question?  \n"), m("assistant", "  Indented answer.\n\n")]},
        "tools": {"system": "You can use tools.", "tools": json.dumps(TOOLS, ensure_ascii=False), "messages": [
            m("user", "What's the weather in Paris?"), m("function", json.dumps(call, ensure_ascii=False)),
            m("observation", '{"temperature": 21, "unit": "celsius"}'), m("assistant", "It is 21°C in Paris.")]},
        "tools_no_system": {"tools": json.dumps(TOOLS[:1], ensure_ascii=False), "messages": [
            m("user", "Weather in Rome?"), m("function", json.dumps(call | {"arguments": {"city": "Rome"}})),
            m("observation", '{"temperature": 25}'), m("assistant", "25 degrees.")]},
        "tools_parallel": {"tools": json.dumps(TOOLS, ensure_ascii=False), "messages": [
            m("user", "Weather in Paris and news about 巴黎?"), m("function", json.dumps(calls, ensure_ascii=False)),
            m("observation", '[{"temperature": 21}, {"headlines": ["Sunny week"]}]'),
            m("assistant", "21°C, and a sunny week ahead.")]},
        "reasoning": {"messages": [
            m("user", "What is 2 + 2?"), m("assistant", think + "2 + 2 = 4."),
            m("user", "And 3 + 3?"), m("assistant", "6.")]},
    }


def data_args(name: str, tool_format: str | None, enable_thinking: bool) -> DataArguments:
    return DataArguments(template=name, cutoff_len=1_000_000, tool_format=tool_format,
                         enable_thinking=enable_thinking)


def encode(base: Path, name: str, spec: dict, tool_format: str | None, enable_thinking: bool,
           only: tuple[str, ...] = ()) -> dict:
    """One variant of one template: LF's fixed tokenizer facts and every conversation's ids."""
    TEMPLATES[name] = copy.deepcopy(ORIGINAL[name])  # get_template_and_fix_tokenizer mutates the template
    tokenizer = build_tokenizer(base, spec)
    args = data_args(name, tool_format, enable_thinking)
    template = get_template_and_fix_tokenizer(tokenizer, args)
    added = len(tokenizer) - len(build_tokenizer(base, spec))
    if added:
        raise SystemExit(f"{name}: LF added {added} tokens; add them to the augmentation rule")
    bypassed = None
    if any(t is not None for t in (template.mm_plugin.image_token, template.mm_plugin.video_token,
                                   template.mm_plugin.audio_token)):
        # A multimodal plugin wants the model's processor even for text; without image/video/audio placeholders
        # its process_messages/process_token_ids leave text rows unchanged, so the base plugin stands in.
        bypassed = type(template.mm_plugin).__name__
        template.mm_plugin = get_mm_plugin(name="base")
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)
    rows = {}
    for key, conv in conversations(template.thought_words).items():
        if only and key not in only:
            continue
        messages, system, tools = conv["messages"], conv.get("system"), conv.get("tools")
        try:
            input_ids, labels = processor._encode_data_example(messages[:-1], messages[-1:], system, tools,
                                                               [], [], [])
            prompt_ids, _ = template.encode_oneturn(tokenizer, messages[:-1] + [{"role": "assistant",
                                                                                 "content": ""}], system, tools)
        except (ValueError, RuntimeError) as err:  # e.g. glm4's tool format refuses parallel calls
            rows[key] = dict(conv, lf_error=str(err))
            continue
        rows[key] = dict(conv, input_ids=input_ids, labels=labels, prompt_ids=prompt_ids,
                         text=tokenizer.decode(input_ids))
    return {"tool_format": tool_format, "enable_thinking": enable_thinking, "eos_token": tokenizer.eos_token,
            "mm_plugin_replaced_by_base": bypassed,
            "stop_token_ids": sorted(template.get_stop_token_ids(tokenizer)),
            "efficient_eos": template.efficient_eos, "conversations": rows}


def fixture(base: Path, name: str) -> dict:
    bos, eos, tokens = special_tokens(ORIGINAL[name], name)
    spec = {"base": "SmolLM2-135M-Instruct (tuneforge's embedded model)", "bos_token": bos, "eos_token": eos,
            "added_special_tokens": tokens}
    variants = [encode(base, name, spec, None, True)]
    if isinstance(ORIGINAL[name], ReasoningTemplate):
        variants.append(encode(base, name, spec, None, False))
    if name in TOOL_FORMAT_HOSTS:
        variants += [encode(base, name, spec, fmt, True, TOOL_CONVERSATIONS) for fmt in TOOL_FORMATS]
    return {"template": name, "llamafactory": LF_VERSION, "llama3_tool_date": FIXED_DATE, "tokenizer": spec,
            "variants": variants}


class _FixedDate:
    @staticmethod
    def now():
        from datetime import datetime
        return datetime.strptime(FIXED_DATE, "%d %b %Y")


ORIGINAL = {name: copy.deepcopy(TEMPLATES[name]) for name in NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    tool_utils.datetime = _FixedDate
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        data = fixture(args.tokenizer, name)
        path = args.out / f"{name}.json"
        text = json.dumps(data, ensure_ascii=False, indent=1)
        text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
        path.write_text(text + "\n", encoding="utf-8")
        print(f"{name}: {sum(len(v['conversations']) for v in data['variants'])} conversations -> {path}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
