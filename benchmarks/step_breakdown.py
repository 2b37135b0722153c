"""Where one LoRA training step's time goes on this machine, and what a forward pass costs by its size.

Usage: python benchmarks/step_breakdown.py [--repeats 5] [--precision auto|bf16|fp32] [--no-profile]

The embedded SmolLM2-135M-Instruct, LoRA r8 on every linear layer, through the production path (`run.prepare`, the
loop's `LossModule`, its grouping of q/k/v and gate/up layers, the retained heap), on four synthetic alpaca rows
of ~512 tokens. Printed:

- one step (forward and backward of all four rows, gradients dropped, no optimizer) cut into forward passes of
  2,048, 1,024 and 512 tokens, the three alternating in one process (`--repeats` each, medians): the cost of a
  pass beyond its tokens. The loop cuts micro-batches to `train.forward_tokens` (1,024 on a CPU by default);
- the decoder's frozen products alone (each frozen weight's forward and input-gradient matmul, through the whole
  model at 1,024 and 2,048 rows, nothing between them): their GFLOP/s as a share of the peak, the MFU a step made
  of nothing but these products would reach;
- the step's MFU: model FLOPs (6 x trained + 4 x frozen weights per token, as `train_throughput.py` counts them)
  over the step's time and the matmul peak measured here, on the same threads (before and after the steps; the
  higher of the two);
- a torch.profiler view of one 2,048-token step by kind of operator: matmuls (mm, addmm, bmm, linear), softmax
  and log-softmax, element-wise and copies, the rest; and the model's matmul FLOPs at the measured peak as a share
  of the step (the part of the step its model FLOPs would need if every matmul ran at the peak).

Figures are of one process on one machine at one time: compare them only with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from train_throughput import flops_per_token, make_dataset, matmul_peak

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise"}
SOFTMAX = {"aten::_softmax", "aten::_log_softmax", "aten::_softmax_backward_data", "aten::_log_softmax_backward_data"}
ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::neg", "aten::pow",
               "aten::rsqrt", "aten::silu", "aten::silu_backward", "aten::exp", "aten::exp_", "aten::copy_",
               "aten::cat", "aten::fill_", "aten::zero_", "aten::mean", "aten::sum", "aten::mul_", "aten::index_put_",
               "aten::gather", "aten::scatter_add_", "aten::index_add", "aten::index_add_", "aten::masked_fill_",
               "aten::clone", "aten::where", "aten::neg_", "aten::sub_", "aten::div_", "aten::sigmoid"}


def kind(name: str) -> str:
    if name in MATMULS:
        return "matmuls"
    if name in SOFTMAX:
        return "softmax / log-softmax"
    if name in ELEMENTWISE:
        return "element-wise and copies"
    return "the rest (allocation, views, autograd, Python)"


def matmul_ceiling(model: torch.nn.Module, peak: float, repeats: int = 5) -> None:
    """The decoder's frozen products alone, at the pass sizes: each frozen weight's forward (x W^T) and input-
    gradient (g W) product, layer after layer through the whole model as a pass meets them, timed without anything
    between them. Their GFLOP/s bound the MFU any step built on these products can reach."""
    import torch.nn.functional as F

    weights, seen = [], set()
    for module in model.modules():
        group = getattr(module, "_shared_input", None)
        weight = group.weight if group is not None else getattr(getattr(module, "base_layer", None), "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.requires_grad and weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            weights.append(weight)
    print(f"\nthe decoder's {len(weights)} frozen weights' products alone (forward x W^T and input gradient g W, "
          f"one after another through the model), best of {repeats}:")
    for rows in (1024, 2048):
        xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
        gs = {w.shape[0]: torch.randn(rows, w.shape[0], dtype=w.dtype) for w in weights}
        flops = sum(4 * rows * w.shape[0] * w.shape[1] for w in weights)
        best = float("inf")
        for _ in range(repeats + 1):  # the first builds the kernels
            start = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1]], w)
                torch.mm(gs[w.shape[0]], w)
            best = min(best, time.perf_counter() - start)
        print(f"  passes of {rows:5}: {best * 1e3:6.0f} ms a pass, {flops / best / 1e9:5.0f} GFLOP/s = "
              f"{flops / best / 1e9 / peak:.0%} of the peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()

    from tuneforge.config.load import load
    from tuneforge.devices import cpu_bf16_supported, retain_freed_memory
    from tuneforge.finetune.fused import fuse_shared_inputs
    from tuneforge.models.embedded import embedded_model_dir
    from tuneforge.run import prepare
    from tuneforge.train.loop import LossModule

    torch.set_num_threads(os.cpu_count() or 1)
    retain_freed_memory()
    precision = args.precision if args.precision != "auto" else "bf16" if cpu_bf16_supported() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    fpt = flops_per_token(json.loads((embedded_model_dir() / "config.json").read_text()), rank=8)
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; {precision} matmul peak measured "
          f"here {peak:.0f} GFLOP/s; model FLOPs per token {fpt / 1e6:.0f} M")

    with tempfile.TemporaryDirectory(prefix="tuneforge-step-") as tmp:
        work = Path(tmp)
        from tuneforge.config.schema import ModelConfig
        from tuneforge.models.load import load_tokenizer

        make_dataset(work / "data", 120, load_tokenizer(ModelConfig()))
        config = {"model": {"path": "smollm2-135m-instruct"}, "finetune": {"method": "lora", "lora": {"rank": 8}},
                  "data": {"dataset": ["bench"], "dataset_dir": str(work / "data"), "template": "auto",
                           "cutoff_len": 512, "cache_dir": str(work / "cache")},
                  "train": {"batch_size": 4, "max_steps": 1, "precision": precision},
                  "output": {"dir": str(work / "out"), "plot_loss": False}}
        (work / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        job = prepare(load(work / "c.yaml"))
        if job.warmer is not None:
            job.warmer.finish()
        acc, stage, model = job.context.accelerator, job.stage, job.model
        module = acc.prepare(LossModule(model, stage))
        fuse_shared_inputs(model)  # as the loop does in a single CPU process
        module.train()
        params = [p for p in model.parameters() if p.requires_grad]
        rows = sorted(job.train_rows, key=stage.row_length)[-4:]
        tokens = sum(stage.row_length(r) for r in rows)
        print(f"rows: {[stage.row_length(r) for r in rows]} tokens ({tokens} in all)")

        def run_step(parts: list[list[dict]]) -> float:
            start = time.perf_counter()
            for part in parts:
                batch = {k: v.to(acc.device) for k, v in stage.collate(part).items()}
                with acc.autocast():
                    loss, units, _ = module(batch)
                    acc.backward(loss / max(float(units), 1.0))
            for p in params:
                p.grad = None
            return time.perf_counter() - start

        splits = {"1 pass of 2,048": [rows], "2 passes of 1,024": [rows[:2], rows[2:]],
                  "4 passes of 512": [[r] for r in rows]}
        for parts in splits.values():  # warm-up: kernels built, heap grown
            run_step(parts)
            run_step(parts)
        times: dict[str, list[float]] = {name: [] for name in splits}
        for _ in range(args.repeats):
            for name, parts in splits.items():
                times[name].append(run_step(parts))
        again = matmul_peak(dtype)
        print(f"\nthe {precision} matmul peak measured again after the steps: {again:.0f} GFLOP/s; the higher of the "
              f"two ({max(peak, again):.0f}) is used below")
        peak = max(peak, again)
        matmul_ceiling(model, peak)
        print(f"\none step, forward and backward, alternating, medians of {args.repeats}:")
        first = statistics.median(times["1 pass of 2,048"])
        for name, values in times.items():
            med = statistics.median(values)
            print(f"  {name:18} {med * 1e3:7.0f} ms  {tokens / med:5.0f} tok/s  MFU {fpt * tokens / med / peak / 1e9:5.1%}"
                  f"  ({med / first:.2f}x the single pass)")
        if args.no_profile:
            return
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run_step(splits["1 pass of 2,048"])
        by_kind: dict[str, float] = {}
        for event in prof.key_averages():
            by_kind[kind(event.key)] = by_kind.get(kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
        total = sum(by_kind.values())
        print(f"\ntorch.profiler, one step of 1 pass of 2,048 ({profiled * 1e3:.0f} ms with the profiler on; "
              f"operators' self time {total * 1e3:.0f} ms):")
        for name, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {name:48} {seconds * 1e3:7.0f} ms  {seconds / total:6.1%}")
        at_peak = fpt * tokens / (peak * 1e9)
        print(f"the step's model FLOPs at the measured peak would take {at_peak * 1e3:.0f} ms: "
              f"{at_peak / first:.1%} of the unprofiled step (its MFU), against {by_kind.get('matmuls', 0) / total:.0%} "
              "of the profiled time spent in matmuls")


if __name__ == "__main__":
    sys.exit(main())
