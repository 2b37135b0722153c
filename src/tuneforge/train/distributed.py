"""Distributed back-ends beside DDP, with tuneforge's own loop: DeepSpeed ZeRO 0-3 through accelerate, and FSDP2
(torch's fully_shard) applied by tuneforge itself.

accelerate wraps the model in a DeepSpeedEngine; the loop keeps owning batching, accumulation and the loss
normalisation. What that takes (see ../shared/DISTRIBUTED.md for the measurements behind it):

- the config's "auto" values are filled from ours before accelerate sees it: the micro-batch (accelerate cannot
  infer it without a DataLoader), gradient_accumulation_steps 1 (the loop marks the boundary of each optimizer step
  itself, so DeepSpeed neither rescales the loss nor steps per micro-batch), gradient_clipping from
  train.max_grad_norm, bf16/fp16 from the precision;
- on a CPU host accelerate must be told the gloo backend and cpu=False, or every process silently trains alone;
- saving and resuming are collective: every rank writes and reads its own ZeRO partition (DeepSpeed's checkpoint
  files), and ZeRO-3's partitioned weights are gathered on every rank while rank 0 writes the user-facing files.

FSDP2 is applied here rather than by accelerate: accelerate runs FSDP only on GPUs and, asked for it on a CPU host,
silently trains plain DDP. tuneforge shards one unit per decoder layer plus the root (the loop's loss module, so
every forward, also the fused-head loss that calls the decoder directly, gathers what it needs), keeps autocast for
mixed precision (the same math as DDP), reduces gradients in fp32, and checkpoints collectively: sharded model and
optimizer state through torch.distributed.checkpoint, the user-facing weights gathered into a full state dict that
rank 0 writes (a sharded module's own state_dict() holds shards, whatever it is doing).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
ENGINE_TAG = "deepspeed"  # the DeepSpeed checkpoint's folder inside checkpoints/step-N
FSDP_TAG = "fsdp"  # the sharded (torch.distributed.checkpoint) model and optimizer state inside checkpoints/step-N


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The JSON file, checked: it parses, is a mapping, and names a ZeRO stage that exists."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.deepspeed (deepspeed): {path} not found; give a DeepSpeed JSON config such as "
                          "LLaMA-Factory's examples/deepspeed/ds_z3_config.json (paths are relative to the working "
                          "folder)")
    try:
        config = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed (deepspeed): {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"train.deepspeed (deepspeed): {path} is not UTF-8 text ({err.reason})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"train.deepspeed (deepspeed): {path} must hold a JSON object, got "
                          f"{type(config).__name__}")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"train.deepspeed: {path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        raise ConfigError(f"train.deepspeed: {path}: zero_optimization.stage {stage!r} does not exist; DeepSpeed "
                          "has ZeRO stages 0, 1, 2 and 3")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_config(config: dict[str, Any], batch_size: int, max_grad_norm: float, precision: str,
                          source: str) -> dict[str, Any]:
    """A copy with the values tuneforge owns set: micro-batch = train.batch_size, accumulation 1 (the loop marks
    each step's boundary), train_batch_size from those, clipping = train.max_grad_norm, bf16/fp16 = precision.
    A value the file sets explicitly and that contradicts ours is an error, not silently replaced."""
    filled = json.loads(json.dumps(config))

    def own(key: str, value: Any, ours: str) -> None:
        given = filled.get(key, "auto")
        if given not in ("auto", value):
            raise ConfigError(f"train.deepspeed: {source} sets {key} {given!r}, but tuneforge owns it ({ours} gives "
                              f"{value!r}); set it to \"auto\" or remove it")
        filled[key] = value

    own("train_micro_batch_size_per_gpu", batch_size, "train.batch_size")
    given_accumulation = filled.get("gradient_accumulation_steps", "auto")
    if given_accumulation not in ("auto", 1):
        raise ConfigError(f"train.deepspeed: {source} sets gradient_accumulation_steps {given_accumulation!r}; set "
                          "train.gradient_accumulation_steps instead and leave the file's value \"auto\"")
    filled["gradient_accumulation_steps"] = 1
    filled["train_batch_size"] = "auto"  # accelerate: micro-batch x 1 x world size
    own("gradient_clipping", float(max_grad_norm), "train.max_grad_norm")
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = filled.get(key)
        if isinstance(section, dict):
            enabled = section.get("enabled", "auto")
            if enabled not in ("auto", on):
                raise ConfigError(f"train.deepspeed: {source} sets {key}.enabled {enabled!r}, but train.precision is "
                                  f"{precision}; set it to \"auto\" or change train.precision")
            section["enabled"] = on
        elif on:
            filled[key] = {"enabled": True}
    filled.setdefault("zero_allow_untested_optimizer", True)  # tuneforge's optimizers (LoRA+, GaLore, ...)
    return filled


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: give a plain `tuneforge train` launch the
    environment torchrun would (one process on this host)."""
    if "WORLD_SIZE" in os.environ:
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)


