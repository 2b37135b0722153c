"""data.tokenized_path (LLaMA-Factory's tokenized_path): a tokenized dataset saved once and reused without the raw data.

The folder is what `datasets.DatasetDict.save_to_disk` writes (splits `train` and `validation`, as LLaMA-Factory
saves them) plus tuneforge's record of what made the rows: data kind, template, tokenizer and cutoff. A later run
checks that record against its own settings, so rows made for another stage, template or model are refused
instead of trained on. A folder saved by LLaMA-Factory (no record) is accepted when it has the stage's columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tuneforge.data.types import EncodeReport
from tuneforge.errors import DataError

log = logging.getLogger(__name__)
RECORD = "tuneforge_tokenized.json"
KIND_USERS = {"text": "pre-training (stage pt)", "sft": "stage sft", "pairwise": "stages rm and dpo",
              "kto": "stage kto", "prompt": "stage grpo"}
# Columns each data kind needs; LLaMA-Factory names the kto label kto_tags.
KIND_COLUMNS = {"text": ("input_ids", "labels"), "sft": ("input_ids", "labels"),
                "pairwise": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
                "kto": ("input_ids", "labels", "kto_label"), "prompt": ("input_ids", "prompt", "columns")}


def has_tokenized(path: str | Path) -> bool:
    """LLaMA-Factory's test: the folder exists and is not empty."""
    folder = Path(path)
    return folder.is_dir() and any(folder.iterdir())


def save_tokenized(path: str | Path, train: Any, val: Any | None, record: dict[str, Any]) -> None:
    """Write the splits and the record; atomic, so a killed run never leaves a folder a later run would trust."""
    from datasets import DatasetDict

    folder = Path(path)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits = {"train": train, **({"validation": val} if val is not None else {})}
    DatasetDict(splits).save_to_disk(str(tmp))
    (tmp / RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    if folder.is_dir():
        folder.rmdir()  # empty (has_tokenized was false), as LLaMA-Factory allows
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    log.info("tokenized dataset saved in %s; later runs with data.tokenized_path=%s load it", folder, folder)


def load_tokenized(path: str | Path, kind: str, expected: dict[str, Any]) -> tuple[Any, Any | None, EncodeReport, str]:
    """(train, validation or None, report, key) from a saved folder, after checking it suits this run."""
    from datasets import Dataset, load_from_disk

    folder = Path(path)
    try:
        saved = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"data.tokenized_path {folder} is not a saved tokenized dataset ({err}); point it at an "
                        "empty or new folder to tokenize there") from None
    train, val = (saved, None) if isinstance(saved, Dataset) else (saved["train"], _validation(saved))
    log.warning("data.tokenized_path: loading the tokenized rows in %s; data.dataset and the other dataset "
                "settings are ignored", folder)
    record_file = folder / RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        check_record(folder, record, kind, expected)
        return train, val, EncodeReport(**record["report"]), record["key"]
    log.warning("%s has no tuneforge record (made by LLaMA-Factory?): its template, tokenizer and cutoff cannot "
                "be checked against this run", folder)
    train, val = (_lf_columns(d, kind, folder) if d is not None else None for d in (train, val))
    return train, val, _count(train, kind), f"lf-{train._fingerprint}"


def check_record(folder: Path, record: dict[str, Any], kind: str, expected: dict[str, Any]) -> None:
    """Refuse rows of another data kind, tokenizer or template; warn when only the cutoff differs."""
    if record["kind"] != kind:
        raise DataError(f"data.tokenized_path {folder} holds rows tokenized for {KIND_USERS[record['kind']]}, but "
                        f"this run is {KIND_USERS[kind]}; point tokenized_path at a new folder to tokenize for it")
    if record["tokenizer"] != expected["tokenizer"]:
        raise DataError(f"data.tokenized_path {folder} was tokenized with another tokenizer (model "
                        f"{record.get('model')}); its token ids would be wrong for this model. Point tokenized_path "
                        "at a new folder to tokenize again")
    if record["template"] != expected["template"] and record["template_name"] == expected["template_name"]:
        raise DataError(f"data.tokenized_path {folder} was rendered by template '{record['template_name']}' with "
                        "other settings (default system, thinking, tool format; Llama 3's tool prompt also holds "
                        "the date); point tokenized_path at a new folder to tokenize again")
    if record["template"] != expected["template"]:
        raise DataError(f"data.tokenized_path {folder} was rendered with template '{record['template_name']}', "
                        f"this run uses '{expected['template_name']}'; set data.template={record['template_name']} "
                        "or point tokenized_path at a new folder")
    # pre-training text is packed before saving; sft rows are packed after loading, so only the cutoff matters
    for key in ("cutoff_len", "packing") if kind == "text" else ("cutoff_len",):
        if record[key] != expected[key]:
            log.warning("data.tokenized_path %s was made with %s=%s (this config: %s); the saved rows are used "
                        "as they are", folder, key, record[key], expected[key])


def _validation(saved: Any) -> Any | None:
    names = sorted(k for k in saved if k.startswith("validation"))
    if not names:
        return None
    if len(names) == 1:
        return saved[names[0]]
    from datasets import concatenate_datasets

    return concatenate_datasets([saved[n] for n in names])  # LLaMA-Factory's eval_on_each_dataset splits


def _lf_columns(dataset: Any, kind: str, folder: Path) -> Any:
    if kind == "kto" and "kto_tags" in dataset.column_names and "kto_label" not in dataset.column_names:
        dataset = dataset.rename_column("kto_tags", "kto_label")
    missing = [c for c in KIND_COLUMNS[kind] if c not in dataset.column_names]
    if missing:
        raise DataError(f"data.tokenized_path {folder} lacks the columns {', '.join(missing)} that "
                        f"{KIND_USERS[kind]} trains on; it was tokenized for another stage")
    return dataset


def _count(train: Any, kind: str) -> EncodeReport:
    ids, labels = ("chosen_input_ids", "chosen_labels") if kind == "pairwise" else \
        ("input_ids", "input_ids") if kind == "prompt" else ("input_ids", "labels")
    return EncodeReport(rows=len(train), total_tokens=sum(len(r) for r in train[ids]),
                        trained_tokens=sum(sum(t != -100 for t in r) for r in train[labels]))


def report_dict(report: EncodeReport) -> dict[str, Any]:
    """The encode report as the record stores it."""
    return dataclasses.asdict(report)
