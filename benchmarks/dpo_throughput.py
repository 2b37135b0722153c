"""DPO LoRA throughput and memory: tuneforge vs LLaMA-Factory 0.9.5, side by side in one run.

Usage: python benchmarks/dpo_throughput.py [--pairs 16] [--epochs 1] [--repeats 1] [--max-steps N]
                                           [--lf-venv PATH] [--no-lf]

One synthetic pairwise set (alpaca ranking format, prompts and answers of varied length, every sequence within
the 512-token cutoff so neither tool truncates) and ONE LLaMA-Factory-style flat YAML (stage dpo, LoRA r8 on all
linear layers, sigmoid loss, beta 0.1, cutoff 512, batch 4, no accumulation, bf16) are written into a temp folder
and run, each configuration as its own process measured by the same harness:

- LF:                     `llamafactory-cli train` (LLaMA-Factory 0.9.5 in its own venv, installed on first use
                          as /work/shared/LLAMAFACTORY.md says, into ~/.cache/tuneforge-bench/lf-0.9.5);
- tuneforge:              `tuneforge train` on the same YAML (LF's flat keys load unchanged);
- tuneforge+precompute:   the same plus `precompute_ref_log_probs: true` (reference.precompute; LF has no such key).

Each tool's deviations from the shared YAML (LF needs `use_cpu: true` for bf16 on a CPU; keys tuneforge refuses are
dropped for tuneforge) are printed; defaults the YAML leaves open stay each tool's own (LF turns gradient
checkpointing on, tuneforge leaves it off; both are printed). Runs alternate (LF, tuneforge, tuneforge+precompute, then again with
--repeats 2). Figures per run:

- loop s: the training loop. tuneforge: `elapsed` of the last metrics.jsonl record (the loop's own clock, from
  before the first step to the end of the last). LF: `train_runtime` of train_results.json (HF Trainer's clock
  around its training loop). Precomputing reference log-probs happens before tuneforge's loop, so it is in
  "whole s" but not in "loop s";
- whole s: wall time of the whole command, from launch to exit;
- 1st step s: launch to the end of the first optimizer step. tuneforge: the `time` of its first metrics record;
  LF: when the first line of its trainer_log.jsonl appeared (polled every 50 ms; logging_steps is 1);
- tok/s: non-padding tokens / loop s, where tokens = sum over the training pairs of the chosen and the rejected
  sequence (prompt + answer, chatml, counted once here with the embedded model's tokenizer) x epochs. With
  --max-steps the token count is estimated as steps x batch x the mean pair (marked "~");
- others: CPU cores the rest of the machine used during the run (/proc/stat busy time minus the child's own CPU
  time, over the wall time); above 0.2 the run was not alone and the comparison is flagged as invalid;
- peak RSS: ru_maxrss of the child (os.wait4), i.e. the largest resident set of the process (or of any process it
  waited for).

A comparison is only valid side by side, in one run, on one machine: the absolute figures move with the CPU, its
load and the thread count; only the ratios measured together mean anything. Check `uptime` for an idle machine.
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
    DEFAULT_LF_VENV,
    LF_ENV,
    Run,
    chatml_lengths,
    check_lf_chatml,
    ensure_lf_venv,
    machine,
    measure,
    print_table,
    sample_text,
    tuneforge_keys,
    versions,
    write_config,
)

BATCH = 4
CUTOFF = 512
# What LF needs beyond the shared YAML on a CPU-only machine (each printed as a difference).
LF_EXTRA = {"use_cpu": True}


def make_pairs(folder: Path, pairs: int, tokenizer, seed: int = 0) -> list[dict]:
    """Alpaca ranking rows: prompts ~8-200 tokens, answers ~8 tokens up to what keeps the sequence <= ~500."""
    rng = random.Random(seed)
    rows = []
    for i in range(pairs):
        prompt_len = int(math.exp(rng.uniform(math.log(8), math.log(200))))
        room = 500 - prompt_len - 20  # chatml adds ~10 tokens around a turn pair; stay under the 512 cutoff
        answers = [int(math.exp(rng.uniform(math.log(8), math.log(room)))) for _ in range(2)]
        rows.append({"instruction": f"Question {i}: " + sample_text(rng, tokenizer, prompt_len),
                     "chosen": sample_text(rng, tokenizer, answers[0]),
                     "rejected": sample_text(rng, tokenizer, answers[1])})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"bench_pairs": {"file_name": "pairs.json", "ranking": True,
                            "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return rows


def pair_turns(rows: list[dict]) -> list[tuple[str, str]]:
    """The chosen and the rejected conversation of each pair, in that order."""
    return [(row["instruction"], row[side]) for row in rows for side in ("chosen", "rejected")]


def base_config(model_dir: Path, data: Path, args: argparse.Namespace) -> dict:
    """The one shared LLaMA-Factory flat config (output_dir is set per run)."""
    config = {
        "stage": "dpo", "do_train": True, "model_name_or_path": str(model_dir),
        "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
        "pref_beta": 0.1, "pref_loss": "sigmoid",
        "dataset_dir": str(data), "dataset": "bench_pairs", "template": "chatml", "cutoff_len": CUTOFF,
        "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "bf16": True,
        "learning_rate": 5.0e-6, "num_train_epochs": args.epochs,
        "logging_steps": 1, "save_steps": 100000, "report_to": "none", "overwrite_output_dir": True,
        "plot_loss": False,
    }
    if args.max_steps:
        config["max_steps"] = args.max_steps
    return config


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs in the synthetic set")
    parser.add_argument("--epochs", type=int, default=1, help="num_train_epochs")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (development)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the three runs this many times")
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV)
    parser.add_argument("--no-lf", action="store_true", help="skip LLaMA-Factory (tuneforge runs only)")
    parser.add_argument("--lf-no-checkpointing", action="store_true",
                        help="also run LF with disable_gradient_checkpointing: true (its fastest CPU setting)")
    return parser.parse_args()


def build_runs(work: Path, shared: dict, lf_cli: Path | None, lf_fast: bool = False) -> tuple[list[Run], list[str]]:
    """The configurations (LF first) from the shared YAML, and a note per difference from it."""
    from tuneforge.config.load import load

    tf_config, notes = tuneforge_keys(shared)
    runs = []
    if lf_cli:
        notes += [f"LF: added `{k}: {v}` (bf16 on a CPU-only machine)" for k, v in LF_EXTRA.items()]
        notes += [f"LF: environment {k}={v}" for k, v in LF_ENV.items()]
        lf_yaml = write_config({**shared, **LF_EXTRA}, work / "lf.yaml", work / "lf")
        cache = work / "cache" / "lf"
        runs.append(Run("LF", [str(lf_cli), "train", str(lf_yaml)], work / "lf",
                        {**LF_ENV, "HF_DATASETS_CACHE": str(cache)}, cache))
        if lf_fast:
            notes.append("LF-no-ckpt: LF plus `disable_gradient_checkpointing: true`")
            fast = write_config({**shared, **LF_EXTRA, "disable_gradient_checkpointing": True},
                                work / "lf-no-ckpt.yaml", work / "lf-no-ckpt")
            cache = work / "cache" / "lf-no-ckpt"
            runs.append(Run("LF-no-ckpt", [str(lf_cli), "train", str(fast)], work / "lf-no-ckpt",
                            {**LF_ENV, "HF_DATASETS_CACHE": str(cache)}, cache))
    notes.append("tuneforge+precompute: added `precompute_ref_log_probs: true` (LF has no such key)")
    for name, extra in (("tuneforge", {}), ("tuneforge+precompute", {"precompute_ref_log_probs": True})):
        path = write_config({**tf_config, **extra}, work / f"{name}.yaml", work / name)
        cfg = load(path)  # fail here, clearly, if tuneforge refuses the config
        cache = work / "cache" / name
        runs.append(Run(name, [sys.executable, "-m", "tuneforge", "train", str(path), f"data.cache_dir={cache}"],
                        work / name, cache=cache))
    notes.append("caches: each run tokenizes into an emptied folder of its own (LF: HF_DATASETS_CACHE; "
                 "tuneforge: data.cache_dir=, which also holds the precomputed reference log-probs)")
    notes.append(f"left to each tool's default: gradient checkpointing (tuneforge: "
                 f"{'on' if cfg.train.gradient_checkpointing else 'off'}{'; LF: see below' if lf_cli else ''})")
    return runs, notes


def lf_defaults(work: Path) -> str:
    """What LF's log says about the defaults that matter for speed (gradient checkpointing)."""
    log = (work / "lf.log").read_text(errors="replace")
    return "LF ran with gradient checkpointing " + ("on (its default)" if "Gradient checkpointing enabled" in log
                                                    else "off")


