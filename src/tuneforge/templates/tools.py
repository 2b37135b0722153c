"""Tool formats: how a template lists the tools in its system prompt, writes the model's calls, and reads calls
back out of a generated answer. Names and texts are LLaMA-Factory 0.9.5's `tool_format` values, so a format
renders token-identically; each reader is the inverse of its writer (the API uses it to return OpenAI tool_calls)."""

from __future__ import annotations

import ast
import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any

from tuneforge.errors import TemplateError
from tuneforge.registry import Registry

Call = tuple[str, str]  # (function name, arguments as JSON text)
TOOL_FORMATS: Registry[type[ToolFormat]] = Registry("tool format", TemplateError)


class ToolFormat(ABC):
    """One model family's tool-calling syntax."""

    @abstractmethod
    def describe(self, tools: list[dict[str, Any]]) -> str:
        """The text listing the tools, appended to the system prompt."""

    @abstractmethod
    def write(self, calls: list[Call]) -> str:
        """A trained function-call turn's text."""

    @abstractmethod
    def read(self, text: str) -> list[Call] | None:
        """The calls in a generated answer, or None when it calls no tool."""

    def cache_key(self) -> str:
        """What the rendered tool text depends on besides the tools (the format; Llama 3's also the date)."""
        return type(self).__name__


def schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The bare function schema of an OpenAI-style {"type": "function", "function": {...}} entry."""
    return tool.get("function", {}) if tool.get("type") == "function" else tool


def wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-style entry of a bare function schema (Qwen's, Llama 3's and Mistral's templates list these)."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def text_value(value: Any) -> str:
    """A parameter value inside XML-style calls: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else dumps(value)


def json_value(raw: str) -> Any:
    """The inverse of text_value: JSON when it parses, else the raw string."""
    try:
        return json.loads(raw.strip())
    except json.JSONDecodeError:
        return raw.strip()


def calls_from_json(text: str, args_key: str) -> list[Call] | None:
    """Calls written as one JSON object or a JSON list of {"name", args_key} objects."""
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(i, dict) and "name" in i and args_key in i for i in items):
        return None
    return [(i["name"], dumps(i[args_key])) for i in items]


DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\nAction Input: the input to the tool, in a JSON format representing "
    'the kwargs (e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)


@TOOL_FORMATS.register("default")
class DefaultFormat(ToolFormat):
    """ReAct-style `Action:` / `Action Input:` lines (LLaMA-Factory's generic format)."""

    ACTION = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        blocks, names = [], []
        for tool in map(schema, tools):
            params = tool.get("parameters") or {}  # LLaMA-Factory fails on a tool without parameters; we list none
            lines = ""
            for name, p in params.get("properties", {}).items():
                required = ", required" if name in params.get("required", []) else ""
                enum = ", should be one of [{}]".format(", ".join(p["enum"])) if p.get("enum") else ""
                items = ", where each item should be {}".format(p["items"].get("type", "")) if p.get("items") else ""
                lines += f"  - {name} ({p.get('type', '')}{required}): {p.get('description', '')}{enum}{items}\n"
            blocks.append(f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\n"
                          f"Tool Args:\n{lines}\n")
            names.append(tool["name"])
        return DEFAULT_PROMPT.format(tool_text="".join(blocks), tool_names=", ".join(names))

    def write(self, calls: list[Call]) -> str:
        return "\n".join(f"Action: {name}\nAction Input: {args}" for name, args in calls)

    def read(self, text: str) -> list[Call] | None:
        calls = []
        for name, raw in self.ACTION.findall(text):
            try:
                calls.append((name.strip(), dumps(json.loads(raw.strip().strip('"`')))))
            except json.JSONDecodeError:
                return None
        return calls or None


GLM4_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}")