def make_deepspeed_accelerator(path: str, batch_size: int, max_grad_norm: float, precision: str, cuda: bool,
                               timeout: Any) -> Any:
    """An Accelerator running DeepSpeed with the filled config (gloo and cpu=False on a CPU host)."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    from tuneforge.deps import require

    require("deepspeed", "deepspeed")
    config = fill_deepspeed_config(read_deepspeed_config(path), batch_size, max_grad_norm, precision, path)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    set_single_process_env()
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    handler = InitProcessGroupKwargs(backend=None if cuda else "gloo", timeout=timeout)
    return Accelerator(cpu=False, mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
                       deepspeed_plugin=plugin, kwargs_handlers=[handler])


def launcher_backend(deepspeed: str | None) -> str | None:
    """The DeepSpeed config to use, also when `accelerate launch --config_file` asked for DeepSpeed (its JSON file)."""
    env = os.environ
    if deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return deepspeed
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not file or file == "none":
        raise ConfigError("the accelerate config asks for DeepSpeed without a deepspeed_config_file; set "
                          "train.deepspeed (deepspeed) to a DeepSpeed JSON such as ds_z3_config.json")
    return file


def check_world_size(acc: Any) -> None:
    """The process group must have the size the launcher promised (else processes would train alone)."""
    promised = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != promised:
        raise ConfigError(f"the launcher started {promised} processes (WORLD_SIZE) but this one joined a group of "
                          f"{acc.num_processes}: each process would train on its own. Launch with torchrun or "
                          "`accelerate launch --multi_gpu` (on a CPU-only host do not pass accelerate's --cpu with "
                          "--multi_gpu), and check the accelerate config's use_cpu / distributed_type")


def deepspeed_engine(acc: Any, module: nn.Module) -> Any:
    """The DeepSpeedEngine the prepared module is, or None when DeepSpeed is not in use."""
    from accelerate.utils import DistributedType

    return module if acc.distributed_type == DistributedType.DEEPSPEED else None


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """ZeRO-3's partitioned parameters gathered whole on every rank for the block (collective: every rank enters
    with the same list); a no-op for parameters DeepSpeed does not partition."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command `tuneforge train` re-launches itself with (LLaMA-Factory's launcher rule), or None.

    It re-launches when not already under a launcher (no WORLD_SIZE / LOCAL_RANK) and either FORCE_TORCHRUN is set
    or several GPUs are visible, honouring LLaMA-Factory's NNODES, NODE_RANK, NPROC_PER_NODE (default: the GPU count,
    1 without GPUs), MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free port; set it when there are several nodes)."""
    import torch

    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return None
    force = os.environ.get("FORCE_TORCHRUN", "").strip().lower() in ("1", "true", "yes", "y")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not force and gpus <= 1:
        return None
    env = os.environ
    nnodes = env.get("NNODES", "1")
    if int(nnodes) > 1 and not env.get("MASTER_PORT"):
        raise ConfigError("NNODES > 1: set MASTER_ADDR and MASTER_PORT to the same values on every node")
    port = env.get("MASTER_PORT") or str(free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node_rank", env.get("NODE_RANK", "0"),
            "--nproc_per_node", env.get("NPROC_PER_NODE", str(max(gpus, 1))), "--master_addr",
            env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", port, "-m", "tuneforge", "train", *argv]


# ----------------------------------------------------------------------------------------------------------- FSDP2

SHARDING_STRATEGIES = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}  # -> reshard_after_forward


def fsdp_from_launcher(fsdp: Any) -> Any:
    """train.fsdp, turned on with the launcher's settings when `accelerate launch --config_file` asked for FSDP
    (LLaMA-Factory's fsdp_config.yaml and fsdp2_config.yaml: FSDP1 configs run as FSDP2 with the same sharding)."""
    import dataclasses

    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return fsdp
    source = "the accelerate config (accelerate launch --config_file)"
    if env.get("FSDP_VERSION", "1") == "2":
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    else:
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f"{source}: fsdp_sharding_strategy {strategy} is not supported; use FULL_SHARD or "
                              "SHARD_GRAD_OP (NO_SHARD is plain DDP: use distributed_type MULTI_GPU)")
        reshard = SHARDING_STRATEGIES[strategy]
    wrap = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if wrap != "TRANSFORMER_BASED_WRAP":
        raise ConfigError(f"{source}: fsdp_auto_wrap_policy {wrap} is not supported; tuneforge shards per decoder "
                          "layer: use TRANSFORMER_BASED_WRAP")
    if env.get("FSDP_IGNORED_MODULES"):
        raise ConfigError(f"{source}: fsdp_ignored_modules is not supported; remove it")
    classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    return dataclasses.replace(fsdp, enabled=True, reshard_after_forward=reshard,
                               offload_params=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
                               layer_classes=classes or fsdp.layer_classes)


