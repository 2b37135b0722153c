"""The map: train(cfg) reads like a table of contents; the work is in the callees."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig, dump
from tuneforge.config.schema import OutputConfig, TrainConfig
from tuneforge.config.typed import to_dict
from tuneforge.data.build import EncodedData, build_datasets, cache_folder, packing_enabled
from tuneforge.devices import HeapWarmer, available_memory, heap_retained, retain_freed_memory
from tuneforge.errors import ConfigError
from tuneforge.finetune import apply_method
from tuneforge.finetune.methods import ADAPTER_METHODS, save_adapter
from tuneforge.finetune.neftune import add_neftune
from tuneforge.io import plain_modes, write_text_atomic
from tuneforge.models import attention
from tuneforge.models.attention import use_cpu_attention
from tuneforge.models.load import fit_vocab, load_model, load_tokenizer, train_embeddings
from tuneforge.models.segments import use_segments
from tuneforge.models.valuehead import WithValueHead, save_value_head
from tuneforge.paths import RUN_INFO
from tuneforge.stages import Stage, build_stage
from tuneforge.stages.base import unwrap_causal_lm
from tuneforge.templates import get_template
from tuneforge.templates.base import Template
from tuneforge.templates.jinja import training_template_on
from tuneforge.train.batches import BatchPlan, pack_rows
from tuneforge.train.checkpoint import list_checkpoints
from tuneforge.train.distributed import full_state, gathered, read_deepspeed_config, zero_stage
from tuneforge.train.loop import FitResult, RunContext, fit
from tuneforge.train.manifest import update_manifest, write_manifest
from tuneforge.train.optim import describe_optimizer
from tuneforge.train.plan import Plan, make_plan, pass_bytes, plan_dict, print_plan
from tuneforge.train.plan import forward_tokens as pass_tokens
from tuneforge.train.plot import plot_loss
from tuneforge.train.tracking import read_metrics

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A training run prepared from its config: model, stage, rows and context, ready for `fit`."""

    cfg: RunConfig
    run_dir: Path
    tokenizer: Any
    template: Template
    stage: Stage
    data: EncodedData
    train_rows: list[dict]
    val_rows: list[dict]
    model: Any
    plan: Plan
    context: RunContext
    warmer: HeapWarmer | None = None  # pages the loop's first passes will use, written while the model loads


def train(cfg: RunConfig, plan_only: bool = False) -> Path:
    """Train a model as configured; returns the run folder (or prints the plan and returns it)."""
    if not cfg.train.enabled:  # LLaMA-Factory's do_eval / do_predict without do_train
        return evaluate_only(cfg, plan_only)
    retain_freed_memory()  # each step frees and reallocates the same activations: reuse, do not page-fault
    job = prepare(cfg, plan_only)
    main = job.context.accelerator.is_main_process
    if plan_only:
        job.plan.estimated_seconds = measure_time(job)
        print_plan(job.plan) if main else None
        return job.run_dir
    if main:
        print_plan(job.plan)
        write_run_files(job)
    result = fit_job(job)
    finish(job, result)
    return job.run_dir


