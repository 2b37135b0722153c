"""What the side-by-side benchmarks against LLaMA-Factory share: LF 0.9.5 in its own venv, one process per run
measured by the same harness (wall time, first step, peak RSS, the CPU time other processes took meanwhile), the
table of medians and the tuneforge/LF ratios.

Imported by benchmarks/dpo_throughput.py and benchmarks/train_throughput.py (run as scripts from any folder: this
folder is then first on sys.path).
"""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LF_VERSION = "0.9.5"
TORCH_PIN = "2.13.0"
TORCHVISION_PIN = "0.28.0"
READY = ".tuneforge-bench-ready"  # written last, so a half-finished install is never reused
WORDS = ("the model learns from data and every example shows a pattern that a careful reader can follow while "
         "numbers letters cities rivers music science history language computer garden winter summer bridge "
         "light energy ocean mountain forest engine theory market culture health teacher student question").split()
LF_ENV = {"DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
DEFAULT_LF_VENV = Path.home() / ".cache" / "tuneforge-bench" / f"lf-{LF_VERSION}"


@dataclass
class Run:
    """One configuration: the command, where its metrics appear, and what was measured."""

    name: str
    command: list[str]
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    cache: Path | None = None  # emptied before every launch, so each run tokenizes (and precomputes) cold
    figures: list[dict] = field(default_factory=list)


def ensure_lf_venv(venv: Path) -> Path:
    """LLaMA-Factory 0.9.5 with CPU torch in its own venv (reused when complete); the path of llamafactory-cli."""
    cli = venv / "bin" / "llamafactory-cli"
    if (venv / READY).exists():
        return cli
    print(f"installing LLaMA-Factory {LF_VERSION} into {venv} (once; ~90 s, ~2.2 GB)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)  # an unfinished earlier install
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(venv / "bin" / "pip"), "--disable-pip-version-check"]
    constraints = venv.parent / f"lf-{LF_VERSION}-constraints.txt"
    constraints.write_text(f"torch=={TORCH_PIN}\ntorchvision=={TORCHVISION_PIN}\n")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", f"torch=={TORCH_PIN}"],  # the CPU build first
        # Without the constraint pip swaps CPU torch for a CUDA torch plus ~20 nvidia wheels.
        [*pip, "install", f"llamafactory=={LF_VERSION}", "-c", str(constraints)],
        # PyPI's torchvision is a CUDA build: with it every LF import dies on `torchvision::nms`.
        [*pip, "uninstall", "-y", "torchvision"],
    ]
    for step in steps:
        print("  $ " + " ".join(step), flush=True)
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            fail(f"LF install step failed ({result.returncode})", result.stdout + result.stderr)
    # torchaudio's .so files are CUDA builds too and LF imports torchaudio unconditionally; without them it
    # imports as pure Python.
    for so in glob.glob(str(venv / "lib" / "python3.*" / "site-packages" / "torchaudio" / "lib" / "*.so")):
        os.remove(so)
    (venv / READY).write_text(LF_VERSION)
    return cli


def add_lf_arguments(parser: Any) -> None:
    """--lf-venv and --no-lf, which every side-by-side benchmark takes."""
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV)
    parser.add_argument("--no-lf", action="store_true")


def lf_and_header(args: Any) -> Path | None:
    """Print the machine and versions; LF's CLI (installed on first use), or None with --no-lf."""
    print(f"machine: {machine()}")
    lf_cli = None if args.no_lf else ensure_lf_venv(args.lf_venv.expanduser())
    print(f"versions: {versions(lf_cli.parent / 'python' if lf_cli else None)}")
    return lf_cli


def fail(message: str, output: str) -> None:
    """Print a failure with the last 40 lines of its output and exit non-zero."""
    tail = "\n".join(output.splitlines()[-40:])
    print(f"\nFAILED: {message}\n--- last 40 lines ---\n{tail}\n---", file=sys.stderr, flush=True)
    raise SystemExit(1)


def sample_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """About `tokens` tokens of word salad (decoded from a token cut, so the length is close)."""
    text = " ".join(rng.choice(WORDS) for _ in range(tokens))
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:tokens]).strip()