@TOOL_FORMATS.register("glm4")
class Glm4Format(ToolFormat):
    """ChatGLM3 / GLM-4: the function name on one line, its JSON arguments below; one call per turn."""

    def describe(self, tools: list[dict[str, Any]]) -> str:
        text = "".join(f"\n\n## {t['name']}\n\n{dumps(t, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                       for t in map(schema, tools))
        return GLM4_PROMPT.format(tool_text=text)

    def write(self, calls: list[Call]) -> str:
        if len(calls) > 1:
            raise TemplateError("the glm4 tool format takes one function call per turn, got "
                                f"{len(calls)} parallel calls")
        return f"{calls[0][0]}\n{calls[0][1]}"

    def read(self, text: str) -> list[Call] | None:
        if "\n" not in text:
            return None
        name, raw = text.split("\n", 1)
        try:
            return [(name.strip(), dumps(json.loads(raw.strip())))]
        except json.JSONDecodeError:
            return None


LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\nYou have access to the following functions. "
    "To call a function, please respond with JSON for a function call. Respond in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}. Do not use variables.\n\n'
    "{tool_text}"
)


def today() -> str:
    """The date Llama 3's tool prompt shows (tests pin it)."""
    return datetime.now().strftime("%d %b %Y")


@TOOL_FORMATS.register("llama3")
class Llama3Format(ToolFormat):
    """Llama 3.x JSON tool calls ({"name", "parameters"}), tools listed in the system prompt."""

    def cache_key(self) -> str:
        return f"{type(self).__name__} {today()}"

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return LLAMA3_PROMPT.format(date=today(), tool_text="".join(dumps(wrapped(t), indent=4) + "\n\n"
                                                                      for t in tools))

    def write(self, calls: list[Call]) -> str:
        objects = [{"name": name, "parameters": json.loads(args)} for name, args in calls]
        return dumps(objects[0] if len(objects) == 1 else objects)

    def read(self, text: str) -> list[Call] | None:
        return calls_from_json(text, "parameters")


@TOOL_FORMATS.register("mistral")
class MistralFormat(ToolFormat):
    """Mistral v0.3+: [AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]; calls as a JSON list after [TOOL_CALLS]."""

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return "[AVAILABLE_TOOLS] " + dumps([wrapped(t) for t in tools]) + "[/AVAILABLE_TOOLS]"

    def write(self, calls: list[Call]) -> str:
        return dumps([{"name": name, "arguments": json.loads(args)} for name, args in calls])

    def read(self, text: str) -> list[Call] | None:
        return calls_from_json(text.replace("[TOOL_CALLS]", "", 1), "arguments")


QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>{tool_text}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@TOOL_FORMATS.register("qwen")
class QwenFormat(ToolFormat):
    """Qwen 2.5 / Qwen3 (Hermes style): JSON calls inside <tool_call></tool_call>."""

    prompt = QWEN_PROMPT
    BLOCK = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return self.prompt.format(tool_text="".join("\n" + dumps(wrapped(t)) for t in tools))

    def write(self, calls: list[Call]) -> str:
        return "\n".join(f"<tool_call>\n{dumps({'name': n, 'arguments': json.loads(a)})}\n</tool_call>"
                         for n, a in calls)

    def read(self, text: str) -> list[Call] | None:
        blocks = self.BLOCK.findall(text)
        calls = [c for block in blocks for c in calls_from_json(block, "arguments") or []]
        return calls if blocks and len(calls) == len(blocks) else None


@TOOL_FORMATS.register("ling")
class LingFormat(QwenFormat):
    """Ling v2: Qwen's syntax, a prompt without the leading blank lines, thinking switched off."""

    prompt = QWEN_PROMPT[2:]

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return super().describe(tools) + "\ndetailed thinking off"


QWEN35_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}\n</tools>\n\nIf you choose to "
    "call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function="
    "example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>"
    "\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n"
    "</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters "
    "MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the "
    "function call, but NOT after\n- If there is no function call available, answer the question like normal with "
    "your current knowledge and do not tell the user about function calls\n</IMPORTANT>"
)
PARAMETER = re.compile(r"<parameter=(.*?)>(.*?)</parameter>", re.DOTALL)


