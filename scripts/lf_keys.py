"""List every key LLaMA-Factory 0.9.5 accepts in a training/inference YAML, with the dataclass that defines it.

Run with the Python of a venv that has `llamafactory==0.9.5` installed (see ../shared/LLAMAFACTORY.md or
benchmarks/dpo_throughput.py, which creates ~/.cache/tuneforge-bench/lf-0.9.5):

    DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 ~/.cache/tuneforge-bench/lf-0.9.5/bin/python scripts/lf_keys.py \
        tests/fixtures/llamafactory/lf_0.9.5_keys.json

tests/config/test_lf_key_table.py checks that tuneforge's LLaMA-Factory table has an entry for every key listed.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import transformers

import llamafactory
from llamafactory import hparams


def main() -> None:
    hf_fields = {f.name for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}
    groups = {
        "model": hparams.ModelArguments,
        "data": hparams.DataArguments,
        "finetuning": hparams.FinetuningArguments,
        "generating": hparams.GeneratingArguments,
        "evaluation": hparams.EvaluationArguments,
        "training": hparams.TrainingArguments,
    }
    keys: dict[str, dict[str, str]] = {}
    for group, cls in groups.items():
        for f in dataclasses.fields(cls):
            if not f.init or f.name in keys:
                continue
            origin = "transformers" if group == "training" and f.name in hf_fields else "llamafactory"
            default = f.default if f.default is not dataclasses.MISSING else None
            keys[f.name] = {"group": group, "defined_by": origin, "default": repr(default)}
    out = {"llamafactory": llamafactory.__version__, "transformers": transformers.__version__,
           "keys": dict(sorted(keys.items()))}
    with open(sys.argv[1], "w", encoding="utf-8") as fh:  # not stdout: LF logs there
        json.dump(out, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main()
