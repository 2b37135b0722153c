"""Typed config sections. Each field has a type, a default and one docstring line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["lora", "full", "freeze"]
Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"
    """Local folder, Hugging Face id, ModelScope id, or the alias 'smollm2-135m-instruct' (embedded model)."""
    hub: Literal["auto", "huggingface", "modelscope"] = "auto"
    """Where a hub id is fetched from; 'auto' means ModelScope when USE_MODELSCOPE_HUB=1, else Hugging Face."""
    revision: str = "main"
    """Branch, tag or commit of a hub model."""
    cache_dir: str | None = None
    """Folder for downloaded hub models; default is the hub library's own cache."""
    token: str | None = None
    """Hub access token for gated or private models; default reads HF_TOKEN."""
    adapter_path: list[str] = field(default_factory=list)
    """Adapters (LoRA folders) to load on top of the base model, in order."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weight dtype when loading; 'auto' picks bf16 where the device supports it on GPU, else fp32."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel; 'auto' lets transformers choose (sdpa when available)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust the repository."""
    quantization_bit: int | None = None
    """Load the base model quantized with bitsandbytes to 4 or 8 bits (QLoRA)."""
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quantization: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit per parameter)."""


@dataclass
class LoraConfig:
    rank: int = 8
    """Adapter rank r; each adapted matrix gains r * (d_in + d_out) parameters."""
    alpha: int | None = None
    """Scale numerator; defaults to 2 * rank."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt, or ['all'] for every linear layer but the output head."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    pissa_init: bool = False
    """Initialise the adapter from the principal singular vectors (PiSSA)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    create_new_adapter: bool = False
    """With model.adapter_path set: stack a new adapter on the merged old ones instead of continuing the last."""


@dataclass
class FreezeConfig:
    trainable_layers: int = 2
    """Number of trainable decoder layers: positive counts from the last layer, negative from the first."""
    trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    """Module names inside the trainable layers to train (e.g. mlp, self_attn), or ['all']."""
    extra_modules: list[str] = field(default_factory=list)
    """Modules outside the decoder layers to train as well (e.g. embed_tokens, norm)."""


@dataclass
class FinetuneConfig:
    method: Method = "lora"
    """How weights are tuned: lora (adapters), full (every weight) or freeze (only some layers)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings, used when method is lora."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Freeze settings, used when method is freeze."""


@dataclass
class IdentityConfig:
    name: str = "tuneforge"
    """Replaces {{name}} in the identity dataset."""
    author: str = "the tuneforge team"
    """Replaces {{author}} in the identity dataset."""


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=list)
    """Training datasets by name (built-in, from dataset_dir/dataset_info.json, or data.inline)."""
    eval_dataset: list[str] = field(default_factory=list)
    """Validation datasets by name; alternative to val_size."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files it names."""
    inline: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Datasets defined in the config: name -> dataset_info entry (file_name or path, formatting, columns, ...)."""
    template: str = "auto"
    """Chat template: 'auto' uses the tokenizer's own, or a named one (see `tuneforge templates list`)."""
    default_system: str | None = None
    """System prompt used for rows that have none; default is the template's own."""
    enable_thinking: bool = True
    """For reasoning templates (qwen3): keep the thinking block in trained answers."""
    cutoff_len: int = 2048
    """Maximum tokens per encoded row."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Rows longer than cutoff_len: truncate (keeping the response, as LLaMA-Factory does) or drop them."""
    max_samples: int | None = None
    """Use at most this many rows of each dataset."""
    val_size: float = 0.0
    """Validation split: a fraction (0-1) of the training rows, or a whole count (>= 1)."""
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    """How several datasets are combined."""
    interleave_probs: list[float] = field(default_factory=list)
    """Sampling probabilities per dataset for the interleave strategies."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (system and user turns)."""
    mask_history: bool = False
    """Train only on the last assistant turn of multi-turn rows."""
    packing: bool | None = None
    """Pack rows into full cutoff_len sequences; default on for pt, off for sft."""
    num_proc: int | None = None
    """Processes for tokenization; default is one."""
    cache_dir: str | None = None
    """Folder for the tokenized-dataset cache; default is TUNEFORGE_HOME/cache/datasets."""
    overwrite_cache: bool = False
    """Tokenize again even when a cached copy exists."""
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    """Substitutions for the built-in identity dataset."""