@TOOL_FORMATS.register("qwen3_5")
class Qwen35Format(ToolFormat):
    """Qwen 3.5 (Qwen3-Coder style): <function=name> with one <parameter=key> block per argument."""

    CALL = re.compile(r"<tool_call>\s*<function=\s*([^\s<>]+)\s*(.*?)\s*</function>\s*</tool_call>", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return QWEN35_PROMPT.format(tool_text="".join("\n" + dumps(schema(t)) for t in tools))

    def write(self, calls: list[Call]) -> str:
        out = []
        for name, args in calls:
            params = "".join(f"\n<parameter={k}>\n{text_value(v)}\n</parameter>" for k, v in json.loads(args).items())
            out.append(f"<tool_call>\n<function={name}>{params}\n</function>\n</tool_call>")
        return "\n".join(out)

    def read(self, text: str) -> list[Call] | None:
        return [(name.strip(), dumps({k: json_value(v) for k, v in PARAMETER.findall(block.strip())}))
                for name, block in self.CALL.findall(text)] or None


GLM4_MOE_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>{tool_text}\n</tools>\n\nFor each function call, "
    "output the function name and arguments within the following XML format:\n<tool_call>{{function-name}}\n"
    "<arg_key>{{arg-key-1}}</arg_key>\n<arg_value>{{arg-value-1}}</arg_value>\n<arg_key>{{arg-key-2}}</arg_key>\n"
    "<arg_value>{{arg-value-2}}</arg_value>\n...\n</tool_call>\n"
)


@TOOL_FORMATS.register("glm4_moe")
class Glm4MoeFormat(ToolFormat):
    """GLM-4.5 / 4.7: <tool_call>name then <arg_key>/<arg_value> pairs. LLaMA-Factory 0.9.5 writes no closing
    </tool_call> (GLM's own template does); kept for token parity, and the reader accepts either."""

    CALL = re.compile(r"<tool_call>\s*([^\s<]+)(.*?)(?=</tool_call>|<tool_call>|$)", re.DOTALL)
    PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return GLM4_MOE_PROMPT.format(tool_text="".join("\n" + dumps(wrapped(t)) for t in tools))

    def write(self, calls: list[Call]) -> str:
        return "\n".join(f"\n<tool_call>{name}" + "".join(f"\n<arg_key>{k}</arg_key>\n<arg_value>{text_value(v)}"
                                                          "</arg_value>" for k, v in json.loads(args).items())
                         for name, args in calls)

    def read(self, text: str) -> list[Call] | None:
        return [(name, dumps({k: json_value(v) for k, v in self.PAIR.findall(body)}))
                for name, body in self.CALL.findall(text)] or None


SEED_PROMPT = (
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user "
    "query.Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before "
    "performing any task, you must decide how to call them based on the descriptions and parameters of these tools."
    "{tool_text}\n工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n"
    "<parameter=example_parameter_1>value_1</parameter>\n<parameter=example_parameter_2>This is the value for the "
    "second parameter\nthat can span\nmultiple lines</parameter>\n</function>\n</seed:tool_call>\n"
)


@TOOL_FORMATS.register("seed_oss")
class SeedFormat(ToolFormat):
    """Seed-OSS: <seed:tool_call><function=name><parameter=key>value</parameter>. LLaMA-Factory 0.9.5 writes
    `<function=name` without its `>` (Seed's own template has it); the reader takes both."""

    CALL = re.compile(r"<seed:tool_call>\s*<function=\s*([^\s<>]+)>?\s*(.*?)\s*</function>\s*</seed:tool_call>",
                      re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return SEED_PROMPT.format(tool_text="\n" + dumps(tools))

    def write(self, calls: list[Call]) -> str:
        return "\n".join(f"\n<seed:tool_call>\n<function={name}" + "".join(
            f"\n<parameter={k}>{text_value(v)}</parameter>" for k, v in json.loads(args).items())
            + "\n</function>\n</seed:tool_call>" for name, args in calls)

    def read(self, text: str) -> list[Call] | None:
        return [(name.strip(), dumps({k: json_value(v) for k, v in PARAMETER.findall(block.strip())}))
                for name, block in self.CALL.findall(text)] or None


MINIMAX1_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\nIf you need to call tools, please respond "
    "with <tool_calls></tool_calls> XML tags, and provide tool-name and json-object of arguments, following the "
    'format below:\n<tool_calls>\n{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n...\n</tool_calls>'
)