def tuneforge_keys(config: dict) -> tuple[dict, list[str]]:
    """The config without the keys tuneforge refuses, and a note per dropped key."""
    from tuneforge.config.llamafactory import UNSUPPORTED, is_lf_key

    kept, notes = {}, []
    for key, value in config.items():
        if not is_lf_key(key) or key in UNSUPPORTED:
            notes.append(f"tuneforge: dropped `{key}: {value}` (tuneforge refuses it)")
        else:
            kept[key] = value
    return kept, notes


def write_config(config: dict, path: Path, out: Path) -> Path:
    """Write one run's YAML (the shared config plus its output_dir)."""
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}, sort_keys=False), encoding="utf-8")
    return path


def launch(run: Run) -> dict:
    """Run one child to the end; wall time, time to the first logged step and peak RSS."""
    log_path = run.out.parent / f"{run.out.name}.log"
    for folder in (run.out, run.cache):
        if folder and folder.exists():
            shutil.rmtree(folder)
    first_log = run.out / ("metrics.jsonl" if run.name.startswith("tuneforge") else "trainer_log.jsonl")
    first_seen, busy_before = None, busy_cpu_seconds()
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **run.env})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if first_seen is None and first_log.exists() and first_log.stat().st_size > 0:
                first_seen = time.time()
            time.sleep(0.05)
    end = time.time()
    # CPU time the rest of the machine used meanwhile, in cores: all busy time minus the child's own.
    others = (busy_cpu_seconds() - busy_before - usage.ru_utime - usage.ru_stime) / (end - start)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        fail(f"{run.name} exited with {proc.returncode}: {' '.join(run.command)}", log_path.read_text())
    return {"whole": end - start, "start": start, "first_seen": first_seen, "rss_gib": usage.ru_maxrss / 2**20,
            "others": max(others, 0.0)}


def tuneforge_figures(out: Path, start: float) -> dict:
    """Loop seconds, steps and first-step time from metrics.jsonl."""
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "elapsed" in r]
    return {"loop": steps[-1]["elapsed"], "first_step": steps[0]["time"] - start, "steps": steps[-1]["step"],
            "epoch": steps[-1]["epoch"]}


def lf_figures(out: Path, first_seen: float | None, start: float) -> dict:
    """Loop seconds (train_runtime), steps and first-step time from LF's output folder."""
    results = json.loads((out / "train_results.json").read_text())
    records = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    return {"loop": results["train_runtime"], "first_step": (first_seen - start) if first_seen else math.nan,
            "steps": records[-1]["current_steps"], "epoch": results.get("epoch", math.nan)}


def measure(run: Run, tokens: float) -> dict:
    """Launch one run and turn its files into the table's figures."""
    print(f"running {run.name} ...", flush=True)
    raw = launch(run)
    if run.name.startswith("tuneforge"):
        figures = tuneforge_figures(run.out, raw["start"])
    else:
        figures = lf_figures(run.out, raw["first_seen"], raw["start"])
    figures.update(whole=raw["whole"], rss_gib=raw["rss_gib"], tok_s=tokens / figures["loop"], others=raw["others"])
    busy = "  (NOT IDLE: other processes competed for the CPUs)" if raw["others"] > 0.2 else ""
    print(f"  {run.name}: {figures['steps']} steps, loop {figures['loop']:.1f} s, whole {raw['whole']:.1f} s, "
          f"peak RSS {raw['rss_gib']:.2f} GiB; other processes used {raw['others']:.2f} cores meanwhile{busy}",
          flush=True)
    run.figures.append(figures)
    return figures


def busy_cpu_seconds() -> float:
    """Seconds all CPUs of this machine have spent busy since boot (/proc/stat: user, nice, system, irq, softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """CPU model and core count (from /proc/cpuinfo)."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, load {load:.2f}"


def versions(lf_python: Path | None) -> str:
    """tuneforge's stack, and LF's when it runs."""
    import torch
    import transformers

    import tuneforge

    line = f"tuneforge {tuneforge.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"
    if lf_python:
        code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
                "('llamafactory', 'torch', 'transformers', 'peft', 'trl', 'accelerate')))")
        result = subprocess.run([str(lf_python), "-c", code], capture_output=True, text=True)
        line += "; LF venv: " + (result.stdout.strip() or result.stderr.strip()[-200:])
    return line


