"""Training throughput of `tuneforge train` on the embedded SmolLM2-135M-Instruct (LoRA r8, all linear layers).

Usage: python benchmarks/train_throughput.py [--steps 20] [--rows 200]

A synthetic alpaca set of 200 rows is written whose outputs range log-uniformly from ~30 to ~1,200 tokens; each
configuration is run as its own `tuneforge train` process (cutoff 512, batch 4, no accumulation) and measured from
its metrics.jsonl and its resource usage:

- rows/s and tokens/s over steps 2..N (the first step includes warm-up), without and with padding;
- time from launching the process to the end of the first optimizer step;
- peak RSS of the process;
- MFU: model FLOPs per token x tokens/s / a matmul peak measured here, in this run, on the same threads.
  FLOPs per token = 6 x trained weights + 4 x frozen weights (forward 2N; backward 2N for activation gradients,
  plus 2N for weight gradients only where weights train); weights are the decoder's linear layers plus the
  output head; attention-score FLOPs are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

WORDS = ("the model learns from data and every example shows a pattern that a careful reader can follow while "
         "numbers letters cities rivers music science history language computer garden winter summer bridge "
         "light energy ocean mountain forest engine theory market culture health teacher student question").split()


def make_dataset(folder: Path, rows: int, tokenizer, seed: int = 0) -> None:
    """Alpaca rows whose outputs are ~30 to ~1,200 tokens long, log-uniformly."""
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        target = int(math.exp(rng.uniform(math.log(30), math.log(1200))))
        words = [rng.choice(WORDS) for _ in range(target)]
        text = " ".join(words)
        ids = tokenizer.encode(text, add_special_tokens=False)[:target]
        data.append({"instruction": f"Write passage number {i} about {rng.choice(WORDS)}.", "input": "",
                     "output": tokenizer.decode(ids)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}), encoding="utf-8")


def matmul_peak(dtype: torch.dtype, m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 10) -> float:
    """GFLOP/s of a decoder-sized matmul on this process's threads (best of 5 trials)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(config: dict, rank: int) -> float:
    """6 x trained + 4 x frozen weights (LoRA on every linear layer of the decoder)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    frozen = layers * sum(i * o for i, o in shapes) + h * config["vocab_size"]
    trained = layers * sum(rank * (i + o) for i, o in shapes)
    return 6 * trained + 4 * frozen


def run_one(name: str, data_dir: Path, work: Path, steps: int, extra: list[str]) -> dict:
    """Launch one `tuneforge train` process and read its figures."""
    out = work / name
    config = {"model": {"path": "smollm2-135m-instruct"}, "finetune": {"method": "lora", "lora": {"rank": 8}},
              "data": {"dataset": ["bench"], "dataset_dir": str(data_dir), "template": "auto", "cutoff_len": 512,
                       "cache_dir": str(work / "cache")},
              "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps, "logging_steps": 1,
                        "save_steps": 0, "learning_rate": 1e-4},
              "output": {"dir": str(out), "plot_loss": False}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # Tokenize once outside the timed process, as a second run of the same data would.
    subprocess.run([sys.executable, "-m", "tuneforge", "data", "preview", str(path), "--num", "0", *extra],
                   check=True, capture_output=True)
    launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(path), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.read().decode()[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    seconds = last["time"] - first["time"]
    return {
        "name": name,
        "rows_per_s": 4 * (last["step"] - first["step"]) / seconds,
        "tokens_per_s": (last["input_tokens"] - first["input_tokens"]) / seconds,
        "padded_tokens_per_s": (last["padded_tokens"] - first["padded_tokens"]) / seconds,
        "first_step_s": first["time"] - launch,
        "peak_rss_gb": usage.ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.embedded import embedded_model_dir
    from tuneforge.models.load import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(ModelConfig())
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    fpt = flops_per_token(config, rank=8)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    head_peak = matmul_peak(torch.bfloat16, m=1024, k=576, n=49152, repeats=3)
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"(vocabulary projection bf16 {head_peak:.0f})")
    print(f"model FLOPs per token: {fpt / 1e6:.0f} M (6 x trained + 4 x frozen weights)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_dataset(work / "data", args.rows, tokenizer)
        results = [
            run_one("fp32", work / "data", work, args.steps, ["train.precision=fp32"]),
            run_one("bf16", work / "data", work, args.steps, ["train.precision=bf16"]),
            run_one("bf16+packing", work / "data", work, args.steps, ["train.precision=bf16", "data.packing=true"]),
        ]
    print(f"{'config':14} {'rows/s':>7} {'tok/s':>7} {'tok/s+pad':>10} {'1st step':>9} {'peak RSS':>9} {'MFU':>6}")
    for r in results:
        peak = peaks["fp32" if r["name"] == "fp32" else "bf16"]
        mfu = fpt * r["tokens_per_s"] / (peak * 1e9)
        print(f"{r['name']:14} {r['rows_per_s']:7.2f} {r['tokens_per_s']:7.0f} {r['padded_tokens_per_s']:10.0f} "
              f"{r['first_step_s']:8.1f}s {r['peak_rss_gb']:8.2f}G {100 * mfu:5.1f}%")
    print("tok/s counts non-padding tokens; MFU uses the measured peak of the run's own precision.")


if __name__ == "__main__":
    main()
