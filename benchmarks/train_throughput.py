"""Training throughput of `tuneforge train` on the embedded SmolLM2-135M-Instruct (LoRA r8, all linear layers).

Usage: python benchmarks/train_throughput.py [--steps 20] [--rows 200] [--precision auto|bf16|fp32]
       python benchmarks/train_throughput.py --compile [--steps 60] [--repeats 2] [--precision auto|bf16|fp32]
       python benchmarks/train_throughput.py --against-llamafactory [--rows 48] [--repeats 2] [--lf-venv PATH]
                                             [--precision auto|bf16|fp32]

--against-llamafactory: tuneforge and LLaMA-Factory 0.9.5 side by side, in one run, on the same data
----------------------------------------------------------------------------------------------------------------
A synthetic alpaca set (default 48 rows; outputs ~30 to ~450 tokens, log-uniformly, so every sequence fits the
512-token cutoff and neither tool truncates) and ONE LLaMA-Factory-style flat YAML (stage sft, LoRA r8 on all linear
layers, cutoff 512, batch 4, no accumulation, bf16, chatml, 1 epoch; fp32 instead on a CPU without native bf16,
where bf16 matmuls are emulated at a few GFLOP/s: `--precision` overrides) are written into a temp folder. LF 0.9.5 is
installed into its own cached venv on first use (benchmarks/lfbench.py: CPU torch pinned, its CUDA torchvision and
torchaudio removed). Each tool runs its best configuration for this machine, each as its own process:

- LF:                 `llamafactory-cli train` plus `use_cpu: true` (bf16 on a CPU), `packing: true` and
                      `disable_gradient_checkpointing: true` (its fastest CPU setting; LF packs rows into shared
                      512-token blocks whose rows attend to each other);
- tuneforge:          `tuneforge train` on the same YAML (length-grouped padded batches, its default);
- tuneforge+packing:  plus `packing: true` (rows packed into 512-token blocks the way LF packs them).

The runs alternate (LF, tuneforge, tuneforge+packing, then again with --repeats 2) and the table gives medians:
training-loop seconds (each tool's own clock), whole-command wall time, launch to the first optimizer step, non-
padding tokens/s (the rows' chatml tokens, counted once here and checked against LF's own chatml encoding, over
the loop seconds), peak RSS, MFU (below) and the ratios to LF. The CPU time other processes took during each run
is printed; above 0.2 cores the comparison is flagged as invalid.

Default mode: tuneforge alone, three configurations
------------------------------------------------------
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

--compile: tuneforge with and without `train.compile`
------------------------------------------------------
The same 200 rows, `--steps` steps (60 is a fair length: compiling pays off over a run, not a step), the plain
and the compiled run alternating `--repeats` times: whole-command time, first step, tokens/s over all steps and
over the last three quarters (steady state), peak RSS, each run's and the medians. The compiled runs share a
torch.compile cache of their own: the first compiles from nothing, the later ones reuse its code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lfbench import (
    DEFAULT_LF_VENV,
    LF_ENV,
    WORDS,
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


def matmul_peak(dtype: torch.dtype, m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 10,
                trials: int = 5, min_seconds: float = 2.0) -> float:
    """GFLOP/s of a decoder-sized matmul on this process's threads: the best of `trials` timings of `repeats`
    products, and of more while less than `min_seconds` have passed (a VM's transient slowdowns of a fraction of a
    second once made a peak here 2.7x too low, and every MFU beside it 2.7x too high)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3 if trials > 1 else 0):
        a @ b
    best, began, done = 0.0, time.perf_counter(), 0
    while done < trials or (time.perf_counter() - began < min_seconds and done < 1000):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
        done += 1
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
    wall = time.time() - launch
    if status != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.read().decode()[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    seconds = last["time"] - first["time"]
    later = records[len(records) // 4]  # steady state: the last three quarters of the steps
    return {
        "steady_tokens_per_s": (last["input_tokens"] - later["input_tokens"]) / (last["time"] - later["time"]),
        "wall_s": wall,
        "name": name,
        "rows_per_s": 4 * (last["step"] - first["step"]) / seconds,
        "tokens_per_s": (last["input_tokens"] - first["input_tokens"]) / seconds,
        "padded_tokens_per_s": (last["padded_tokens"] - first["padded_tokens"]) / seconds,
        "first_step_s": first["time"] - launch,
        "peak_rss_gb": usage.ru_maxrss / 2**20,
    }


# ------------------------------------------------------------------------------ side by side with LLaMA-Factory

LF_BEST = {"use_cpu": True, "packing": True, "disable_gradient_checkpointing": True}


def make_sft_rows(folder: Path, rows: int, tokenizer, seed: int = 0) -> list[dict]:
    """Alpaca rows: instructions ~8-40 tokens, outputs ~30-450 tokens (log-uniform); all within the cutoff."""
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        instruction = sample_text(rng, tokenizer, int(math.exp(rng.uniform(math.log(8), math.log(40)))))
        output = sample_text(rng, tokenizer, int(math.exp(rng.uniform(math.log(30), math.log(450)))))
        data.append({"instruction": f"Passage {i}: {instruction}", "input": "", "output": output})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}), encoding="utf-8")
    return data