def prepare(cfg: RunConfig, plan_only: bool = False) -> Job:
    """Config -> accelerator, run folder, tokenizer, template, stage, encoded rows, model (+ reference), plan."""
    cfg = with_launcher(cfg)
    acc, precision = make_accelerator(cfg.train)
    run_dir = prepare_run_dir(cfg.output, cfg.train, plan_only, acc.is_main_process)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer, cfg.data.default_system, cfg.data.enable_thinking,
                            cfg.data.tool_format)
    stage = build_stage(cfg, tokenizer.pad_token_id)
    # Tokenized once: the main process first, then each other node's first process (which finds the cache when
    # the nodes share a filesystem), then everyone else, who read a cache. Two barriers each, for every process.
    with acc.main_process_first(), acc.local_main_process_first():
        data = build_datasets(cfg.data, stage.data_kind, template, cfg.train.seed)
    train_rows, val_rows = training_rows(data, cfg, stage)
    stage.check_rows(train_rows)
    warmer = None if plan_only else warm_heap(cfg, acc, tokenizer, stage, train_rows, precision)
    model = stage.setup(load_for_training(cfg, precision, tokenizer), acc)
    if cfg.reference.precompute:
        with acc.main_process_first(), acc.autocast():
            stage.precompute_reference([train_rows, val_rows], model, cfg.train.eval_batch_size,
                                       reference_cache(cfg, data, precision))
    batches = BatchPlan(len(train_rows), cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                        acc.num_processes, cfg.train.epochs, cfg.train.max_steps, cfg.train.shuffle,
                        cfg.train.data_seed)
    plan = make_plan(train_rows, data.report, batches, model, precision, stage,
                     zero_stage(read_deepspeed_config(cfg.train.deepspeed)) if cfg.train.deepspeed else None,
                     cfg.train.fsdp.enabled)
    context = RunContext(run_dir, acc, batches, save_weights_fn(model, tokenizer, template, cfg),
                         group_by_length=cfg.train.group_by_length, forward_tokens=forward_tokens(cfg.train),
                         tracker_config=to_dict(cfg),
                         logging_dir=Path(cfg.output.logging_dir) if cfg.output.logging_dir else None,
                         lora=cfg.finetune.lora if cfg.finetune.method == "lora" else None,
                         fsdp=cfg.train.fsdp if cfg.train.fsdp.enabled else None,
                         depends={"data": data.key, "batch_size": cfg.train.batch_size,
                                  "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                                  "processes": acc.num_processes, "stage": cfg.stage,
                                  "method": cfg.finetune.method},
                         resume_anyway=cfg.train.resume_anyway)
    plan.optimizer = describe_optimizer(cfg.train, context.lora)
    return Job(cfg, run_dir, tokenizer, template, stage, data, train_rows, val_rows, model, plan, context, warmer)


def fit_job(job: Job) -> FitResult:
    """Run the training loop on a prepared job."""
    if job.warmer is not None:
        job.warmer.finish()  # its block freed: the loop's first allocations take those pages
        job.warmer = None
    return fit(job.model, job.stage, job.train_rows, job.val_rows, job.cfg.train, job.context)