def main() -> None:
    args = parse_args()
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.embedded import embedded_model_dir
    from tuneforge.models.load import load_tokenizer

    print(f"machine: {machine()}")
    lf_cli = None if args.no_lf else ensure_lf_venv(args.lf_venv.expanduser())
    print(f"versions: {versions(lf_cli.parent / 'python' if lf_cli else None)}")
    tokenizer, model_dir = load_tokenizer(ModelConfig()), embedded_model_dir()
    with tempfile.TemporaryDirectory(prefix="tuneforge-dpo-bench-") as tmp:
        work = Path(tmp)
        rows = make_pairs(work / "data", args.pairs, tokenizer)
        flat = chatml_lengths(pair_turns(rows), tokenizer)
        lengths = list(zip(flat[::2], flat[1::2]))  # (chosen, rejected) per pair
        per_pair = [c + r for c, r in lengths]
        # With max_steps the trained pairs are not all of them once: estimate from the mean pair.
        tokens = (args.max_steps * BATCH * sum(per_pair) / len(per_pair) if args.max_steps
                  else sum(per_pair) * args.epochs)
        print(f"data: {args.pairs} pairs, sequences {min(min(x) for x in lengths)}-{max(max(x) for x in lengths)} "
              f"tokens, {sum(per_pair)} non-padding tokens per epoch (chosen + rejected, prompt included); "
              f"counted for the timed runs: {'~' if args.max_steps else ''}{tokens:.0f}")
        shared = base_config(model_dir, work / "data", args)
        print("shared YAML:\n" + "\n".join(f"  {k}: {v}" for k, v in shared.items()))
        if lf_cli:
            print("template: " + check_lf_chatml(lf_cli.parent / "python", model_dir, pair_turns(rows), flat, work))
        else:
            print("LF: skipped (--no-lf): tuneforge runs only, no ratios")
        runs, notes = build_runs(work, shared, lf_cli, args.lf_no_checkpointing)
        print("differences from the shared YAML:\n" + "\n".join(f"  - {n}" for n in notes))
        for _ in range(args.repeats):
            for run in runs:
                measure(run, tokens)
        if lf_cli:
            print(lf_defaults(work))
    print(f"\nmachine: {machine()}")
    print_table(runs, bool(args.max_steps))
    print("tok/s = non-padding tokens (chosen + rejected sequences) / loop seconds; loop and first-step clocks "
          "are each tool's own (see the docstring). Valid only side by side, in one run, on one machine.")


if __name__ == "__main__":
    main()