@dataclass
class TrainConfig:
    batch_size: int = 1
    """Rows per device per micro-batch."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    epochs: float = 3.0
    """Passes over the training rows (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; -1 means derive from epochs."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of total steps spent warming up."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    optimizer: str = "adamw"
    """Optimizer: adamw, adam, sgd, adafactor, ... (torch optimizer names)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; 'auto' is bf16 where supported (including CPUs with bf16), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    seed: int = 42
    """Seed for shuffling, initialisation and dropout."""
    logging_steps: int = 10
    """Log metrics every N optimizer steps."""
    save_steps: int = 500
    """Save a checkpoint every N optimizer steps; 0 disables step checkpoints."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    eval_steps: int | None = None
    """Evaluate on the validation split every N steps; default is save_steps."""
    eval_batch_size: int = 1
    """Rows per device per evaluation batch."""
    resume_from_checkpoint: str | None = None
    """Checkpoint folder to resume from, or 'auto' for the newest valid one in the output folder."""
    report_to: list[str] = field(default_factory=list)
    """Extra loggers: tensorboard, wandb, swanlab, mlflow."""
    forward_tokens: int | None = None
    """Most padded tokens per forward pass; micro-batches are cut to fit (same gradient). Default: 512 on CPU,
    no limit on GPU; 0 disables."""
    group_by_length: bool = True
    """Batch rows of similar length together (less padding); the order stays seeded and resumable."""
    dataloader_workers: int = 0
    """Background processes loading batches."""
    ddp_timeout: int = 1800
    """Seconds a distributed process waits for the others."""


@dataclass
class OutputConfig:
    dir: str = "runs/latest"
    """Run folder: config, manifest, metrics, checkpoints and final weights go here."""
    overwrite: bool = False
    """Allow writing into a run folder that already holds a finished run."""
    plot_loss: bool = True
    """Write plots/loss.png at the end of training."""
    logging_dir: str | None = None
    """TensorBoard folder; default is <dir>/tensorboard."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    """Most tokens generated per answer."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probabilities sum to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = no limit)."""
    repetition_penalty: float = 1.0
    """Values above 1 discourage repeating tokens."""
    do_sample: bool | None = None
    """Sample instead of greedy decoding; default follows temperature > 0."""
    seed: int | None = None
    """Seed for sampling, for repeatable answers."""
    system: str | None = None
    """System prompt for chat; default is the one the model was trained with."""


@dataclass
class ExportConfig:
    dir: str = "exports/latest"
    """Folder for the merged model (safetensors), Modelfile and GGUF files."""
    size: float = 5.0
    """Largest safetensors shard in GB (LLaMA-Factory: export_size)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weight dtype of the export; 'auto' keeps the base model's dtype."""
    modelfile: bool = True
    """Write an Ollama Modelfile (template, stop words, system prompt)."""
    gguf: list[str] = field(default_factory=list)
    """GGUF files to write: any of f16, bf16, q8_0 (Llama-family models with BPE tokenizers)."""
    verify: bool = True
    """Reload each export and compare its next-token logits with base + adapter."""
    tolerance: float | None = None
    """Largest allowed logit difference; default depends on the dtype (see the README)."""
    overwrite: bool = False
    """Replace an existing export folder."""


@dataclass
class EvalConfig:
    modes: list[Literal["loss", "predict", "choice"]] = field(default_factory=lambda: ["loss"])
    """What to measure: loss (loss, perplexity, token accuracy), predict (generate + BLEU/ROUGE), choice."""
    dir: str = "runs/eval"
    """Folder for predictions.jsonl, results.json and report.md."""
    batch_size: int = 4
    """Rows per batch for loss and predict."""
    task: str = "mmlu_demo"
    """Multiple-choice benchmark: a built-in demo (mmlu_demo, ceval_demo, cmmlu_demo) or a folder in task_dir."""
    task_dir: str | None = None
    """Folder holding benchmark folders in the MMLU / C-Eval / CMMLU layouts."""
    n_shot: int = 5
    """Solved dev examples shown before each question (fewer when the dev split is smaller)."""
    lang: Literal["en", "zh"] = "en"
    """Language of the choice prompt's instruction and answer cue."""
    samples: int = 5
    """Predictions shown side by side in the report."""
    after_training: bool = False
    """Run these evaluations on the final model at the end of `tuneforge train` (into <run>/eval)."""


@dataclass
class ReferenceConfig:
    model: str | None = None
    """A separate reference model (folder or hub id); default is the policy's starting point (see the README)."""
    adapters: list[str] = field(default_factory=list)
    """Adapters merged into the separate reference model."""
    quantization_bit: int | None = None
    """Load the separate reference model quantized to 4 or 8 bits."""
    precompute: bool = False
    """Compute reference log-probs once before training, cache them with the tokenized data, free the reference."""


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = "sigmoid"
    """Preference loss: sigmoid (DPO), hinge (SLiC), ipo, kto_pair, orpo or simpo (the last two use no reference)."""
    beta: float | None = None
    """Strength beta; default 0.1, but 2.0 for simpo (the SimPO paper's recipes)."""
    ftx: float = 0.0
    """Weight of an added SFT term: ftx * (mean log-loss per token of the chosen answer)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed fraction of flipped labels, in [0, 0.5); sigmoid loss only."""
    simpo_gamma: float | None = None
    """SimPO target reward margin gamma; default 1.0 (gamma / beta = 0.5, as in SimPO's recipes)."""
    ld_alpha: float | None = None
    """LD-DPO: weight of the policy's log-probs past the shorter answer's length (1 = plain DPO)."""
    bco_weight: float = 0.0
    """Mix in BCO's loss with this weight (MPO): loss = (dpo + w * bco) / (1 + w); reference losses only."""


@dataclass
class KTOConfig:
    beta: float = 0.1
    """Strength beta."""
    chosen_weight: float = 1.0
    """Weight of desirable rows (lambda_D)."""
    rejected_weight: float = 1.0
    """Weight of undesirable rows (lambda_U); aim for w_D * n_D / (w_U * n_U) in [1, 4/3]."""
    ftx: float = 0.0
    """Weight of an added SFT term on desirable rows (mean log-loss per token)."""


@dataclass
class RMConfig:
    head_dropout: float = 0.1
    """Dropout before the value head while training (TRL's ValueHead default, which LLaMA-Factory trains with)."""


@dataclass
class RunConfig:
    stage: Stage = "sft"
    """Training stage: pt, sft, rm, dpo, kto, ppo or grpo."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model, adapters and how they are loaded."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Which weights are tuned and how."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, template and encoding."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and the training loop."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run is written."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding settings for chat, the API and prediction."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Merging and exporting a trained model."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and prediction (`tuneforge eval`)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward-model stage settings."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO-family stage settings (loss variant, beta, ...)."""
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO stage settings."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference model of dpo and kto."""