def finish(job: Job, result: FitResult) -> None:
    """Final weights, configured evaluations and the loss plot; re-raise an interruption for the CLI."""
    acc, cfg, run_dir = job.context.accelerator, job.cfg, job.run_dir
    if acc.is_main_process:
        update_manifest(run_dir / "manifest.json", {"training": result.outcome()})
    if not result.interrupted:
        # ZeRO-3 partitions every weight: gather what the final folder holds (trained weights of an adapter
        # method, the whole model otherwise) on every rank while rank 0 writes it
        adapter = cfg.finetune.method in ADAPTER_METHODS
        # FSDP: the whole state dict, gathered into rank 0's CPU memory
        weights = full_state(job.context.sharded, trainable_only=adapter)
        with gathered([p for p in job.model.parameters() if p.requires_grad or not adapter]):
            final = save_final(run_dir, job.model, job.tokenizer, job.template, cfg, weights) \
                if acc.is_main_process else None
        if acc.is_main_process and cfg.eval.after_training:
            evaluate_final(cfg, run_dir, final)
    if acc.is_main_process and cfg.output.plot_loss:
        plot_loss(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots" / "loss.png")
    acc.wait_for_everyone()
    if result.interrupted:
        raise KeyboardInterrupt


def reference_cache(cfg: RunConfig, data: EncodedData, precision: str) -> Path:
    """Where precomputed reference log-probs live: beside the tokenized data, keyed by the reference's weights."""
    from tuneforge.models.digest import folder_digest
    from tuneforge.models.hub import resolve_model_dir

    ref = cfg.reference
    base = dataclasses.replace(cfg.model, path=ref.model) if ref.model else cfg.model
    adapters = ref.adapters if ref.model else cfg.model.adapter_path
    parts = [folder_digest(resolve_model_dir(base)), *(folder_digest(Path(a)) for a in adapters),
             str(ref.quantization_bit if ref.model else cfg.model.quantization_bit), precision,
             cfg.finetune.method, str(cfg.finetune.lora.create_new_adapter)]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cache_folder(cfg.data) / data.key / f"reference-{key}.safetensors"


def evaluate_final(cfg: RunConfig, run_dir: Path, final: Path) -> None:
    """The configured evaluations (e.g. predictions.jsonl) on the weights just saved, into <run>/eval."""
    from tuneforge.evaluate.run import evaluate

    model = dataclasses.replace(cfg.model, adapter_path=[str(final)]) if final.name == "adapter" else \
        dataclasses.replace(cfg.model, path=str(final), adapter_path=[])
    evaluate(dataclasses.replace(cfg, model=model, eval=dataclasses.replace(cfg.eval, dir=str(run_dir / "eval"))),
             trained=True)


def evaluate_only(cfg: RunConfig, plan_only: bool) -> Path:
    """train.enabled false: the configured evaluations of the model as given, into <output.dir>/eval."""
    from tuneforge.evaluate.run import evaluate

    if plan_only:
        raise ConfigError("--plan plans training, but train.enabled is false (do_train: false); remove --plan")
    if not (cfg.eval.after_training and cfg.eval.modes):
        raise ConfigError("train.enabled is false (do_train: false) and no evaluation is asked for: add "
                          "do_eval / do_predict (eval.after_training with eval.modes), or train")
    run_dir = Path(cfg.output.dir)
    if cfg.output.overwrite:  # otherwise an earlier prediction file is continued, as after a crash
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
    evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, dir=str(run_dir / "eval"))))
    return run_dir


def with_launcher(cfg: RunConfig) -> RunConfig:
    """The config with what the launcher asked for (`accelerate launch --config_file` with a DeepSpeed or FSDP
    config) merged in; FSDP checked where it is to run."""
    from tuneforge.train.distributed import check_fsdp, fsdp_from_launcher, launcher_backend

    train_cfg = dataclasses.replace(cfg.train, deepspeed=launcher_backend(cfg.train.deepspeed),
                                    fsdp=fsdp_from_launcher(cfg.train.fsdp))
    if train_cfg.fsdp.enabled:
        check_fsdp(dataclasses.replace(cfg, train=train_cfg), uses_cuda(train_cfg))
    return dataclasses.replace(cfg, train=train_cfg)


def uses_cuda(train_cfg: TrainConfig) -> bool:
    return torch.cuda.is_available() and train_cfg.device != "cpu"