@TOOL_FORMATS.register("minimax1")
class MiniMax1Format(ToolFormat):
    """MiniMax-M1: one JSON call per line inside <tool_calls></tool_calls>."""

    BLOCK = re.compile(r"<tool_calls>\s*(.+?)\s*</tool_calls>", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return MINIMAX1_PROMPT.format(tool_text="".join(dumps(schema(t)) + "\n" for t in tools))

    def write(self, calls: list[Call]) -> str:
        return "<tool_calls>\n" + "\n".join(dumps({"name": n, "arguments": json.loads(a)}) for n, a in calls) + \
            "\n</tool_calls>"

    def read(self, text: str) -> list[Call] | None:
        block = self.BLOCK.search(text)
        if not block:
            return None
        return [c for line in block.group(1).split("\n") if line.strip()
                for c in calls_from_json(line, "arguments") or []] or None


MINIMAX2_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\nHere are the tools available in "
    "JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\nWhen making tool calls, use XML format to invoke tools "
    'and pass parameters:\n\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">'
    'param-value-1</parameter>\n<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n'
    "</minimax:tool_call>"
)


@TOOL_FORMATS.register("minimax2")
class MiniMax2Format(ToolFormat):
    """MiniMax-M2: <invoke name=...> blocks with <parameter name=...> values. LLaMA-Factory 0.9.5 writes the
    invokes without the <minimax:tool_call> wrapper; the reader takes them with or without it."""

    INVOKE = re.compile(r"<invoke name=\"(.*?)\">(.*?)</invoke>", re.DOTALL)
    PARAM = re.compile(r"<parameter name=\"(.*?)\">(.*?)</parameter>", re.DOTALL)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return MINIMAX2_PROMPT.format(tool_text="".join(f"<tool>{dumps(schema(t))}</tool>\n" for t in tools))

    def write(self, calls: list[Call]) -> str:
        return "\n".join(f'<invoke name="{name}">' + "".join(
            f'\n<parameter name="{k}">{text_value(v)}</parameter>' for k, v in json.loads(args).items())
            + "\n</invoke>" for name, args in calls)

    def read(self, text: str) -> list[Call] | None:
        return [(name.strip(), dumps({k: json_value(v) for k, v in self.PARAM.findall(body)}))
                for name, body in self.INVOKE.findall(text)] or None


@TOOL_FORMATS.register("lfm2")
class Lfm2Format(ToolFormat):
    """LFM2: Python-style calls, <|tool_call_start|>[name(key="value", ...)]<|tool_call_end|>."""

    def describe(self, tools: list[dict[str, Any]]) -> str:
        return f"List of tools: <|tool_list_start|>{dumps([schema(t) for t in tools])}<|tool_list_end|>"

    def write(self, calls: list[Call]) -> str:
        def arg(key: str, value: Any) -> str:
            return f'{key}="{value}"' if isinstance(value, str) else f"{key}={dumps(value)}"

        body = ", ".join(f"{name}({', '.join(arg(k, v) for k, v in json.loads(args).items())})" for name, args in calls)
        return f"<|tool_call_start|>[{body}]<|tool_call_end|>"

    def read(self, text: str) -> list[Call] | None:
        match = re.search(r"<\|tool_call_start\|>(.*?)<\|tool_call_end\|>", text, re.DOTALL)
        if not match:
            return None
        try:
            tree = ast.parse(match.group(1).strip(), mode="eval").body
            nodes = tree.elts if isinstance(tree, ast.List) else [tree]
            return [(node.func.id, dumps({k.arg: python_value(k.value) for k in node.keywords}))
                    for node in nodes] or None
        except (SyntaxError, ValueError, AttributeError):
            return None


def python_value(node: ast.AST) -> Any:
    """A literal argument of a Python-style call; JSON's true/false/null are accepted too."""
    if isinstance(node, ast.Name):
        constants = {"true": True, "false": False, "null": None}
        if node.id not in constants:
            raise ValueError(node.id)
        return constants[node.id]
    return ast.literal_eval(node)


def read_hermes_or_json(text: str) -> list[Call] | None:
    """Calls of a model whose own template decides the syntax: <tool_call> blocks, or one bare JSON call."""
    return QwenFormat().read(text) or (calls_from_json(text, "arguments") if text.strip().startswith("{") else None)


def get_tool_format(name: str) -> ToolFormat:
    """A tool format by name (an instance of its registered class)."""
    return TOOL_FORMATS.get(name)()  # type: ignore[operator]


def tool_format_names() -> list[str]:
    return TOOL_FORMATS.names()
