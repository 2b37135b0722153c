"""Distributed back-ends beside DDP: DeepSpeed ZeRO 0-3 through accelerate, with tuneforge's own loop.

accelerate wraps the model in a DeepSpeedEngine; the loop keeps owning batching, accumulation and the loss
normalisation. What that takes (see ../shared/DISTRIBUTED.md for the measurements behind it):

- the config's "auto" values are filled from ours before accelerate sees it: the micro-batch (accelerate cannot
  infer it without a DataLoader), gradient_accumulation_steps 1 (the loop marks the boundary of each optimizer step
  itself, so DeepSpeed neither rescales the loss nor steps per micro-batch), gradient_clipping from
  train.max_grad_norm, bf16/fp16 from the precision;
- on a CPU host accelerate must be told the gloo backend and cpu=False, or every process silently trains alone;
- saving and resuming are collective: every rank writes and reads its own ZeRO partition (DeepSpeed's checkpoint
  files), and ZeRO-3's partitioned weights are gathered on every rank while rank 0 writes the user-facing files.
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


def set_single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: give a plain `tuneforge train` launch the
    environment torchrun would (one process on this host)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
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
    """The DeepSpeed config to use, also when `accelerate launch --config_file` asked for DeepSpeed (its JSON file);
    an accelerate config asking for FSDP is refused rather than silently trained as DDP."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("the accelerate config asks for FSDP (distributed_type: FSDP), which tuneforge does not run "
                          "yet: without it accelerate would train plain DDP. Use DeepSpeed (train.deepspeed / "
                          "deepspeed: ds_z3_config.json) or a config with distributed_type MULTI_GPU")
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
    port = env.get("MASTER_PORT")
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node_rank", env.get("NODE_RANK", "0"),
            "--nproc_per_node", env.get("NPROC_PER_NODE", str(max(gpus, 1))), "--master_addr",
            env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", port, "-m", "tuneforge", "train", *argv]
