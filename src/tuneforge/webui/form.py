"""The web UI's form <-> config: field values by UI key become the YAML tree `tuneforge train` reads, and back."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config import RunConfig, load, load_tree
from tuneforge.config.load import apply_override
from tuneforge.errors import ConfigError
from tuneforge.webui.workspace import Workspace

METHODS = ("lora", "qlora-4bit", "qlora-8bit", "oft", "freeze", "full")
TOP_KEYS = ["model", "hub", "method", "adapters", "template"]  # the top bar's fields, used by every tab
PACKING = {"auto": None, "true": True, "false": False}  # auto: on for pt, off for sft
# LLaMA Board's DeepSpeed choice: a ZeRO stage (none, 2, 3) and CPU offload pick one of the DeepSpeed configs
# shipped with tuneforge (LLaMA-Factory 0.9.5's examples/deepspeed files, src/tuneforge/train/deepspeed/).
DS_FOLDER = Path(__file__).resolve().parents[1] / "train" / "deepspeed"
DS_STAGES = ("none", "2", "3")


def deepspeed_file(stage: str | None, offload: bool) -> Path | None:
    """The shipped DeepSpeed config for a ZeRO stage choice (None for "none")."""
    if stage in (None, "", "none"):
        return None
    return DS_FOLDER / f"ds_z{stage}{'_offload' if offload else ''}_config.json"


def deepspeed_choice(path: str | None) -> tuple[str, bool] | None:
    """(stage, offload) when `path` is one of the shipped configs, else None."""
    if path:
        for stage in DS_STAGES[1:]:
            for offload in (False, True):
                if Path(path).resolve() == deepspeed_file(stage, offload):
                    return stage, offload
    return None

# UI key -> dotted config path, for fields whose value passes through unchanged (None or "" means default).
SIMPLE: dict[str, str] = {
    "hub": "model.hub",
    "template": "data.template",
    "stage": "stage",
    "learning_rate": "train.learning_rate",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "cutoff_len": "data.cutoff_len",
    "max_samples": "data.max_samples",
    "batch_size": "train.batch_size",
    "grad_accum": "train.gradient_accumulation_steps",
    "scheduler": "train.scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "precision": "train.precision",
    "max_grad_norm": "train.max_grad_norm",
    "val_size": "data.val_size",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "seed": "train.seed",
    "report_to": "train.report_to",
    "overwrite": "output.overwrite",
    "identity_name": "data.identity.name",
    "identity_author": "data.identity.author",
}
LORA = {"lora_rank": "finetune.lora.rank", "lora_dropout": "finetune.lora.dropout",
        "rslora": "finetune.lora.rslora", "dora": "finetune.lora.dora", "pissa": "finetune.lora.pissa_init"}
QUANT = {"quant_type": "model.quantization_type", "double_quant": "model.double_quantization"}
FREEZE = {"freeze_layers": "finetune.freeze.trainable_layers"}
# The preference panel: each field lands in the section of the chosen stage (beta and ftx serve dpo and kto,
# as LLaMA-Factory's pref_beta and pref_ftx do); a value equal to the section's default is left out.
REFERENCE = {"ref_model": "reference.model", "precompute_ref": "reference.precompute"}
PREFERENCE: dict[str, dict[str, str]] = {
    "dpo": {"pref_beta": "dpo.beta", "pref_loss": "dpo.loss", "pref_ftx": "dpo.ftx",
            "label_smoothing": "dpo.label_smoothing", "simpo_gamma": "dpo.simpo_gamma", **REFERENCE},
    "kto": {"pref_beta": "kto.beta", "pref_ftx": "kto.ftx", "kto_chosen_weight": "kto.chosen_weight",
            "kto_rejected_weight": "kto.rejected_weight", **REFERENCE},
}
# What the panel shows when the stage has no such setting (empty beta and gamma: the per-loss defaults).
PREFERENCE_FORM = {"pref_beta": None, "pref_loss": "sigmoid", "pref_ftx": 0.0, "label_smoothing": 0.0,
                   "simpo_gamma": None, "ref_model": "", "precompute_ref": False, "kto_chosen_weight": 1.0,
                   "kto_rejected_weight": 1.0}
PREFERENCE_KEYS = list(PREFERENCE_FORM)
# The GRPO panel (section grpo:); reward functions are a text box, one entry per line ('accuracy',
# 'rewards.py:my_fn', 'module:fn', or a YAML mapping such as {func: length, target: 50}), weights a list of numbers.
GRPO = {"num_generations": "grpo.num_generations", "grpo_loss": "grpo.loss_type", "grpo_beta": "grpo.beta",
        "grpo_epsilon": "grpo.epsilon", "grpo_epsilon_high": "grpo.epsilon_high",
        "scale_rewards": "grpo.scale_rewards", "num_iterations": "grpo.num_iterations",
        "max_completion_length": "grpo.max_completion_length",
        "mask_truncated": "grpo.mask_truncated_completions", "reward_funcs": "grpo.reward_funcs",
        "reward_weights": "grpo.reward_weights"}
GRPO_KEYS = list(GRPO)
# The PPO panel (LLaMA-Factory's keys): the reward model (an rm run, a model folder or a score URL) and ppo_*.
PPO = {"reward_model": "reward_model.path", "reward_model_type": "reward_model.type",
       "ppo_buffer_size": "ppo.buffer_size", "ppo_epochs": "ppo.epochs", "ppo_score_norm": "ppo.score_norm",
       "ppo_target": "ppo.target", "ppo_whiten_rewards": "ppo.whiten_rewards"}
PPO_KEYS = list(PPO)
STAGE_PANELS: dict[str, dict[str, str]] = {**PREFERENCE, "grpo": GRPO, "ppo": PPO}  # each stage's panel fields
STAGE_KEYS = ["stage", *PREFERENCE_KEYS, *GRPO_KEYS, *PPO_KEYS]  # the stage and its settings (Evaluate's too)


@dataclass
class Command:
    """What Start runs: the validated config, its YAML written into the config folder, and the argv (no shell)."""

    config: RunConfig
    yaml_text: str
    config_path: Path
    argv: list[str]

    def shown(self) -> str:
        """The command line and the YAML, as the Preview command button shows them."""
        line = " ".join(["tuneforge", *self.argv[3:]])
        return f"# {line}\n# (written to {self.config_path})\n{self.yaml_text}"


def config_tree(values: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """The nested config mapping for the form's values (extra `key=value` lines last); every path in it is
    checked against the working folders and made absolute."""
    tree: dict[str, Any] = {}
    method = values.get("method") or "lora"
    _put(tree, "model.path", values.get("model") or "smollm2-135m-instruct")
    _put(tree, "finetune.method", "lora" if method.startswith("qlora") else method)
    chosen = dict(SIMPLE)
    if method.startswith("qlora"):
        _put(tree, "model.quantization_bit", int(method[len("qlora-")]))
        chosen.update(QUANT)
    if method in ("lora", "qlora-4bit", "qlora-8bit"):
        chosen.update(LORA)
        _put(tree, "finetune.lora.alpha", values.get("lora_alpha") or None)
        _put(tree, "finetune.lora.targets", _names(values.get("lora_targets")))
    if method == "freeze":
        chosen.update(FREEZE)
        _put(tree, "finetune.freeze.trainable_modules", _names(values.get("freeze_modules")))
    for key, dotted in chosen.items():
        _put(tree, dotted, values.get(key))
    put_preference(tree, values)
    _put(tree, "data.packing", PACKING.get(values.get("packing") or "auto"))
    _put(tree, "model.adapter_path", list(values.get("adapters") or []) or None)
    _put(tree, "data.dataset_dir", values.get("dataset_dir"))
    _put(tree, "data.dataset", list(values.get("dataset") or []) or None)
    _put(tree, "output.dir", values.get("output_dir"))
    ds = deepspeed_file(values.get("ds_stage"), bool(values.get("ds_offload")))
    _put(tree, "train.deepspeed", str(ds) if ds else None)
    if values.get("resume"):
        _put(tree, "train.resume_from_checkpoint", "auto")
    for line in (values.get("extra_args") or "").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            apply_override(tree, line.strip())
    confine(tree, ws)
    return tree


def put_preference(tree: dict[str, Any], values: dict[str, Any]) -> None:
    """The stage panel's values (preference or grpo) that differ from their defaults, into the chosen stage's
    sections."""
    defaults = _defaults()
    for key, dotted in STAGE_PANELS.get(values.get("stage") or "sft", {}).items():
        value = values.get(key)
        if key in TEXT_FIELDS:
            value = TEXT_FIELDS[key][0](value)
        if value not in (None, "", []) and value != defaults[dotted]:
            _put(tree, dotted, value)


def reward_entries(text: str | list[Any] | None) -> list[Any]:
    """The reward functions box as reward_funcs entries: one per line (blank and # lines skipped); a line that
    starts with '{' is a YAML mapping ({func: ..., setting: value})."""
    if isinstance(text, list):
        return text
    entries: list[Any] = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                entry = yaml.safe_load(line)
            except yaml.YAMLError:
                entry = None
            if not isinstance(entry, dict):
                raise ConfigError(f"reward functions: '{line}' is no mapping; write {{func: name, setting: value}}")
            entries.append(entry)
        else:
            entries.append(line)
    return entries


def reward_text(entries: list[Any], ws: Workspace | None = None) -> str:
    """reward_funcs entries as the box shows them: one per line, files in the working folder relative to it."""
    lines = []
    for entry in entries:
        if isinstance(entry, dict):
            func = entry.get("func")
            shown = {**entry, "func": _shown_reward(func, ws)} if isinstance(func, str) else entry
            lines.append(yaml.safe_dump(shown, default_flow_style=True, allow_unicode=True, width=10_000).strip())
        else:
            lines.append(_shown_reward(str(entry), ws))
    return "\n".join(lines)


def weight_list(text: str | list[Any] | None) -> list[float]:
    """The reward weights box ('1, 0.5' or one per line) as numbers."""
    if isinstance(text, list):
        return [float(w) for w in text]
    words = (text or "").replace(",", " ").split()
    try:
        return [float(w) for w in words]
    except ValueError:
        raise ConfigError(f"reward weights: '{text}' must be numbers separated by commas, e.g. 1.0, 0.5") from None


def weight_text(weights: list[float]) -> str:
    """Reward weights as the box shows them."""
    return ", ".join(f"{w:g}" for w in weights)


# Panel fields shown as text: (box text -> config value, config value -> box text).
TEXT_FIELDS = {"reward_funcs": (reward_entries, reward_text), "reward_weights": (weight_list, weight_text)}


def _is_reward_file(spec: str) -> bool:
    """Whether a reward_funcs string names a Python file (as the loader decides), not a built-in or module."""
    target = spec.strip().removeprefix("builtin:").rpartition(":")[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def _shown_reward(spec: str, ws: Workspace | None) -> str:
    if ws is None or not _is_reward_file(spec):
        return spec
    target, _, attr = spec.strip().rpartition(":")
    return f"{ws.relative(Path(target))}:{attr}"


def confine(tree: dict[str, Any], ws: Workspace) -> None:
    """Resolve every path setting in the tree, refusing one outside the folder the web UI keeps it in."""
    folders = {"output.dir": ws.runs_dir, "output.logging_dir": ws.runs_dir, "data.dataset_dir": ws.data_dir,
               "data.cache_dir": ws.data_dir, "model.cache_dir": ws.models_dir, "eval.dir": ws.runs_dir,
               "eval.task_dir": ws.data_dir, "export.dir": ws.exports_dir}
    for dotted, folder in folders.items():
        value = _lookup(tree, dotted)
        if value is not None:
            _put(tree, dotted, str(ws.inside(value, folder, dotted)))
    for dotted in ("model.path", "reference.model"):
        if _lookup(tree, dotted) is not None:
            _put(tree, dotted, ws.model_path(str(_lookup(tree, dotted))))
    reward_model = _lookup(tree, "reward_model.path")
    if reward_model is not None and not str(reward_model).startswith(("http://", "https://")):
        _put(tree, "reward_model.path", ws.model_path(str(reward_model)))
    for dotted in ("model.adapter_path", "reference.adapters", "reward_model.adapters"):
        adapters = _lookup(tree, dotted)
        if adapters is not None:
            adapters = [adapters] if isinstance(adapters, str) else adapters
            _put(tree, dotted, [str(ws.inside(a, ws.runs_dir, "adapter")) for a in adapters] or None)
    rewards = _lookup(tree, "grpo.reward_funcs")
    if isinstance(rewards, list):  # reward files (Python run by training) only from the working folder
        _put(tree, "grpo.reward_funcs", [_confined_reward(entry, ws) for entry in rewards])
    deepspeed = _lookup(tree, "train.deepspeed")
    if deepspeed and deepspeed_choice(str(deepspeed)) is None:  # one of the shipped configs, or the data folder's
        _put(tree, "train.deepspeed", str(ws.inside(deepspeed, ws.data_dir, "train.deepspeed")))
    resume = _lookup(tree, "train.resume_from_checkpoint")
    if resume not in (None, "auto"):
        _put(tree, "train.resume_from_checkpoint", str(ws.inside(resume, ws.runs_dir, "checkpoint")))


def _confined_reward(entry: Any, ws: Workspace) -> Any:
    """A reward_funcs entry with its file (if it names one) made absolute, refused outside the working folder
    (a relative path is taken from it, as the box shows it, not from configs/ where the YAML is written)."""
    if isinstance(entry, dict) and isinstance(entry.get("func"), str):
        return {**entry, "func": _confined_reward(entry["func"], ws)}
    if not isinstance(entry, str) or not _is_reward_file(entry):
        return entry
    target, _, attr = entry.strip().rpartition(":")
    return f"{ws.inside(target, ws.root, 'reward function file')}:{attr}"


def build_config(values: dict[str, Any], ws: Workspace) -> RunConfig:
    """The validated RunConfig the form describes (the same path `tuneforge train` takes)."""
    return load_tree(config_tree(values, ws), "web UI form")


def train_command(values: dict[str, Any], ws: Workspace) -> Command:
    """Validate the form and describe the exact YAML and `tuneforge train` command Start runs."""
    tree = config_tree(values, ws)
    cfg = load_tree(tree, "web UI form")  # refuse a bad setting before anything is written
    output = Path(tree["output"]["dir"]) if "output" in tree and "dir" in tree["output"] else ws.runs_dir / "latest"
    # One config per run folder: runs/a/x and runs/b/x get a__x.yaml and b__x.yaml.
    name = "__".join(output.relative_to(ws.runs_dir).parts) if ws.runs_dir in output.parents else output.name
    path = ws.config_dir / f"{name}.yaml"
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    return Command(cfg, text, path, [sys.executable, "-m", "tuneforge", "train", str(path)])


def save_args(values: dict[str, Any], ws: Workspace, file_name: str) -> Path:
    """Write the form as YAML into the config folder."""
    from tuneforge.io import write_text_atomic

    path = ws.inside(ws.config_dir / _yaml_name(file_name), ws.config_dir, "args file")
    tree = config_tree(values, ws)
    load_tree(tree, "web UI form")
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return path


def load_args(ws: Workspace, file_name: str) -> dict[str, Any]:
    """Read a YAML (ours or LLaMA-Factory's) from the config folder into form values by UI key."""
    path = ws.inside(ws.config_dir / _yaml_name(file_name), ws.config_dir, "args file")
    return form_values(load(path), ws)


def form_values(cfg: RunConfig, ws: Workspace) -> dict[str, Any]:
    """Form values by UI key for a config (the inverse of config_tree for the fields the form has)."""
    values = {key: _get(cfg, dotted) for key, dotted in {**SIMPLE, **LORA, **QUANT, **FREEZE}.items()}
    bits = cfg.model.quantization_bit
    values["method"] = f"qlora-{bits}bit" if bits else cfg.finetune.method
    values["model"] = ws.relative(Path(cfg.model.path))
    values["adapters"] = [ws.relative(Path(a)) for a in cfg.model.adapter_path]
    values["lora_alpha"] = cfg.finetune.lora.alpha or 0
    values["lora_targets"] = ", ".join(cfg.finetune.lora.targets)
    values["freeze_modules"] = ", ".join(cfg.finetune.freeze.trainable_modules)
    values["dataset_dir"] = ws.relative(Path(cfg.data.dataset_dir))
    values["dataset"] = list(cfg.data.dataset)
    values["output_dir"] = ws.relative(Path(cfg.output.dir))
    values["resume"] = cfg.train.resume_from_checkpoint is not None
    values["packing"] = {None: "auto", True: "true", False: "false"}[cfg.data.packing]
    values["ds_stage"], values["ds_offload"] = deepspeed_choice(cfg.train.deepspeed) or ("none", False)
    values.update(preference_values(cfg, ws))
    values["extra_args"] = "\n".join(extra_lines(cfg, values))
    return values


def preference_values(cfg: RunConfig, ws: Workspace) -> dict[str, Any]:
    """The stage panels' values for a config: its stage's settings, the panels' defaults for the rest."""
    values = {**PREFERENCE_FORM, **grpo_form(), **ppo_form()}
    for key, dotted in STAGE_PANELS.get(cfg.stage, {}).items():
        value = _get(cfg, dotted)
        values[key] = TEXT_FIELDS[key][1](value, ws) if key == "reward_funcs" else \
            TEXT_FIELDS[key][1](value) if key in TEXT_FIELDS else value
    values["ref_model"] = ws.relative(Path(values["ref_model"])) if values["ref_model"] else ""
    rm = values["reward_model"] or ""
    values["reward_model"] = rm if rm.startswith(("http://", "https://")) or not rm else ws.relative(Path(rm))
    return values


def ppo_form() -> dict[str, Any]:
    """What the PPO panel shows when the stage is not ppo: the sections' defaults (no reward model)."""
    defaults = _defaults()
    return {**{key: defaults[dotted] for key, dotted in PPO.items()}, "reward_model": ""}


def grpo_form() -> dict[str, Any]:
    """What the GRPO panel shows when the stage is not grpo: the section's defaults."""
    defaults = _defaults()
    values = {key: defaults[dotted] for key, dotted in GRPO.items()}
    return {**values, "reward_funcs": "", "reward_weights": ""}


# Settings the form's own fields hold; everything else a loaded config sets goes to the Extra settings box.
FORM_PATHS = {*SIMPLE.values(), *LORA.values(), *QUANT.values(), *FREEZE.values(), "model.path",
              "finetune.method", "model.quantization_bit", "finetune.lora.alpha", "finetune.lora.targets",
              "finetune.freeze.trainable_modules", "model.adapter_path", "data.dataset_dir", "data.dataset",
              "output.dir", "data.packing", "train.resume_from_checkpoint"}


def extra_lines(cfg: RunConfig, values: dict[str, Any]) -> list[str]:
    """`key=value` lines for the settings of `cfg` the form has no field for and that differ from the default,
    so Load args followed by Start trains exactly what was saved."""
    from tuneforge.config.typed import flatten, to_dict

    lines = []
    defaults = _defaults()
    held = FORM_PATHS | set(STAGE_PANELS.get(cfg.stage, {}).values()) | _mirrored(cfg) | \
        ({"train.deepspeed"} if deepspeed_choice(cfg.train.deepspeed) else set())
    for dotted, value in flatten(to_dict(cfg), leaves=("inline",)).items():
        if dotted not in held and value != defaults.get(dotted):
            lines.append(f"{dotted}={json.dumps(value, ensure_ascii=False)}")
    if cfg.train.resume_from_checkpoint not in (None, "auto"):
        lines.append(f"train.resume_from_checkpoint={json.dumps(cfg.train.resume_from_checkpoint)}")
    return lines


def _mirrored(cfg: RunConfig) -> set[str]:
    """beta and ftx of the other stage sections where they equal the stage's own: LLaMA-Factory's pref_beta sets
    dpo, kto and grpo's beta (pref_ftx dpo and kto's ftx), and the panel's one field stands for them all."""
    names = {"dpo": ("beta", "ftx"), "kto": ("beta", "ftx"), "grpo": ("beta",)}
    if cfg.stage not in names:
        return set()
    return {f"{other}.{name}" for other, shared in names.items() if other != cfg.stage for name in shared
            if name in names[cfg.stage] and _get(cfg, f"{other}.{name}") == _get(cfg, f"{cfg.stage}.{name}")}


def _defaults() -> dict[str, Any]:
    """Every setting's default by dotted path."""
    from tuneforge.config.typed import flatten, to_dict

    return flatten(to_dict(RunConfig()), leaves=("inline",))


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None or value == "":
        return
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _names(text: str | None) -> list[str] | None:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


def _yaml_name(name: str) -> str:
    name = (name or "").strip() or "args"
    return name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
