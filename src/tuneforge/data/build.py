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
from tuneforge.data.pipeline import Sources, encode_to_arrow, mix, split_validation
from tuneforge.data.tokenized import has_tokenized, load_tokenized, report_dict, save_tokenized
from tuneforge.data.types import EncodeReport
from tuneforge.errors import DataError
from tuneforge.paths import tuneforge_home
from tuneforge.templates.base import Template

log = logging.getLogger(__name__)
TRAIN, VAL = "train.arrow", "val.arrow"  # a cache folder's encoded rows (Arrow streams), beside report.json


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
    """Packing defaults to on for pre-training (text) and off otherwise; neat_packing turns it on."""
    return data.neat_packing or (data.packing if data.packing is not None else kind == "text")


def build_datasets(data: DataConfig, kind: str, template: Template, seed: int) -> EncodedData:
    """Load, mix, split and encode the configured datasets for a data kind (see tuneforge.data.pipeline.KINDS),
    reusing a cached copy when nothing changed. With data.tokenized_path: load the rows saved there, or save
    them there when the folder is missing or empty (as LLaMA-Factory does)."""
    if data.tokenized_path and has_tokenized(data.tokenized_path):
        train, val, report, key = load_tokenized(data.tokenized_path, kind, tokenized_record(data, kind, template))
        return EncodedData(train, val, report, key, from_cache=True)
    if not data.dataset:
        raise DataError("no training data: set data.dataset (LLaMA-Factory: dataset) to one or more dataset names")
    key = cache_key(data, kind, template, seed)
    folder = cache_folder(data) / key
    if (folder / "report.json").is_file() and (folder / TRAIN).is_file() and not data.overwrite_cache:
        encoded = _load_cached(folder, key)
    else:
        encoded = _encode(data, kind, template, seed, folder, key)
    if data.tokenized_path:
        record = dict(tokenized_record(data, kind, template), key=key, report=report_dict(encoded.report))
        save_tokenized(data.tokenized_path, encoded.train, encoded.val, record)
    return encoded


def _encode(data: DataConfig, kind: str, template: Template, seed: int, folder: Path, key: str) -> EncodedData:
    """Rows are kept on disk (tuneforge.data.store) in the build folder while references to them are mixed, split
    and encoded; only the encoded rows and the report stay."""
    opts = encode_options(data)
    packing = packing_enabled(data, kind)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "sources").mkdir(parents=True)
    try:
        sources = Sources(data, kind)
        groups = [sources.add(name, tmp / "sources", seed) for name in data.dataset]
        train, val = split_validation(mix(groups, data.mix_strategy, data.interleave_probs, seed), data.val_size, seed)
        if data.eval_dataset:
            val = [ref for name in data.eval_dataset for ref in sources.add(name, tmp / "sources", seed)]
        report = encode_to_arrow(train, template, opts, kind, tmp / TRAIN, data.num_proc, packing, sources)
        if not (tmp / TRAIN).is_file():
            raise DataError("every training row was dropped or has no trained tokens; "
                            "run `tuneforge data check` to see why")
        if val:
            encode_to_arrow(val, template, opts, kind, tmp / VAL, data.num_proc, packing, sources)
        (tmp / "report.json").write_text(json.dumps(dataclasses.asdict(report)), encoding="utf-8")
        shutil.rmtree(tmp / "sources")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a half-written cache is never found under the real key
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
        "data": dataclasses.asdict(dataclasses.replace(data, overwrite_cache=False, num_proc=None, cache_dir=None,
                                                        tokenized_path=None)),
        "specs": [dataclasses.asdict(s) for s in specs],
        "files": [file_digest(Path(s.location)) for s in specs if s.source == "file"],
        "template": template_digest(template),
        "tokenizer": tokenizer_digest(tokenizer),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """Hash of the vocabulary (added tokens included) and of whether special-token text is split."""
    body = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) \
        else str(tokenizer.name_or_path) + str(len(tokenizer))
    return hashlib.sha256((body + str(getattr(tokenizer, "split_special_tokens", False))).encode()).hexdigest()[:16]


def tokenized_record(data: DataConfig, kind: str, template: Template) -> dict[str, Any]:
    """What a data.tokenized_path folder records about how its rows were made (checked when it is loaded)."""
    return {"version": __version__, "kind": kind, "tokenizer": tokenizer_digest(template.tokenizer),
            "model": str(template.tokenizer.name_or_path), "template": template_digest(template),
            "template_name": template.name, "cutoff_len": data.cutoff_len, "packing": packing_enabled(data, kind)}


def template_digest(template: Template) -> str:
    """Hash of everything a template's rendering depends on (Template.cache_key)."""
    return hashlib.sha256(template.cache_key().encode()).hexdigest()[:16]


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


def _load_cached(folder: Path, key: str, from_cache: bool = True) -> EncodedData:
    from datasets import Dataset

    report = EncodeReport(**json.loads((folder / "report.json").read_text(encoding="utf-8")))
    val = Dataset.from_file(str(folder / VAL)) if (folder / VAL).is_file() else None
    if from_cache:
        log.info("using tokenized data cached in %s", folder)
    return EncodedData(Dataset.from_file(str(folder / TRAIN)), val, report, key, from_cache)
