"""The dataset catalog: built-in dataset_info.json, the user's dataset_dir/dataset_info.json, inline entries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tuneforge.errors import DataError, did_you_mean

BUILTIN_DIR = Path(__file__).parent / "builtin"
INFO_FILE = "dataset_info.json"
UNSUPPORTED_COLUMNS = ("images", "videos", "audios")


@dataclass
class Columns:
    """Column names in the data file (LLaMA-Factory's `columns`)."""

    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = None
    messages: str = "conversations"
    system: str | None = None
    tools: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None


@dataclass
class Tags:
    """Role and content keys inside sharegpt/openai messages (LLaMA-Factory's `tags`)."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"


OPENAI_TAGS = Tags("role", "content", "user", "assistant", "tool", "function_call", "system")


@dataclass
class DatasetSpec:
    """One registered dataset: where its rows live and how they map onto canonical types."""

    name: str
    source: Literal["file", "hf_hub", "ms_hub"]
    location: str
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: Columns = field(default_factory=Columns)
    tags: Tags = field(default_factory=Tags)
    defined_in: str = ""


@dataclass(frozen=True)
class RefusedEntry:
    """A dataset_info.json entry tuneforge cannot use (multimodal columns, a script, a typo): refused with its
    message only when a run asks for it, so LLaMA-Factory's own data/ folder works for the text sets it holds."""

    name: str
    message: str


Catalog = dict[str, "DatasetSpec | RefusedEntry"]

ENTRY_KEYS = ("file_name", "path", "hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name", "subset", "split",
              "folder", "formatting", "ranking", "num_samples", "columns", "tags", "load_from")


def load_catalog(dataset_dir: str | Path, inline: dict[str, dict[str, Any]] | None = None) -> Catalog:
    """All known datasets: built-ins, overridden and extended by the user's file, then by inline entries."""
    catalog = _read_info(BUILTIN_DIR / INFO_FILE, BUILTIN_DIR)
    user_file = Path(dataset_dir) / INFO_FILE
    if user_file.is_file():
        catalog.update(_read_info(user_file, Path(dataset_dir)))
    for name, entry in (inline or {}).items():
        catalog[name] = parse_entry(name, entry, Path(dataset_dir), "config data.inline")
    return catalog


def get_spec(catalog: Catalog, name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Look a dataset up by name with a did-you-mean and the places searched; a refused entry gives its reason."""
    if name not in catalog:
        user_file = Path(dataset_dir) / INFO_FILE
        looked = f"{user_file}" + ("" if user_file.is_file() else " (not found)")
        raise DataError(
            f"dataset '{name}' is not registered.{did_you_mean(name, catalog)} Looked in the built-in datasets, "
            f"{looked} and data.inline. Register it in dataset_info.json or set data.dataset_dir."
        )
    found = catalog[name]
    if isinstance(found, RefusedEntry):
        raise DataError(found.message)
    return found


def _read_info(path: Path, base: Path) -> Catalog:
    try:
        text = path.read_text(encoding="utf-8-sig")  # skips a BOM (Windows editors add one), as data files do
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: the top level must be an object mapping dataset names to entries")
    catalog: Catalog = {}
    for name, entry in raw.items():
        try:
            catalog[name] = parse_entry(name, entry, base, str(path))
        except DataError as err:
            catalog[name] = RefusedEntry(name, str(err))
    return catalog


def parse_entry(name: str, entry: Any, base: Path, where: str) -> DatasetSpec:
    """Validate one dataset_info entry strictly and resolve its file path against `base`."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: dataset '{name}': the entry must be an object, got {type(entry).__name__}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise DataError(f"{where}: dataset '{name}': unknown key '{key}'.{did_you_mean(key, ENTRY_KEYS)}")
    source, location = _source(name, entry, base, where)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{where}: dataset '{name}': formatting '{formatting}' is not one of alpaca, sharegpt, openai")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: dataset '{name}': ranking must be true or false (JSON booleans), got {ranking!r}")
    defaults = _default_columns(formatting, ranking)
    spec = DatasetSpec(
        name=name, source=source, location=location, formatting=formatting, ranking=ranking,
        subset=entry.get("subset"), split=entry.get("split", "train"), folder=entry.get("folder"),
        num_samples=entry.get("num_samples"),
        columns=_fill(Columns, defaults, entry.get("columns", {}), f"{where}: dataset '{name}': columns"),
        tags=_fill(Tags, OPENAI_TAGS if formatting == "openai" else Tags(), entry.get("tags", {}),
                   f"{where}: dataset '{name}': tags"),
        defined_in=where,
    )
    if spec.num_samples is not None and (not isinstance(spec.num_samples, int) or spec.num_samples < 1):
        raise DataError(f"{where}: dataset '{name}': num_samples must be a positive whole number")
    return spec


def _source(name: str, entry: dict[str, Any], base: Path, where: str) -> tuple[str, str]:
    if "script_url" in entry or "cloud_file_name" in entry:
        raise DataError(f"{where}: dataset '{name}': script_url and cloud_file_name are not supported; "
                        "download the data and register it with file_name")
    if "hf_hub_url" in entry or "ms_hub_url" in entry:
        import os

        use_ms = "ms_hub_url" in entry and (os.environ.get("USE_MODELSCOPE_HUB") == "1" or "hf_hub_url" not in entry)
        return ("ms_hub", entry["ms_hub_url"]) if use_ms else ("hf_hub", entry["hf_hub_url"])
    file_name = entry.get("file_name", entry.get("path"))
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: dataset '{name}': needs file_name (a file or folder), hf_hub_url or ms_hub_url")
    path = Path(file_name).expanduser()
    return "file", str(path if path.is_absolute() else base / path)


def _default_columns(formatting: str, ranking: bool) -> Columns:
    columns = Columns(messages="messages") if formatting == "openai" else Columns()
    if ranking:  # preference data names its answers chosen/rejected unless columns say otherwise
        columns.chosen, columns.rejected = "chosen", "rejected"
    return columns


def _fill(cls: type, defaults: Any, given: Any, where: str) -> Any:
    if not isinstance(given, dict):
        raise DataError(f"{where}: must be an object")
    names = [f.name for f in fields(cls)]
    for key, value in given.items():
        if key in UNSUPPORTED_COLUMNS:
            raise DataError(f"{where}: '{key}' columns (multimodal data) are not supported; tuneforge trains text LLMs")
        if key not in names:
            raise DataError(f"{where}: unknown key '{key}'.{did_you_mean(key, names)} Allowed: {', '.join(names)}")
        if not isinstance(value, str):
            raise DataError(f"{where}.{key}: must be a column name (text), got {value!r}")
    values = {f.name: getattr(defaults, f.name) for f in fields(cls)}
    values.update(given)
    return cls(**values)