def check_fsdp(cfg: Any, cuda: bool) -> None:
    """FSDP where tuneforge's FSDP2 path cannot run it: one message naming the setting to change."""
    train, why = cfg.train, None
    if train.deepspeed:
        why = "train.deepspeed is set as well; use one of DeepSpeed and FSDP"
    elif cfg.model.quantization_bit:
        why = ("FSDP does not shard quantized (QLoRA) weights here; remove model.quantization_bit, or use DDP or "
               "DeepSpeed ZeRO-2")
    elif cfg.stage in ("ppo", "grpo"):
        why = f"the {cfg.stage} stage generates with the policy, which FSDP does not run yet; use DDP or DeepSpeed"
    elif train.precision == "fp16":
        why = "fp16 needs loss scaling, which the FSDP path does not do; use train.precision=bf16 (bf16: true)"
    elif train.optimizer not in ("adamw", "adam", "sgd", "rmsprop", "adagrad"):
        why = f"train.optimizer {train.optimizer} does not run on sharded weights; use adamw, adam, sgd, rmsprop or adagrad"
    elif any(getattr(train, k).enabled for k in ("galore", "apollo", "badam")):
        why = "GaLore, APOLLO and BAdam do not run on sharded weights; remove them or use DDP"
    elif train.fsdp.offload_params and not cuda:
        why = ("train.fsdp.offload_params keeps a GPU run's shards in CPU memory; without a GPU everything is in CPU "
               "memory already: set it to false")
    if why is None:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            why = "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard); install torch >= 2.6"
    if why:
        raise ConfigError(f"FSDP (train.fsdp / fsdp / accelerate's FSDP config) cannot run: {why}")


def init_single_process_group(cuda: bool) -> None:
    """FSDP shards over a process group even for one process: make one when no launcher did."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        set_single_process_env()
        dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))


@contextlib.contextmanager
def without_env(*keys: str) -> Iterator[None]:
    """The block runs with these environment variables unset (restored after)."""
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def shard(root: nn.Module, model: nn.Module, fsdp: Any) -> nn.Module:
    """fully_shard each decoder layer of `model`, then `root` (the module whose forward the loop calls), in place."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from tuneforge.stages.base import unwrap_causal_lm

    names = set(fsdp.layer_classes or getattr(unwrap_causal_lm(model), "_no_split_modules", None) or [])
    # deepest first: an inner unit must be sharded before the unit around it
    layers = [m for m in reversed(list(model.modules())) if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"FSDP: no module of class {', '.join(sorted(names)) or '(none declared)'} in this model; "
                          "set train.fsdp.layer_classes (fsdp_transformer_layer_cls_to_wrap) to its decoder layer class")
    policy = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32),
              "offload_policy": CPUOffloadPolicy() if fsdp.offload_params else OffloadPolicy()}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=fsdp.reshard_after_forward, **policy)
    fully_shard(root, **policy)
    return root


def is_sharded(module: nn.Module | None) -> bool:
    """True for a module fully_shard has sharded (its forward gathers weights: a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state(root: nn.Module | None, trainable_only: bool) -> dict[str, Any] | None:
    """The sharded model's weights gathered whole into CPU memory on rank 0 (collective: every rank calls it;
    the others get an empty dict), named as the model inside the root names them; None when not sharded."""
    if root is None:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=trainable_only))
    # a tied weight (embeddings and output head) once, under its first name, as the model's own state_dict has it
    first: dict[int, str] = {}
    tied = set()
    for name, param in root.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            tied.add(name)
    return {name.removeprefix("model."): tensor for name, tensor in state.items() if name not in tied}


def save_sharded(root: nn.Module, optimizer: Any, folder: Path) -> None:
    """Each rank writes its shard of the trained weights and of the optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(root: nn.Module, optimizer: Any, folder: Path) -> None:
    """Read what save_sharded wrote into the sharded model (and optimizer, unless None); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    # frozen weights are not in the checkpoint (they never change): loading leaves them as they are
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        state = {"model": get_model_state_dict(root, options=options)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(root, state["model"], options=options)
        return
    model_state, optim_state = get_state_dict(root, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