def against_llamafactory(args: argparse.Namespace, tokenizer, model_dir: Path, fpt: float, precision: str,
                         peak: float) -> None:
    """Both tools on one shared YAML, alternating; the table of medians and the ratios."""
    from tuneforge.config.load import load

    lf_cli = ensure_lf_venv(args.lf_venv.expanduser())
    print(f"versions: {versions(lf_cli.parent / 'python')}")
    with tempfile.TemporaryDirectory(prefix="tuneforge-sft-bench-") as tmp:
        work = Path(tmp)
        rows = make_sft_rows(work / "data", args.rows, tokenizer)
        turns = [(row["instruction"], row["output"]) for row in rows]
        lengths = chatml_lengths(turns, tokenizer)
        tokens = sum(lengths)
        print(f"data: {len(rows)} rows of {min(lengths)}-{max(lengths)} tokens (chatml), {tokens} non-padding tokens")
        print("template: " + check_lf_chatml(lf_cli.parent / "python", model_dir, turns, lengths, work))
        shared = {"stage": "sft", "do_train": True, "model_name_or_path": str(model_dir), "finetuning_type": "lora",
                  "lora_rank": 8, "lora_target": "all", "dataset_dir": str(work / "data"), "dataset": "bench",
                  "template": "chatml", "cutoff_len": 512, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "num_train_epochs": 1,
                  "logging_steps": 1, "save_steps": 100000, "report_to": "none", "overwrite_output_dir": True,
                  "plot_loss": False, **({"bf16": True} if precision == "bf16" else {})}
        print("shared YAML:\n" + "\n".join(f"  {k}: {v}" for k, v in shared.items()))
        notes = [f"LF: added `{k}: {v}`" for k, v in LF_BEST.items()] + [f"LF: environment {k}={v}"
                                                                          for k, v in LF_ENV.items()]
        lf_yaml = write_config({**shared, **LF_BEST}, work / "lf.yaml", work / "lf")
        cache = work / "cache" / "lf"
        runs = [Run("LF", [str(lf_cli), "train", str(lf_yaml)], work / "lf",
                    {**LF_ENV, "HF_DATASETS_CACHE": str(cache)}, cache)]
        kept, dropped = tuneforge_keys(shared)
        notes += dropped + ["tuneforge+packing: added `packing: true`"]
        for name, extra in (("tuneforge", {}), ("tuneforge+packing", {"packing": True})):
            path = write_config({**kept, **extra}, work / f"{name}.yaml", work / name)
            load(path)  # fail here, clearly, if tuneforge refuses the config
            cache = work / "cache" / name
            runs.append(Run(name, [sys.executable, "-m", "tuneforge", "train", str(path), f"data.cache_dir={cache}"],
                            work / name, cache=cache))
        notes.append("caches: every run tokenizes into an emptied cache folder of its own")
        print("differences from the shared YAML:\n" + "\n".join(f"  - {n}" for n in notes))
        for _ in range(args.repeats):
            for run in runs:
                measure(run, tokens)
    peak = peak_again(precision, peak)
    print(f"\nmachine: {machine()}; matmul peak measured here: {precision} {peak:.0f} GFLOP/s; "
          f"model FLOPs per token {fpt / 1e6:.0f} M")
    print_table(runs, False, mfu=lambda run, tok_s: fpt * tok_s / (peak * 1e9))
    print(f"tok/s = the rows' non-padding tokens / loop seconds; MFU = FLOPs per token x tok/s / the {precision} "
          "matmul peak. Valid only side by side, in one run, on one machine.")


def peak_again(precision: str, before: float) -> float:
    """The matmul peak measured again after the runs; the higher of the two (printed)."""
    from tuneforge.devices import cpu_bf16_supported

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "bf16" and not cpu_bf16_supported():
        return before  # emulated: measured once
    again = matmul_peak(dtype)
    print(f"{precision} matmul peak: {before:.0f} GFLOP/s before the runs, {again:.0f} after; MFU uses "
          f"{max(before, again):.0f}")
    return max(before, again)


