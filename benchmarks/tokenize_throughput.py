"""Tokenizing a large alpaca set: tuneforge vs LLaMA-Factory 0.9.5, side by side in one run, same worker count.

Usage: python benchmarks/tokenize_throughput.py [--rows 100000] [--workers 2] [--repeats 1] [--lf-venv PATH] [--no-lf]

Writes one alpaca JSON file of synthetic rows (instructions ~8-40 tokens, outputs ~20-300 tokens, log-uniform; a
third of the rows with an input) and one LLaMA-Factory-style YAML (sft, chatml, cutoff 1024), then, alternating,
each tool tokenizes it cold (an emptied cache) in a process of its own:

- LF:        LLaMA-Factory's own data pipeline (`llamafactory.data.get_dataset`, the function its trainer calls)
             in its venv, with `preprocessing_num_workers: N` and `overwrite_cache: true`; the process loads the
             tokenizer and builds the training set, then exits (no model is loaded);
- tuneforge: `tuneforge data preview CONFIG --num 0` with `data.num_proc=N`: loads, checks, tokenizes and caches
             the rows, then exits (no model is loaded).

Printed per run: wall time of the whole process, rows/s, peak RSS (ru_maxrss from os.wait4: the largest resident
set of the process or of any worker it waited for, not their sum) and the CPU time other processes took meanwhile.
A comparison is only valid side by side, in one run, on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

from lfbench import (
    LF_ENV,
    Run,
    add_lf_arguments,
    launch,
    lf_and_header,
    sample_text,
    tuneforge_keys,
    write_config,
)

LF_TOKENIZE = """
import json, sys, time
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model_args, data_args, training_args, _, _ = get_train_args(json.loads(sys.argv[1]))
modules = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **modules)
print("ROWS", len(dataset["train_dataset"]))
"""


def make_rows(path: Path, rows: int, tokenizer, seed: int = 0) -> None:
    """Alpaca rows of varied length; words drawn from a pool of pre-made snippets so writing 100k rows is quick."""
    rng = random.Random(seed)
    pool = [sample_text(rng, tokenizer, n) for n in (8, 12, 20, 30, 40, 60, 90, 130, 200, 300)]
    data = []
    for i in range(rows):
        out_len = math.exp(rng.uniform(math.log(20), math.log(300)))
        output = " ".join(rng.choice(pool) for _ in range(max(1, round(out_len / 60))))
        data.append({"instruction": f"Row {i}: " + rng.choice(pool[:5]),
                     "input": rng.choice(pool[:4]) if i % 3 == 0 else "", "output": output})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (path.parent / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": path.name}}), encoding="utf-8")



def rows_line(log: Path) -> str:
    """What the run reported about the rows it built (LF: ROWS n; tuneforge: its preview summary line)."""
    lines = log.read_text(errors="replace").splitlines()
    return next((x.strip() for x in reversed(lines) if x.startswith("ROWS") or " train rows " in x), "(no count)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    add_lf_arguments(parser)
    args = parser.parse_args()
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.embedded import embedded_model_dir
    from tuneforge.models.load import load_tokenizer

    lf_cli = lf_and_header(args)
    with tempfile.TemporaryDirectory(prefix="tuneforge-tokenize-bench-") as tmp:
        work = Path(tmp)
        make_rows(work / "data" / "bench.json", args.rows, load_tokenizer(ModelConfig()))
        size = (work / "data" / "bench.json").stat().st_size / 2**20
        print(f"data: {args.rows} alpaca rows, {size:.0f} MiB of JSON; {args.workers} worker(s) each")
        shared = {"stage": "sft", "do_train": True, "model_name_or_path": str(embedded_model_dir()),
                  "finetuning_type": "lora", "dataset_dir": str(work / "data"), "dataset": "bench",
                  "template": "chatml", "cutoff_len": 1024, "preprocessing_num_workers": args.workers,
                  "overwrite_cache": True, "report_to": "none", "output_dir": str(work / "out")}
        runs = []
        if lf_cli:
            lf_args = json.dumps({**shared, "use_cpu": True})
            runs.append(Run("LF", [str(lf_cli.parent / "python"), "-c", LF_TOKENIZE, lf_args], work / "LF",
                            {**LF_ENV, "HF_DATASETS_CACHE": str(work / "cache-lf")}, work / "cache-lf"))
        kept, _ = tuneforge_keys(shared)
        path = write_config(kept, work / "tuneforge.yaml", work / "out")
        runs.append(Run("tuneforge", [sys.executable, "-m", "tuneforge", "data", "preview", str(path), "--num", "0",
                                      f"data.cache_dir={work / 'cache-tf'}"], work / "tuneforge",
                        cache=work / "cache-tf"))
        results: dict[str, list[dict]] = {run.name: [] for run in runs}
        for _ in range(args.repeats):
            for run in runs:  # each cold: launch empties the run's cache first
                print(f"running {run.name} ...", flush=True)
                result = launch(run)
                results[run.name].append({"wall": result["whole"], "rss": result["rss_gib"],
                                          "others": result["others"]})
                print(f"  {run.name}: {result['whole']:.1f} s, peak RSS {result['rss_gib']:.2f} GiB, other "
                      f"processes {result['others']:.2f} cores; says: {rows_line(work / f'{run.name}.log')}",
                      flush=True)
    print(f"\n{'tool':10} {'wall s':>8} {'rows/s':>9} {'peak RSS':>9} {'others':>7}")
    for name, rs in results.items():
        wall = sorted(r["wall"] for r in rs)[len(rs) // 2]
        print(f"{name:10} {wall:8.1f} {args.rows / wall:9.0f} {max(r['rss'] for r in rs):8.2f}G "
              f"{max(r['others'] for r in rs):7.2f}")
    if "LF" in results:
        lf, tf = (sorted(r["wall"] for r in results[k])[len(results[k]) // 2] for k in ("LF", "tuneforge"))
        print(f"tuneforge/LF wall time: {tf / lf:.2f}x (below 1 is faster)")
    print("Whole processes, cold caches; valid only side by side, in one run, on one machine.")


if __name__ == "__main__":
    main()
