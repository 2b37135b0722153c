"""Build the encoded train/validation sets of a run, cached on disk by a hash of everything they depend on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge import __version__
from tuneforge.config.schema import DataConfig
from tuneforge.data.catalog import get_spec, load_catalog
from tuneforge.data.encode import EncodeOptions
from tuneforge.data.pipeline import encode_examples, load_examples, mix, split_validation
from tuneforge.data.types import EncodeReport
from tuneforge.errors import DataError
from tuneforge.paths import tuneforge_home
from tuneforge.templates.base import Template

log = logging.getLogger(__name__)


@dataclass
class EncodedData:
    """Encoded training and validation rows, with what encoding reported and the cache key."""

    train: Any  # datasets.Dataset
    val: Any | None
    report: EncodeReport
    key: str
    from_cache: bool


def encode_options(data: DataConfig) -> EncodeOptions:
    """The encoding options of a data section."""
    return EncodeOptions(data.cutoff_len, data.train_on_prompt, data.mask_history, data.overlong)


def packing_enabled(data: DataConfig, kind: str) -> bool:
    """Packing defaults to on for pre-training (text) and off otherwise."""
    return data.packing if data.packing is not None else kind == "text"


def build_datasets(data: DataConfig, kind: str, template: Template, seed: int) -> EncodedData:
    """Load, mix, split and encode the configured datasets for a data kind (see tuneforge.data.pipeline.KINDS),
    reusing a cached copy when nothing changed."""
    if not data.dataset:
        raise DataError("no training data: set data.dataset (LLaMA-Factory: dataset) to one or more dataset names")
    key = cache_key(data, kind, template, seed)
    folder = cache_folder(data) / key
    if (folder / "report.json").is_file() and not data.overwrite_cache:
        return _load_cached(folder, key)
    groups = [load_examples(data, name, kind, seed).examples for name in data.dataset]
    examples = mix(groups, data.mix_strategy, data.interleave_probs, seed)
    train, val = split_validation(examples, data.val_size, seed)
    if data.eval_dataset:
        val = [e for name in data.eval_dataset for e in load_examples(data, name, kind, seed).examples]
    opts = encode_options(data)
    packing = packing_enabled(data, kind)
    train_rows, report = encode_examples(train, template, opts, kind, data.num_proc, packing)
    val_rows, _ = encode_examples(val, template, opts, kind, data.num_proc, packing) if val else ([], None)
    if not train_rows:
        raise DataError("every training row was dropped or has no trained tokens; "
                        "run `tuneforge data check` to see why")
    _save_cache(folder, train_rows, val_rows, report)
    return _load_cached(folder, key, from_cache=False)


def cache_folder(data: DataConfig) -> Path:
    """Where tokenized datasets are cached: data.cache_dir, TUNEFORGE_DATA_CACHE, or TUNEFORGE_HOME/cache/datasets."""
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("TUNEFORGE_DATA_CACHE") or tuneforge_home() / "cache" / "datasets")


def cache_key(data: DataConfig, kind: str, template: Template, seed: int) -> str:
    """Hash of data files, dataset definitions, tokenizer, template, options and seed."""
    catalog = load_catalog(data.dataset_dir, data.inline)
    specs = [get_spec(catalog, n, data.dataset_dir) for n in [*data.dataset, *data.eval_dataset]]
    tokenizer = template.tokenizer
    parts = {
        "version": __version__,
        "stage": kind,
        "seed": seed,
        "data": dataclasses.asdict(dataclasses.replace(data, overwrite_cache=False, num_proc=None, cache_dir=None)),
        "specs": [dataclasses.asdict(s) for s in specs],
        "files": [file_digest(Path(s.location)) for s in specs if s.source == "file"],
        "template": template_digest(template),
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if getattr(tokenizer, "is_fast", False) else str(tokenizer.name_or_path) + str(len(tokenizer)),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def template_digest(template: Template) -> str:
    """Hash of what a template renders with (formats or the Jinja source)."""
    body = getattr(template, "formats", None)
    text = repr(body) if body is not None else str(template.tokenizer.chat_template)
    extra = [template.name, getattr(template, "default_system", None), getattr(template, "enable_thinking", None)]
    return hashlib.sha256((text + repr(extra)).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content hash of a data file, or of every file in a data folder."""
    if not path.exists():
        return "missing"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _save_cache(folder: Path, train: list[dict], val: list[dict], report: EncodeReport) -> None:
    from datasets import Dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(train).save_to_disk(str(tmp / "train"))
    if val:
        Dataset.from_list(val).save_to_disk(str(tmp / "val"))
    (tmp / "report.json").write_text(json.dumps(dataclasses.asdict(report)), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-written cache is never found under the real key


def _load_cached(folder: Path, key: str, from_cache: bool = True) -> EncodedData:
    from datasets import load_from_disk

    report = EncodeReport(**json.loads((folder / "report.json").read_text(encoding="utf-8")))
    val = load_from_disk(str(folder / "val")) if (folder / "val").is_dir() else None
    if from_cache:
        log.info("using tokenized data cached in %s", folder)
    return EncodedData(load_from_disk(str(folder / "train")), val, report, key, from_cache)
