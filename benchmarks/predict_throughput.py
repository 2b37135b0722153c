"""Batched prediction (`do_predict` with `predict_with_generate`): tuneforge vs LLaMA-Factory 0.9.5, side by side.

Usage: python benchmarks/predict_throughput.py [--rows 64] [--batch 8] [--max-new-tokens 64] [--repeats 1]
                                               [--lf-venv PATH] [--no-lf]

Writes a synthetic alpaca set (instructions asking for answers of different lengths) and ONE LLaMA-Factory-style
YAML: stage sft, `do_train: false`, `do_predict: true`, `predict_with_generate: true` over it as `eval_dataset`,
the embedded SmolLM2-135M-Instruct, chatml, greedy (`do_sample: false`), `max_new_tokens`,
`per_device_eval_batch_size`. Each tool runs that YAML as its own process (`llamafactory-cli train` in its venv,
`tuneforge train`), alternating, and writes `generated_predictions.jsonl` and `predict_results.json`. Printed per
tool: whole-process wall time, the predict phase's own runtime and samples/s (each tool's `predict_results.json`),
peak RSS; then how many of the two tools' predictions are identical, and the ratios.
"""

from __future__ import annotations

import argparse
import json
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
    machine,
    tuneforge_keys,
    write_config,
)

TOPICS = ["cats", "rivers", "tea", "bridges", "winter", "music", "gardens", "the moon", "trains", "chess", "bread",
          "clocks", "volcanoes", "bees", "libraries", "salt"]
ASKS = ["Answer in two words: what is special about {}?", "Write one sentence about {}.",
        "Write a short paragraph about {}.", "List three facts about {}.", "Explain {} to a child in detail."]


def make_rows(folder: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    data = [{"instruction": ASKS[i % len(ASKS)].format(rng.choice(TOPICS)), "input": "",
             "output": f"reference answer {i}"} for i in range(rows)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}), encoding="utf-8")


def predictions(out: Path) -> list[str]:
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["predict"] for x in lines if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    add_lf_arguments(parser)
    args = parser.parse_args()
    from tuneforge.models.embedded import embedded_model_dir

    lf_cli = lf_and_header(args)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-predict-bench-") as tmp:
        work = Path(tmp)
        make_rows(work / "data", args.rows)
        shared = {"stage": "sft", "do_train": False, "do_predict": True, "predict_with_generate": True,
                  "model_name_or_path": str(embedded_model_dir()), "finetuning_type": "lora",
                  "dataset_dir": str(work / "data"), "eval_dataset": "bench", "template": "chatml",
                  "cutoff_len": 512, "max_new_tokens": args.max_new_tokens, "do_sample": False,
                  "per_device_eval_batch_size": args.batch, "report_to": "none", "overwrite_cache": True}
        print("shared YAML:\n" + "\n".join(f"  {k}: {v}" for k, v in shared.items()))
        runs = []
        if lf_cli:
            lf_yaml = write_config(shared, work / "lf.yaml", work / "LF")
            runs.append(Run("LF", [str(lf_cli), "train", str(lf_yaml)], work / "LF",
                            {**LF_ENV, "HF_DATASETS_CACHE": str(work / "cache-lf")}, work / "cache-lf"))
        kept, notes = tuneforge_keys(shared)
        tf_yaml = write_config(kept, work / "tuneforge.yaml", work / "tuneforge")
        runs.append(Run("tuneforge", [sys.executable, "-m", "tuneforge", "train", str(tf_yaml),
                                      f"data.cache_dir={work / 'cache-tf'}"], work / "tuneforge",
                        cache=work / "cache-tf"))
        for note in notes:
            print(f"  - {note}")
        answers: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for run in runs:
                print(f"running {run.name} ...", flush=True)
                raw = launch(run)
                phase = json.loads((run.out / "predict_results.json").read_text())
                answers[run.name] = predictions(run.out)
                figures = {"whole": raw["whole"], "predict": phase["predict_runtime"], "rss": raw["rss_gib"],
                           "others": raw["others"]}
                results.setdefault(run.name, []).append(figures)
                print(f"  {run.name}: whole {raw['whole']:.1f} s, predict {phase['predict_runtime']:.1f} s, peak RSS "
                      f"{raw['rss_gib']:.2f} GiB, other processes {raw['others']:.2f} cores", flush=True)
    print(f"\nmachine: {machine()}")
    print(f"{'tool':10} {'whole s':>8} {'predict s':>10} {'rows/s':>7} {'peak RSS':>9}")
    medians = {}
    for name, rs in results.items():
        pick = sorted(rs, key=lambda r: r["predict"])[len(rs) // 2]
        medians[name] = pick
        print(f"{name:10} {pick['whole']:8.1f} {pick['predict']:10.1f} {args.rows / pick['predict']:7.2f} "
              f"{pick['rss']:8.2f}G")
    if "LF" in medians:
        same = sum(a == b for a, b in zip(answers["LF"], answers["tuneforge"]))
        print(f"identical predictions: {same} of {args.rows}")
        lf, tf = medians["LF"], medians["tuneforge"]
        print(f"tuneforge vs LF: predict phase {lf['predict'] / tf['predict']:.2f}x as fast, whole command "
              f"{lf['whole'] / tf['whole']:.2f}x, peak RSS {tf['rss'] / lf['rss']:.2f}x")
    print("Valid only side by side, in one run, on one machine.")


if __name__ == "__main__":
    main()