def make_accelerator(train_cfg: TrainConfig) -> tuple[Any, str]:
    """An Accelerator with the resolved precision ('auto' -> bf16 where the device supports it): DDP, DeepSpeed with
    train.deepspeed, or the plain process group FSDP shards over; it must be as large as the launcher promised."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    from tuneforge.devices import cpu_bf16_supported
    from tuneforge.train.distributed import check_world_size, init_single_process_group, without_env

    cuda = uses_cuda(train_cfg)
    precision = train_cfg.precision
    if precision == "auto":
        supported = torch.cuda.is_bf16_supported() if cuda else cpu_bf16_supported()
        precision = "bf16" if supported else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a GPU; on CPU use bf16 (or fp32)")
    if precision == "bf16" and not cuda and not cpu_bf16_supported():
        log.warning("train.precision=bf16 (LLaMA-Factory: bf16: true) on a CPU without native bf16 (AVX512-BF16 or "
                    "AMX): its bf16 matmuls are emulated, about a hundred times slower than fp32. Set "
                    "train.precision=auto or fp32 (LLaMA-Factory: remove bf16) unless bf16 is what you mean to test")
    from datetime import timedelta

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps process-wide state; a second run in the same process (tests, the web UI) may use
        # another precision, which accelerate refuses unless that state is cleared first.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    timeout = timedelta(seconds=train_cfg.ddp_timeout)
    if train_cfg.deepspeed:
        from tuneforge.train.distributed import make_deepspeed_accelerator

        acc = make_deepspeed_accelerator(train_cfg.deepspeed, train_cfg.batch_size, train_cfg.max_grad_norm,
                                         precision, cuda, timeout)
    else:
        # Under FSDP accelerate only forms the process group (the loop shards the model itself); told about FSDP
        # by `accelerate launch`, it would switch to its own FSDP, which it cannot run on a CPU host.
        with without_env("ACCELERATE_USE_FSDP") if train_cfg.fsdp.enabled else contextlib.nullcontext():
            acc = Accelerator(cpu=not cuda, mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
        if train_cfg.fsdp.enabled:
            init_single_process_group(cuda)
    check_world_size(acc)
    set_seed(train_cfg.seed)
    return acc, precision


# Padded tokens per forward pass on a CPU. A batch of 4 x 512 tokens (SmolLM2-135M, LoRA, bf16) took 7.3 s as four
# passes of 512, 6.5 s as two of 1,024 and 6.3 s as one of 2,048 (best of 5, 2-core Xeon with AMX): 1,024 gets
# most of the gain at half the activation memory of 2,048.
CPU_FORWARD_TOKENS = 1024


def forward_tokens(train_cfg: TrainConfig) -> int:
    """Forward-pass token budget: CPU_FORWARD_TOKENS on CPU, none on GPU, and none
    where the weights are sharded (FSDP, ZeRO-3): every forward there gathers weights with the other processes, so
    all must make the same number of passes, which cutting each one's micro-batches by its own tokens would break."""
    sharded = train_cfg.fsdp.enabled or bool(train_cfg.deepspeed) and \
        zero_stage(read_deepspeed_config(train_cfg.deepspeed)) == 3
    if sharded:
        if train_cfg.forward_tokens:
            raise ConfigError("train.forward_tokens cuts each process's micro-batches by its own tokens, which would "
                              "put processes with sharded weights (FSDP, DeepSpeed ZeRO-3) out of step; remove it "
                              "(or set batch_size smaller)")
        return 0
    if train_cfg.forward_tokens is not None:
        return train_cfg.forward_tokens
    if any(m.enabled and m.layerwise for m in (train_cfg.galore, train_cfg.apollo)):
        return 0  # layerwise GaLore/APOLLO apply each weight's gradient in its backward: one backward per step
    return 0 if torch.cuda.is_available() and train_cfg.device != "cpu" else CPU_FORWARD_TOKENS