def print_table(runs: list[Run], estimated: bool, mfu: Callable[[Run, float], float] | None = None) -> None:
    """One row per configuration (median over repeats), then tuneforge/LF ratios. `mfu(run, tok_s)`, when given,
    adds a column: the model FLOPs utilisation of that throughput (a fraction)."""
    def median(run: Run, key: str) -> float:
        values = sorted(f[key] for f in run.figures)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    mark = "~" if estimated else ""
    print(f"\n{'configuration':22} {'steps':>5} {'loop s':>8} {'whole s':>8} {'1st step s':>10} {'tok/s':>9} {'peak RSS':>9} "
          f"{'others':>7}" + (f" {'MFU':>6}" if mfu else ""))
    for run in runs:
        print(f"{run.name:22} {run.figures[-1]['steps']:5} {median(run, 'loop'):8.1f} {median(run, 'whole'):8.1f} "
              f"{median(run, 'first_step'):10.1f} {mark + format(median(run, 'tok_s'), '.0f'):>9} "
              f"{median(run, 'rss_gib'):8.2f}G {max(f['others'] for f in run.figures):7.2f}"
              + (f" {100 * mfu(run, median(run, 'tok_s')):5.1f}%" if mfu else ""))
    if len({f["steps"] for run in runs for f in run.figures}) > 1:
        print("WARNING: the runs trained different numbers of optimizer steps; tok/s is still per loop second")
    lf = next((r for r in runs if r.name == "LF"), None)
    if lf is None:
        return
    print(f"\n{'ratio vs LF':22} {'':5} {'loop':>8} {'whole':>8} {'1st step':>10} {'tok/s':>9} {'peak RSS':>9}")
    for base in [r for r in runs if r.name.startswith("LF")]:
        for run in runs:
            if run.name.startswith("LF"):
                continue
            cells = [median(run, k) / median(base, k) for k in ("loop", "whole", "first_step", "tok_s", "rss_gib")]
            print(f"{run.name + '/' + base.name:22} {'':5} "
                  + " ".join(f"{c:{w}.2f}x" for c, w in zip(cells, (7, 7, 9, 8, 8))))
    if len(runs[0].figures) > 1:
        print(f"(medians of {len(runs[0].figures)} repeats)")
    if any(f["others"] > 0.2 for run in runs for f in run.figures):
        print("WARNING: other processes used the CPUs during some runs ('others', cores, the most of any repeat): "
              "these figures are not a valid comparison; rerun on an idle machine.")


def chatml_lengths(turns: list[tuple[str, str]], tokenizer) -> list[int]:
    """Token count of each one-turn conversation (user prompt, assistant answer) with tuneforge's chatml."""
    from tuneforge.data.types import Message
    from tuneforge.templates import get_template

    template = get_template("chatml", tokenizer)
    lengths = []
    for prompt_text, answer in turns:
        (prompt, response), = template.encode_pairs([Message("user", prompt_text), Message("assistant", answer)],
                                                    None, None)
        lengths.append(len(prompt) + len(response))
    return lengths


LF_CHATML_LENGTHS = """
import json, sys
from transformers import AutoTokenizer
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="chatml"))
out = []
for prompt, answer in json.load(open(sys.argv[2])):
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    ids, labels = template.encode_oneturn(tokenizer, msgs)
    out.append(len(ids) + len(labels))
print("LENGTHS" + json.dumps(out))
"""


def check_lf_chatml(python: Path, model_dir: Path, turns: list[tuple[str, str]], ours: list[int], work: Path) -> str:
    """Encode the same one-turn conversations with LF's own chatml template (in its venv); a note on whether the
    token counts equal tuneforge's."""
    path = work / "lf-chatml-turns.json"
    path.write_text(json.dumps(turns), encoding="utf-8")
    result = subprocess.run([str(python), "-c", LF_CHATML_LENGTHS, str(model_dir), str(path)],
                            capture_output=True, text=True, env={**os.environ, **LF_ENV})
    if result.returncode != 0:
        fail("encoding the rows with LF's chatml template failed", result.stdout + result.stderr)
    line = next(x for x in result.stdout.splitlines() if x.startswith("LENGTHS"))
    theirs = json.loads(line[len("LENGTHS"):])
    if theirs == ours:
        return f"LF's chatml encodes all {len(ours)} sequences to the same token counts as tuneforge's chatml"
    return (f"WARNING: LF's chatml token counts differ from tuneforge's on "
            f"{sum(a != b for a, b in zip(theirs, ours))} of {len(ours)} sequences "
            f"(LF {sum(theirs)} vs tuneforge {sum(ours)} tokens)")
