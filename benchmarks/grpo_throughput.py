"""GRPO throughput on the embedded SmolLM2-135M-Instruct: rollout + update, and the rollout's generation against a
bare batched `generate` on the same batch.

Usage: python benchmarks/grpo_throughput.py [--config examples/grpo_quickstart.yaml] [--steps 6] [--repeats 3]

Everything runs in this one process, one part after the other (nothing else should run on the machine):

1. Generation alone, on the first step's batch (prompts x num_generations rows, left-padded, the run's sampling
   settings and max_completion_length, the template's stop words):
   - rollout: the path training uses (`GRPOStage.generate` on the LoRA policy, in `rollout_mode`, under the run's
     autocast), with the adapters unmerged as they are while training;
   - bare: `AutoModelForCausalLM.from_pretrained(...).generate(...)` on the same base weights, same dtype, no
     adapters, no wrappers, the same inputs and sampling arguments.
   Both are seeded alike; tokens/s = rows x decoded positions / seconds (every row occupies its slot until the
   batch stops), best of --repeats calls after one warm-up call each.
2. Rollout + update: `run.prepare` + `run.fit_job` for --steps steps of the config (default: the GRPO
   quickstart), logging every step. From metrics.jsonl, over steps 2..N (step 1 includes warm-up):
   completions/s, trained tokens/s (completion tokens the loss covers) and input tokens/s (prompt + completion),
   and the share of loop time spent generating, in the rest of the rollout (decoding text, rewards, fixed
   log-probs) and training (forward, backward, optimizer step).

Figures depend on the machine, its load and the thread count; compare only figures printed by one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def generation_speeds(job, repeats: int) -> dict[str, float]:
    """tokens/s of the rollout's generation path and of a bare generate on the first step's batch."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models.hub import resolve_model_dir
    from tuneforge.stages.grpo import rollout_mode
    from tuneforge.stages.reference import base_dtype

    stage, cfg, acc = job.stage, job.cfg, job.context.accelerator
    g, gen = stage.settings.num_generations, cfg.generation
    prompts = [row["input_ids"] for row in job.train_rows[: cfg.train.batch_size]]
    rows = [p for p in prompts for _ in range(g)]
    longest = max(len(p) for p in rows)

    def rollout() -> int:
        with acc.autocast(), rollout_mode(job.model, 0) as device:
            out = stage.generate(job.model, prompts, device)
        return len(out) * len(out[0])

    bare_model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(cfg.model), dtype=base_dtype(job.model))
    bare_model.eval()
    stop_ids = stage.stop_ids()
    input_ids = torch.tensor([[stage.pad_id] * (longest - len(p)) + list(p) for p in rows])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in rows])

    def bare() -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = bare_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                                      max_new_tokens=stage.settings.max_completion_length,
                                      temperature=stage.temperature, top_p=gen.top_p, top_k=gen.top_k or None,
                                      repetition_penalty=gen.repetition_penalty, pad_token_id=stage.pad_id,
                                      eos_token_id=stop_ids, use_cache=True)
        return out.shape[0] * (out.shape[1] - longest)

    speeds = {}
    for name, fn in (("rollout", rollout), ("bare", bare)):
        fn()  # warm-up
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = fn()
            best = max(best, tokens / (time.perf_counter() - start))
        speeds[name] = best
    speeds["rows"] = len(rows)
    return speeds


def loop_figures(records: list[dict], completions_per_step: int) -> dict[str, float]:
    """Throughput and time shares over records 2..N (one record per step)."""
    first, rest = records[0], records[1:]
    seconds = rest[-1]["elapsed"] - first["elapsed"]
    generation = sum(r["timing/generation_s"] for r in rest)
    rollout = sum(r["timing/rollout_s"] for r in rest)
    return {
        "steps": len(rest), "seconds": seconds,
        "completions_per_s": completions_per_step * len(rest) / seconds,
        "trained_tokens_per_s": (rest[-1]["trained_units"] - first["trained_units"]) / seconds,
        "input_tokens_per_s": (rest[-1]["input_tokens"] - first["input_tokens"]) / seconds,
        "generation_share": generation / seconds, "rest_of_rollout_share": (rollout - generation) / seconds,
        "training_share": (seconds - rollout) / seconds,
        "mean_completion_tokens": sum(r["completions/mean_length"] for r in rest) / len(rest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "grpo_quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tuneforge.config import load
    from tuneforge.run import fit_job, prepare

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(args.config, [f"train.max_steps={args.steps}", "train.logging_steps=1", "train.save_steps=0",
                                 f"output.dir={tmp}/run", "output.overwrite=true", "output.plot_loss=false",
                                 "grpo.completions_logged=0"])
        job = prepare(cfg)
        s, t = job.stage.settings, cfg.train
        print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; config {args.config}")
        print(f"batch: {t.batch_size} prompts x {s.num_generations} completions, up to {s.max_completion_length} new "
              f"tokens, {job.plan.precision}, {cfg.finetune.method}")
        speeds = generation_speeds(job, args.repeats)
        fit_job(job)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    loop = loop_figures([r for r in records if "timing/rollout_s" in r],
                        t.batch_size * t.gradient_accumulation_steps * s.num_generations)
    print(f"\ngeneration on one step's batch ({speeds['rows']} rows), best of {args.repeats}:")
    print(f"  rollout path (LoRA policy): {speeds['rollout']:8.1f} tok/s")
    print(f"  bare generate (base model): {speeds['bare']:8.1f} tok/s")
    print(f"  bare / rollout: {speeds['bare'] / speeds['rollout']:.2f}x (target: within 1.5x)")
    print(f"\nrollout + update, steps 2..{loop['steps'] + 1} ({loop['seconds']:.1f} s):")
    print(f"  completions/s:       {loop['completions_per_s']:.2f} (mean {loop['mean_completion_tokens']:.1f} tokens)")
    print(f"  trained tokens/s:    {loop['trained_tokens_per_s']:.1f} (completion tokens under the loss)")
    print(f"  input tokens/s:      {loop['input_tokens_per_s']:.1f} (prompt + completion, training forward)")
    print(f"  time: generation {100 * loop['generation_share']:.0f}%, rest of rollout "
          f"{100 * loop['rest_of_rollout_share']:.0f}%, training {100 * loop['training_share']:.0f}%")


if __name__ == "__main__":
    main()