def compiled_or_not(args: argparse.Namespace, tokenizer, fpt: float, precision: str, peak: float) -> None:
    """`tuneforge train` with and without train.compile on the same data, alternating; medians."""
    configs = [(precision, [f"train.precision={precision}"]),
               (f"{precision}+compile", [f"train.precision={precision}", "train.compile=true"])]
    results: dict[str, list[dict]] = {name: [] for name, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # a cache of compiled code of this run's own: the first compiled run compiles from nothing, later ones find
        # what it wrote (as a user's second run would)
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")  # inherited by the runs
        try:
            make_dataset(work / "data", args.rows, tokenizer)
            for repeat in range(args.repeats):
                for name, extra in configs:
                    result = run_one(f"{name}-{repeat}", work / "data", work, args.steps, extra)
                    results[name].append(result)
                    print(f"  run {repeat + 1} {name}: whole command {result['wall_s']:.1f} s, steady "
                          f"{result['steady_tokens_per_s']:.0f} tok/s", flush=True)
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    peak = peak_again(precision, peak)
    print(f"\n{args.steps} steps, {args.rows} rows, medians of {args.repeats} alternating runs "
          "(the first compiled run starts from an empty torch.compile cache, later ones reuse it):")
    print(f"{'config':14} {'whole run':>10} {'1st step':>9} {'tok/s':>7} {'steady tok/s':>13} {'peak RSS':>9} "
          f"{'steady MFU':>11}")
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs)
               for key in ("wall_s", "first_step_s", "tokens_per_s", "steady_tokens_per_s", "peak_rss_gb")}
        print(f"{name:14} {med['wall_s']:9.1f}s {med['first_step_s']:8.1f}s {med['tokens_per_s']:7.0f} "
              f"{med['steady_tokens_per_s']:13.0f} {med['peak_rss_gb']:8.2f}G "
              f"{100 * fpt * med['steady_tokens_per_s'] / (peak * 1e9):10.1f}%")
    print("tok/s: non-padding tokens over steps 2..N; steady: over the last three quarters of the steps (after "
          "the compiles of the first batch shapes).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a run (20; 60 with --compile)")
    parser.add_argument("--rows", type=int, default=None, help="rows in the synthetic set (200; 48 against LF)")
    parser.add_argument("--against-llamafactory", action="store_true",
                        help="run LLaMA-Factory 0.9.5 and tuneforge side by side on the same data and YAML")
    parser.add_argument("--repeats", type=int, default=2, help="alternations against LF (medians are printed)")
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the CPU has native bf16 (AVX512-BF16 / AMX), else fp32")
    parser.add_argument("--compile", action="store_true",
                        help="tuneforge with and without train.compile, alternating --repeats times")
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.compile else 20)
    from tuneforge.config.schema import ModelConfig
    from tuneforge.devices import cpu_bf16_supported
    from tuneforge.models.embedded import embedded_model_dir
    from tuneforge.models.load import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(ModelConfig())
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    fpt = flops_per_token(config, rank=8)
    native_bf16 = cpu_bf16_supported()
    precision = args.precision if args.precision != "auto" else "bf16" if native_bf16 else "fp32"
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}")
    peaks = {"fp32": matmul_peak(torch.float32)}
    if native_bf16:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
        head_peak = matmul_peak(torch.bfloat16, m=1024, k=576, n=49152, repeats=3)
        print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
              f"(vocabulary projection bf16 {head_peak:.0f})")
    else:  # emulated bf16 runs at a few GFLOP/s: measuring its peak would take many minutes
        peaks["bf16"] = matmul_peak(torch.bfloat16, repeats=1, trials=1, min_seconds=0)
        print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s; this CPU has no native bf16 (AVX512-BF16 / AMX): "
              f"bf16 matmuls are emulated, {peaks['bf16']:.1f} GFLOP/s"
              + (", so training is measured in fp32 (--precision bf16 forces bf16)" if precision == "fp32" else ""))
    print(f"model FLOPs per token: {fpt / 1e6:.0f} M (6 x trained + 4 x frozen weights)")
    if args.against_llamafactory:
        args.rows = args.rows or 48
        return against_llamafactory(args, tokenizer, embedded_model_dir(), fpt, precision, peaks[precision])
    args.rows = args.rows or 200
    if args.compile:
        return compiled_or_not(args, tokenizer, fpt, precision, peaks[precision])
    configs = [("fp32", ["train.precision=fp32"])]
    if precision == "bf16":
        configs += [("bf16", ["train.precision=bf16"]),
                    ("bf16+packing", ["train.precision=bf16", "data.packing=true"])]
    else:
        configs += [("fp32+packing", ["train.precision=fp32", "data.packing=true"])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_dataset(work / "data", args.rows, tokenizer)
        results = [run_one(name, work / "data", work, args.steps, extra) for name, extra in configs]
    for name in list(peaks):
        if any(r["name"].split("+")[0] == name for r in results):
            peaks[name] = peak_again(name, peaks[name])
    print(f"{'config':14} {'rows/s':>7} {'tok/s':>7} {'tok/s+pad':>10} {'1st step':>9} {'peak RSS':>9} {'MFU':>6}")
    for r in results:
        peak = peaks[r["name"].split("+")[0]]
        mfu = fpt * r["tokens_per_s"] / (peak * 1e9)
        print(f"{r['name']:14} {r['rows_per_s']:7.2f} {r['tokens_per_s']:7.0f} {r['padded_tokens_per_s']:10.0f} "
              f"{r['first_step_s']:8.1f}s {r['peak_rss_gb']:8.2f}G {100 * mfu:5.1f}%")
    print("tok/s counts non-padding tokens; MFU uses the measured peak of the run's own precision.")


if __name__ == "__main__":
    main()
