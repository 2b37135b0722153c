"""Typed config sections. Each field has a type, a default and one docstring line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["lora", "full", "freeze", "oft"]
Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]


@dataclass
class VllmConfig:
    max_len: int = 4096
    """Longest prompt + answer vLLM plans its KV cache for (LLaMA-Factory's vllm_maxlen)."""
    gpu_util: float = 0.7
    """Share of GPU memory vLLM may take, 0-1 (vllm_gpu_util)."""
    enforce_eager: bool = False
    """Run without CUDA graphs (vllm_enforce_eager)."""
    max_lora_rank: int = 32
    """Largest adapter rank vLLM reserves for (vllm_max_lora_rank); raised to fit the loaded adapters and rounded
    up to a rank vLLM takes (8, 16, 32, 64, 128, 256, 320, 512)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """More vLLM engine arguments, passed as given (vllm_config)."""


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
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = None
    """Stretch RoPE to data.cutoff_len when it exceeds the model's context: factor ceil(cutoff / max positions)."""
    add_tokens: list[str] = field(default_factory=list)
    """Plain tokens added to the tokenizer (the embeddings grow to fit; new rows start at the mean embedding)."""
    add_special_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the tokenizer (never split, skipped when decoding with skip_special_tokens)."""
    resize_vocab: bool = False
    """Grow the embeddings to the tokenizer's size; on with add_tokens; LoRA then trains embed_tokens and lm_head."""
    split_special_tokens: bool = False
    """Tokenize special-token text (e.g. <|im_end|>) as plain text, as LLaMA-Factory does, template markers too."""
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    """What chat, the API and predict generate with: transformers, or vLLM (needs an NVIDIA GPU and `pip install
    vllm`; prompts are still encoded by the training template)."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """vLLM's settings, when infer_backend is vllm."""


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
    pissa_iter: int = 16
    """PiSSA's fast-SVD iterations (LLaMA-Factory's default); -1 runs a full, exact SVD."""
    pissa_convert: bool = False
    """Save the PiSSA adapter as an ordinary LoRA adapter (rank doubled) that applies to the original base."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    create_new_adapter: bool = False
    """With model.adapter_path set: stack a new adapter on the merged old ones instead of continuing the last."""
    plus_lr_ratio: float | None = None
    """LoRA+: B matrices (and 1-D trainable params) learn at learning_rate * this ratio (e.g. 16); unset: plain LoRA."""
    plus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of the adapters on embedding layers."""


@dataclass
class FreezeConfig:
    trainable_layers: int = 2
    """Number of trainable decoder layers: positive counts from the last layer, negative from the first."""
    trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    """Module names inside the trainable layers to train (e.g. mlp, self_attn), or ['all']."""
    extra_modules: list[str] = field(default_factory=list)
    """Modules outside the decoder layers to train as well (e.g. embed_tokens, norm)."""


@dataclass
class OFTConfig:
    rank: int = 0
    """OFT blocks per adapted layer (r); 0 means derive it from block_size (give exactly one of the two)."""
    block_size: int = 32
    """Size of each orthogonal block; the layer's input size must be a multiple of it. 0 means use rank."""
    targets: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt, or ['all'] for every linear layer but the output head."""
    dropout: float = 0.0
    """Multiplicative dropout: the chance each block is reset to the identity in a training step."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    create_new_adapter: bool = False
    """With model.adapter_path set: stack a new adapter on the merged old ones instead of continuing the last."""


@dataclass
class FinetuneConfig:
    method: Method = "lora"
    """How weights are tuned: lora or oft (adapters), full (every weight) or freeze (only some layers)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings, used when method is lora."""
    oft: OFTConfig = field(default_factory=OFTConfig)
    """Orthogonal fine-tuning settings, used when method is oft."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Freeze settings, used when method is freeze."""
    llama_pro: bool = False
    """Train only the blocks `tuneforge expand` added (LLaMA-Pro); freeze.trainable_layers gives their count."""


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
    tool_format: str | None = None
    """Tool-call syntax replacing the named template's own (default, glm4, llama3, mistral, qwen, qwen3_5, ...)."""
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
    """Pack rows into full cutoff_len sequences; default on for pt, off for sft. Packed sft rows attend to each
    other, as in LLaMA-Factory; see neat_packing."""
    neat_packing: bool = False
    """Pack sft rows without attention between them (each row sees only itself); implies packing."""
    tokenized_path: str | None = None
    """Folder of a tokenized dataset: saved there when missing, loaded from it (datasets ignored) when present."""
    num_proc: int | None = None
    """Processes for tokenization; default is one."""
    cache_dir: str | None = None
    """Folder for the tokenized-dataset cache; default is TUNEFORGE_HOME/cache/datasets."""
    overwrite_cache: bool = False
    """Tokenize again even when a cached copy exists."""
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    """Substitutions for the built-in identity dataset."""


@dataclass
class GaloreConfig:
    enabled: bool = False
    """Project the gradients of the targeted weight matrices to low rank (GaLore; not with LoRA)."""
    target: list[str] = field(default_factory=lambda: ["all"])
    """Linear modules whose weights GaLore projects (name substrings), or ['all'] for every linear layer but the head."""
    rank: int = 16
    """Rank of the projected gradients."""
    update_interval: int = 200
    """Recompute the projection (an SVD of the gradient) every N optimizer steps."""
    scale: float = 2.0
    """Scale applied to the projected-back update."""
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    """Which side(s) of the gradient are projected."""
    layerwise: bool = False
    """Step each weight as soon as its gradient is ready, then free it (less memory; no accumulation, DDP, clipping)."""


@dataclass
class ApolloConfig:
    enabled: bool = False
    """Scale raw gradients by factors estimated in a low-rank space (APOLLO; not with LoRA)."""
    target: list[str] = field(default_factory=lambda: ["all"])
    """Linear modules APOLLO applies to (name substrings), or ['all'] for every linear layer but the head."""
    rank: int = 16
    """Rank of the auxiliary low-rank space."""
    update_interval: int = 200
    """Draw a new projection every N optimizer steps."""
    scale: float = 32.0
    """Scale applied to the gradient-scaling factors."""
    proj: Literal["svd", "random"] = "random"
    """Projection: random (cheap, APOLLO's default) or svd (GaLore-style)."""
    proj_type: Literal["std", "right", "left"] = "std"
    """Which side of the gradient is projected."""
    scale_type: Literal["channel", "tensor"] = "channel"
    """Scaling factors per channel, or one per tensor (APOLLO-Mini)."""
    layerwise: bool = False
    """Step each weight as soon as its gradient is ready, then free it (less memory; no accumulation, DDP, clipping)."""
    scale_front: bool = False
    """Apply sqrt(scale) before the norm-growth limiter instead of after it (APOLLO-Mini)."""


@dataclass
class BadamConfig:
    enabled: bool = False
    """Train one block of parameters at a time (BAdam; full finetuning only); train.optimizer updates the block."""
    mode: Literal["layer", "ratio"] = "layer"
    """layer: one decoder layer per block; ratio: a sparse update_ratio share of every weight, by sparse Adam."""
    start_block: int | None = None
    """Layer mode: decoder layer to start with; default follows switch_mode (first for ascending)."""
    switch_mode: Literal["ascending", "descending", "random", "fixed"] = "ascending"
    """Layer mode: order in which the blocks take turns."""
    switch_interval: int = 50
    """Move to the next block every N optimizer steps (ratio mode: new masks); -1 never switches."""
    update_ratio: float = 0.05
    """Ratio mode: share of each weight's entries updated at a time."""
    mask_mode: Literal["adjacent", "scatter"] = "adjacent"
    """Ratio mode: the updated entries are adjacent, or scattered at random."""
    verbose: int = 0
    """0 quiet, 1 print each block switch, 2 also print the trainable parameter names."""


@dataclass
class FsdpConfig:
    enabled: bool = False
    """Shard weights, gradients and optimizer state over the processes with FSDP2 (torch's fully_shard): one unit
    per decoder layer plus one for the rest. Also turned on by `accelerate launch --config_file` with an FSDP config
    (LLaMA-Factory's fsdp_config.yaml / fsdp2_config.yaml) and by LLaMA-Factory's fsdp / fsdp_config keys."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward and gather them again for the backward (FULL_SHARD);
    false keeps them until the backward (SHARD_GRAD_OP: less communication, more memory)."""
    offload_params: bool = False
    """Keep the sharded weights, gradients and optimizer state in CPU memory between uses (GPU runs only)."""
    layer_classes: list[str] = field(default_factory=list)
    """Module class names sharded as one unit each; default: the model's own (its _no_split_modules, the decoder
    layers), as accelerate's TRANSFORMER_BASED_WRAP does."""


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
    """Update rule: adamw, adam, sgd, rmsprop, adagrad, adafactor, adamw_8bit, paged_adamw_8bit, adam_mini, muon."""
    adam_beta1: float = 0.9
    """First-moment decay of the Adam family (adamw, adam, 8-bit AdamW, GaLore, APOLLO, Adam-mini, Muon's AdamW)."""
    adam_beta2: float = 0.999
    """Second-moment decay of the Adam family."""
    adam_epsilon: float = 1e-8
    """Denominator epsilon of the Adam family."""
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    """GaLore gradient low-rank projection, on top of adamw, adamw_8bit or adafactor."""
    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    """APOLLO low-rank gradient scaling, on top of adamw."""
    badam: BadamConfig = field(default_factory=BadamConfig)
    """BAdam block-coordinate training."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; 'auto' is bf16 where supported (including CPUs with bf16), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    compile: bool = False
    """torch.compile each decoder layer (LLaMA-Factory: torch_compile): faster steps for long runs, after a
    one-time compile (about a minute on a CPU, and again when batch shapes change); single process or DDP."""
    compile_backend: str = "inductor"
    """torch.compile backend (LLaMA-Factory: torch_compile_backend)."""
    compile_mode: str | None = None
    """torch.compile mode: default, reduce-overhead, max-autotune, ... (LLaMA-Factory: torch_compile_mode)."""
    seed: int = 42
    """Seed for shuffling, initialisation and dropout."""
    data_seed: int | None = None
    """Seed of the training order only; default is seed."""
    shuffle: bool = True
    """Shuffle the training rows each epoch; false trains in dataset order (and ignores group_by_length)."""
    device: Literal["auto", "cpu"] = "auto"
    """Where to train: auto uses the GPUs when there are any; cpu trains on the CPU even when a GPU is visible."""
    logging_steps: int = 10
    """Log metrics every N optimizer steps."""
    save_steps: int = 500
    """Save a checkpoint every N optimizer steps; 0 disables step checkpoints."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    eval_steps: int | None = None
    """Evaluate on the validation split every N steps; default is save_steps; 0 means not during training."""
    eval_batch_size: int = 1
    """Rows per device per evaluation batch."""
    enabled: bool = True
    """Train at all; false makes `tuneforge train` only run eval.modes on the model as given (LF: do_train false)."""
    early_stopping_steps: int | None = None
    """Stop when metric_for_best_model has not improved for this many evaluations in a row."""
    load_best_model_at_end: bool = False
    """Make the final weights those of the best evaluated checkpoint (by metric_for_best_model)."""
    metric_for_best_model: str = "eval_loss"
    """Evaluation metric that picks the best checkpoint and drives early stopping ('eval_' may be left off)."""
    greater_is_better: bool | None = None
    """Whether a higher metric_for_best_model is better; default: false for metrics ending in 'loss', else true."""
    resume_from_checkpoint: str | None = None
    """Checkpoint folder to resume from, or 'auto' for the newest valid one in the output folder."""
    resume_anyway: bool = False
    """Resume although the data, batch layout, process count, stage or method differ from the checkpoint's run
    (refused otherwise: the run would not continue exactly)."""
    report_to: list[str] = field(default_factory=list)
    """Extra loggers: tensorboard, wandb, swanlab, mlflow."""
    forward_tokens: int | None = None
    """Most padded tokens per forward pass; micro-batches are cut to fit (same gradient). Default: 1024 on CPU,
    no limit on GPU; 0 disables."""
    group_by_length: bool = True
    """Batch rows of similar length together (less padding); the order stays seeded and resumable."""
    ddp_timeout: int = 1800
    """Seconds a distributed process waits for the others."""
    deepspeed: str | None = None
    """A DeepSpeed JSON config (e.g. LLaMA-Factory's examples/deepspeed/ds_z3_config.json): ZeRO stage 0-3 and
    offload; its "auto" values are filled from this config (micro-batch, clipping, precision)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """FSDP2 sharding (instead of DDP's full copy per process); not together with deepspeed."""
    neftune_alpha: float | None = None
    """NEFTune: add uniform noise of size alpha / sqrt(length * hidden) to the input embeddings while training."""


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
    """Export into a non-empty export.dir: an earlier export's weight files are removed and its other files
    replaced; files the export does not write are kept."""


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
    """Run these evaluations at the end of `tuneforge train` on the final model, or on the given model when
    train.enabled is false (into <run>/eval)."""
    lf_dir: str | None = None
    """Also write LLaMA-Factory's result files here (generated_predictions.jsonl, predict_results.json,
    eval_results.json, all_results.json); LF's output_dir sets it."""


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
class SFTConfig:
    loss: Literal["ce", "dft", "eaft", "asft"] = "ce"
    """Token loss: ce (cross-entropy), dft (weighted by the token's probability), eaft (by the model's entropy) or
    asft (dft plus a KL anchor to the reference model)."""
    eaft_alpha: float = 1.0
    """EAFT: power of the entropy weight."""
    asft_alpha: float = 0.1
    """ASFT: weight of the KL(reference || policy) term."""


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
class GRPOConfig:
    num_generations: int = 8
    """Completions sampled per prompt (G, a group); at least 2."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Loss normalisation (TRL's loss_type): dapo (TRL's default) averages over all completion tokens of a step."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: float | None = None
    """Upper clipping range; default: epsilon (DAPO suggests 0.28)."""
    beta: float = 0.0
    """KL coefficient (k3 estimator) against the reference; 0 loads no reference model (TRL's default)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (group), the step's (batch), or not at all (none, Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer steps on each rollout (mu); above 1 the clipped ratio takes effect."""
    max_completion_length: int = 256
    """Most tokens generated per completion."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss (they still count for advantages)."""
    reward_funcs: list[str | dict[str, Any]] = field(default_factory=list)
    """Reward functions: 'file.py:function', 'module:function' (TRL's signature), built-ins, or {func: ..., ...}."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward function; default: 1 each."""
    completions_log_steps: int | None = None
    """Write sampled completions to completions.jsonl every this many steps; default: train.logging_steps."""
    completions_logged: int = 4
    """Completions written per logged step (0: none)."""


@dataclass
class PPOConfig:
    buffer_size: int = 1
    """Windows (batch_size x gradient_accumulation_steps prompts) rolled out per PPO cycle (ppo_buffer_size)."""
    epochs: int = 4
    """Passes over each rollout; every pass over one window is one optimizer step (ppo_epochs)."""
    score_norm: bool = False
    """Normalise reward-model scores by their running mean and std (ppo_score_norm)."""
    target: float = 6.0
    """Target KL of the adaptive KL coefficient (ppo_target)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (without mean shift) before GAE (ppo_whiten_rewards)."""
    init_kl_coef: float = 0.2
    """Starting KL coefficient of the per-token KL penalty."""
    horizon: int = 10000
    """Horizon of the adaptive KL controller (in samples)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value predictions around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ratio_threshold: float = 10.0
    """Skip (zero) a batch's loss when its mean policy ratio exceeds this."""


@dataclass
class RewardModelConfig:
    path: str | None = None
    """Reward model of stage ppo: an rm adapter or run folder (lora), a model folder (full) or a score URL (api)."""
    type: Literal["lora", "full", "api"] = "lora"
    """lora: a second adapter on the policy's base; full: a separate model; api: POST /v1/score/evaluation."""
    adapters: list[str] = field(default_factory=list)
    """Adapters merged into a full reward model (the last one's value head is used)."""
    quantization_bit: int | None = None
    """Load a full reward model quantized to 4 or 8 bits."""
    api_key: str | None = None
    """Bearer key of an api reward model; default: the TUNEFORGE_REWARD_API_KEY environment variable."""


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
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT stage settings (the token loss)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO-family stage settings (loss variant, beta, ...)."""
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO stage settings."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference model of dpo, kto and sft's asft loss."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO stage settings (online RL with reward functions)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO stage settings (LLaMA-Factory's ppo_* keys and TRL 0.9.6's defaults)."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """The reward model of stage ppo."""