def prepare_run_dir(output: OutputConfig, train_cfg: TrainConfig, plan_only: bool, main: bool) -> Path:
    """The run folder; refuses to mix a new run into a finished or started one unless asked."""
    run_dir = Path(output.dir)
    if plan_only or not main:
        return run_dir
    finished = (run_dir / "adapter").exists() or (run_dir / "model").exists()
    started = bool(list_checkpoints(run_dir))
    resuming = train_cfg.resume_from_checkpoint is not None
    if output.overwrite and not resuming:
        for name in ("adapter", "model", "checkpoints", "plots", "tensorboard", "metrics.jsonl", "manifest.json",
                     "eval"):
            target = run_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    elif (finished or started) and not resuming:
        raise ConfigError(f"output.dir {run_dir} already holds a {'finished' if finished else 'started'} run; "
                          "set train.resume_from_checkpoint=auto to continue it, output.overwrite=true to replace "
                          "it, or choose another output.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def training_rows(data: EncodedData, cfg: RunConfig, stage: Stage) -> tuple[list[dict], list[dict]]:
    """Plain row dicts of the stage's columns; SFT rows are packed here when asked (pt rows when encoded)."""
    columns = list(stage.columns)
    train = [dict(zip(columns, values)) for values in zip(*(data.train[c] for c in columns))]
    val = [dict(zip(columns, values)) for values in zip(*(data.val[c] for c in columns))] if data.val else []
    if stage.data_kind == "sft" and packing_enabled(cfg.data, stage.data_kind):
        seed = cfg.train.data_seed if cfg.train.data_seed is not None else cfg.train.seed
        train = pack_rows(train, cfg.data.cutoff_len, seed, cfg.data.neat_packing, cfg.train.shuffle)
    return train, val


def load_for_training(cfg: RunConfig, precision: str, tokenizer: Any = None) -> Any:
    """Base model (RoPE scaled, embeddings grown to the tokenizer) plus method; under bf16 LoRA the frozen base
    is stored in bf16 (adapters stay fp32)."""
    dtype = torch.bfloat16 if precision == "bf16" and cfg.finetune.method in ADAPTER_METHODS \
        and cfg.model.dtype == "auto" else None
    model = load_model(cfg.model, dtype=dtype, max_length=cfg.data.cutoff_len)
    model.config.use_cache = False
    if cfg.data.neat_packing:  # one causal attention call per packed row instead of a block-diagonal mask
        use_segments(model)
    elif cpu_attention(cfg):
        # probabilities kept for a cheaper CPU backward (model.attn_implementation: sdpa keeps SDPA's kernel)
        use_cpu_attention(model)
    finetune = train_embeddings(cfg.finetune, fit_vocab(model, tokenizer, cfg.model)) if tokenizer is not None \
        else cfg.finetune
    model = apply_method(model, finetune, cfg.model.adapter_path, quantized=bool(cfg.model.quantization_bit),
                         gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.train.neftune_alpha:
        add_neftune(model, cfg.train.neftune_alpha)
    if cfg.train.compile:
        compile_layers(model, cfg.train.compile_backend, cfg.train.compile_mode)
    return model


def cpu_attention(cfg: RunConfig) -> bool:
    """Whether training uses models/attention.py's CPU attention (which keeps probabilities for backward)."""
    return cfg.model.attn_implementation == "auto" and not uses_cuda(cfg.train)


WARM_HEAP_MAX = 3 << 29  # 1.5 GiB: glibc hands a free heap top above M_TRIM_THRESHOLD (2 GiB - 1) back


def warm_heap(cfg: RunConfig, acc: Any, tokenizer: Any, stage: Stage, rows: list[dict],
              precision: str) -> HeapWarmer | None:
    """Start paging in the host memory the first training passes will take (devices.HeapWarmer), sized by the
    plan's estimate of one pass over the largest forward (at most WARM_HEAP_MAX and half the available memory); None
    where it would not help: activations on a GPU, several processes sharing the cores, glibc not keeping freed
    memory, a model folder without a readable config.json, or less than 64 MiB to page in."""
    if acc.device.type != "cpu" or acc.num_processes > 1 or not heap_retained() or not rows:
        return None
    try:
        config = json.loads((Path(tokenizer.name_or_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(config, dict):
        return None
    fields = types.SimpleNamespace(**config.get("text_config", config))
    longest = max(stage.row_length(row) for row in rows)
    tokens = pass_tokens(stage, cfg.train.batch_size, longest)
    budget = forward_tokens(cfg.train)
    if budget:
        tokens = min(tokens, max(budget, longest))
    kept = longest if (cfg.data.neat_packing or cpu_attention(cfg)) and longest <= attention.MAX_TOKENS else 0
    nbytes = min(pass_bytes(fields, tokens, precision, kept), WARM_HEAP_MAX, available_memory() // 2)
    return HeapWarmer(nbytes) if nbytes >= 64 << 20 else None


def compile_layers(model: Any, backend: str, mode: str | None) -> int:
    """torch.compile every decoder layer in place (parameter names, adapters and saving are unchanged); the
    number of layers compiled."""
    layers = getattr(unwrap_causal_lm(model).get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"train.compile: {type(unwrap_causal_lm(model)).__name__} has no list of decoder layers "
                          "to compile; turn train.compile off")
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    return len(layers)


def save_weights_fn(model: Any, tokenizer: Any, template: Template, cfg: RunConfig) -> Any:
    """Writes a checkpoint's user-facing weights (LoRA adapters only; full weights live in trainable.safetensors)."""
    if cfg.finetune.method not in ADAPTER_METHODS:
        return None
    return lambda folder, weights=None: _save_weights(folder, model, tokenizer, template, cfg, weights)


def save_final(run_dir: Path, model: Any, tokenizer: Any, template: Template, cfg: RunConfig,
               weights: dict[str, torch.Tensor] | None = None) -> Path:
    """adapter/ (LoRA) or model/ (full, freeze) with tokenizer, chat template and run info; atomic.
    weights: the model's state dict gathered from FSDP's shards (default: the model's own)."""
    target = run_dir / ("adapter" if cfg.finetune.method in ADAPTER_METHODS else "model")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_weights(tmp, model, tokenizer, template, cfg, weights)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _save_weights(folder: Path, model: Any, tokenizer: Any, template: Template, cfg: RunConfig,
                  weights: dict[str, torch.Tensor] | None = None) -> None:
    lm, head = (model.pretrained_model, model.v_head) if isinstance(model, WithValueHead) else (model, None)
    if hasattr(lm, "peft_config"):  # only the trained adapter, not a frozen reference copy beside it
        save_adapter(lm, folder, weights)
    else:
        lm.save_pretrained(folder, safe_serialization=True, **({"state_dict": weights} if weights else {}))
    if head is not None:
        save_value_head(folder, head)
    with training_template_on(tokenizer, template):
        tokenizer.save_pretrained(folder)
    info = {"base_model": cfg.model.path, "method": cfg.finetune.method, "stage": cfg.stage,
            "template": template.name, "default_system": cfg.data.default_system,
            "enable_thinking": cfg.data.enable_thinking, "stop_words": template.stop_words,
            "tool_format": cfg.data.tool_format}
    write_text_atomic(folder / RUN_INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    plain_modes(folder)  # safetensors and tokenizer files written through temporary files


def write_run_files(job: Job) -> None:
    """config.yaml (reproduces the run) and manifest.json."""
    from tuneforge.data.build import template_digest

    cfg, data, plan = job.cfg, job.data, job.plan
    write_text_atomic(job.run_dir / "config.yaml", dump(cfg))
    data_info = {"cache_key": data.key, "datasets": cfg.data.dataset, "plan": plan_dict(plan),
                 "truncated": data.report.truncated[:100], "dropped": data.report.dropped[:100]}
    write_manifest(job.run_dir / "manifest.json", to_dict(cfg), data_info,
                   {"name": job.template.name, "hash": template_digest(job.template)}, cfg.train.seed,
                   job.context.accelerator.num_processes)


def measure_time(job: Job) -> float:
    """Run two real optimizer steps in a scratch folder and extrapolate to the whole plan."""
    context = job.context
    probe = dataclasses.replace(job.cfg.train, max_steps=2, save_steps=0, logging_steps=1, report_to=[],
                                resume_from_checkpoint=None, eval_steps=None)
    with tempfile.TemporaryDirectory() as scratch:
        probe_context = dataclasses.replace(context, run_dir=Path(scratch),
                                            plan=dataclasses.replace(context.plan, max_steps=2))
        result: FitResult = fit(job.model, job.stage, job.train_rows, [], probe, probe_context)
        records = read_metrics(Path(scratch) / "metrics.jsonl")
    del result
    times = [r["elapsed"] for r in records]
    if "timing/rollout_s" in records[-1]:  # online stages: the second (warm) step's rollout
        job.plan.rollout_seconds = records[-1]["timing/rollout_s"]
        job.plan.generation_seconds = records[-1]["timing/generation_s"]
    first, second = times[0], times[1] - times[0]
    return first + second * (context.plan.total_steps - 1)
