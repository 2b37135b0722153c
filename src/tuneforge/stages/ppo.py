"""Stage ppo: LLaMA-Factory's PPO (TRL 0.9.6's PPOTrainer) inside our own loop, resumable.

A rollout samples one completion per prompt from the policy (adapters on, KV cache, left padding, the template's
stop words), scores prompt + completion with the reward model (lora: a second adapter "reward" on the policy's
base with its value head; full: a separate value-head model; api: POST /v1/score/evaluation), and turns the scores
into per-token rewards (-kl_coef * (logp - ref_logp), plus the score on the last token), GAE advantages (whitened)
and returns, using the policy's own value head as the critic (the math is stages/rl_math.py).

TRL's schedule on our loop (one optimizer step per window of batch_size x gradient_accumulation_steps prompts):
a PPO cycle is ppo.epochs x ppo.buffer_size optimizer steps. In the cycle's first buffer_size steps each step rolls
out its own window; the following steps pass over the stored windows again in the same order (epoch 2, 3, ...),
so each window is trained ppo.epochs times, as TRL trains each mini-batch ppo_epochs times. The prompts of the
steps that reuse a rollout are not used (as grpo's num_iterations). Differences from TRL: advantages are whitened
per window (TRL: over all buffer_size windows), the windows are not shuffled between epochs, and the adaptive KL
coefficient is updated after each window's rollout with that window's sample count. train.max_steps counts
optimizer steps: LLaMA-Factory's `max_steps: N` PPO steps are N x ppo_epochs x ppo_buffer_size steps here.

Sampling is seeded from (train.seed, step, process) in a forked RNG, and the KL controller, the running score
moments and the rollout being reused are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.config.schema import PPOConfig, RunConfig
from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.errors import ModelError
from tuneforge.finetune.methods import no_bitsandbytes_layers
from tuneforge.models.valuehead import ValueHead, WithValueHead, find_value_head, hidden_size, load_value_head
from tuneforge.stages.base import (
    Batch,
    LossOutput,
    Row,
    Stage,
    attention_mask,
    decoder_hidden,
    metric,
    model_mask,
    pad,
    unwrap_causal_lm,
    uses_fused_head,
)
from tuneforge.stages.grpo import (
    completion_logps,
    cut_at_stop,
    rollout_mode,
    sample_completions,
    step_seed,
    template_stop_ids,
)
from tuneforge.stages.reference import (
    Reference,
    base_dtype,
    build_reference,
    disable_dropout,
    freeze,
    peft_model,
    use_adapter,
)
from tuneforge.stages.registry import STAGES
from tuneforge.stages.rl_math import AdaptiveKLController, RunningMoments, gae, ppo_losses, ppo_rewards
from tuneforge.train.losses import token_logps

REWARD_ADAPTER = "reward"
LF_SAMPLING = (0.95, 0.7, 50)  # LLaMA-Factory's generating_args defaults: temperature, top_p, top_k
API_TIMEOUT_S = 120.0
API_CHUNK = 64  # texts per score request (our server takes up to 128)
API_KEY_ENV = "TUNEFORGE_REWARD_API_KEY"
TOKEN_FIELDS = ("old_logps", "old_values", "advantages", "returns")
LOSS_METRICS = ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio")


def value_head_of(model: nn.Module) -> ValueHead:
    """The critic's value head inside DDP wrappers."""
    while not hasattr(model, "v_head"):
        model = model.module
    return model.v_head


def logps_and_values(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """log p (logits at temperature 1, as TRL 0.9.6) and value-head values of the completion tokens, both [b, t-1]
    and aligned (position i predicts token i + 1), 0 outside the completions; one forward pass."""
    lm, head = unwrap_causal_lm(model), value_head_of(model)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if uses_fused_head(lm):
        hidden = decoder_hidden(lm, batch)[:, :-1]
        values, _ = token_logps(hidden[keep], lm.get_output_embeddings().weight, labels[keep])
    else:  # heads with soft-capping or scaling: the model's own logits
        out = lm(input_ids=batch["input_ids"], attention_mask=model_mask(batch), output_hidden_states=True,
                 use_cache=False)
        hidden = out.hidden_states[-1][:, :-1]
        values = out.logits[:, :-1][keep].float().log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
    logps = torch.zeros(labels.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)
    return logps, head(hidden) * keep


def last_token_values(lm: nn.Module, head: ValueHead, sequences: list[list[int]], pad_id: int,
                      device: torch.device) -> Tensor:
    """Value-head score at each right-padded sequence's last token, [n] fp32 on the CPU (no gradients)."""
    batch = {"input_ids": pad(sequences, pad_id).to(device), "attention_mask": attention_mask(sequences).to(device)}
    with torch.no_grad():
        hidden = decoder_hidden(unwrap_causal_lm(lm), batch)
        last = batch["attention_mask"].sum(-1) - 1
        return head(hidden[torch.arange(hidden.shape[0], device=device), last]).float().cpu()


def reward_head(folder: Path, hidden: int, what: str) -> ValueHead:
    """The frozen value head saved in `folder` (an adapter or model folder, or a run folder's adapter/ or model/)."""
    found = find_value_head(folder) or find_value_head(folder / "adapter") or find_value_head(folder / "model")
    if found is None:
        raise ModelError(f"{what} {folder} has no value head (value_head.safetensors): the reward model must come "
                         "from stage rm (tuneforge or LLaMA-Factory)")
    head = ValueHead(hidden, 0.0)
    load_value_head(found, head)
    return freeze(head)


def adapter_folder(path: str) -> Path:
    """A LoRA adapter folder, given it or a run folder holding adapter/."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"reward_model.path {path}: no LoRA adapter there (adapter_config.json); give the adapter or "
                         "run folder of an rm run on the same base, or set reward_model.type=full for a model folder")
    return folder


def api_scores(url: str, texts: list[str], api_key: str | None, timeout: float = API_TIMEOUT_S) -> list[float]:
    """Scores of texts from a score server (LLaMA-Factory's or ours: {"model", "messages"} -> {"scores"})."""
    scores: list[float] = []
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for start in range(0, len(texts), API_CHUNK):
        part = texts[start:start + API_CHUNK]
        body = json.dumps({"model": "model", "messages": part}).encode("utf-8")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            hint = " (check reward_model.api_key)" if err.code in (401, 403) else ""
            raise ModelError(f"reward model API {url} answered HTTP {err.code}{hint}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ModelError(f"reward model API {url} cannot be reached ({reason}); is the score server running?") \
                from None
        except json.JSONDecodeError:
            raise ModelError(f"reward model API {url} did not answer JSON; point reward_model.path at a "
                             "/v1/score/evaluation endpoint") from None
        got = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(got, list) or len(got) != len(part) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got):
            raise ModelError(f"reward model API {url} answered without {len(part)} numeric 'scores': "
                             f"{json.dumps(answer)[:300]}")
        scores += [float(v) for v in got]
    return scores


@dataclasses.dataclass
class RewardModel:
    """Where scores come from: the policy with its "reward" adapter, a separate model, or an HTTP score server."""

    kind: str  # lora | full | api
    description: str
    head: ValueHead | None = None
    model: nn.Module | None = None
    url: str | None = None
    api_key: str | None = None

    def score(self, policy: WithValueHead, sequences: list[list[int]], tokenizer: Any, pad_id: int,
              device: torch.device) -> Tensor:
        """One score per (prompt + completion) token sequence, [n] fp32."""
        if self.kind == "api":
            texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in sequences]
            return torch.tensor(api_scores(self.url, texts, self.api_key), dtype=torch.float32)
        if self.kind == "lora":
            with use_adapter(peft_model(policy), REWARD_ADAPTER):
                return last_token_values(policy.pretrained_model, self.head.to(device), sequences, pad_id, device)
        return last_token_values(self.model, self.head.to(device), sequences, pad_id, device)


def build_reward_model(cfg: RunConfig, policy: WithValueHead, device: Any) -> RewardModel:
    """The configured reward model; lora loads the rm adapter beside the policy's (frozen)."""
    from tuneforge.finetune.methods import merge_adapters
    from tuneforge.models.hub import resolve_model_dir
    from tuneforge.models.load import load_model

    rm = cfg.reward_model
    if rm.type == "api":
        return RewardModel("api", f"API {rm.path}", url=rm.path, api_key=rm.api_key or os.environ.get(API_KEY_ENV))
    hidden = hidden_size(policy.pretrained_model)
    if rm.type == "lora":
        folder = adapter_folder(rm.path)
        head = reward_head(folder, hidden, "reward_model.path")
        with no_bitsandbytes_layers(policy):
            peft_model(policy).load_adapter(str(folder), adapter_name=REWARD_ADAPTER, is_trainable=False)
        return RewardModel("lora", f"adapter {folder} on the policy's base", head=head)
    model_cfg = dataclasses.replace(cfg.model, path=rm.path, adapter_path=[], quantization_bit=rm.quantization_bit)
    model = load_model(model_cfg, dtype=base_dtype(policy))
    if rm.adapters:
        model = merge_adapters(model, rm.adapters)
    source = Path(rm.adapters[-1]) if rm.adapters else resolve_model_dir(model_cfg)
    head = reward_head(source, hidden_size(model), "reward model")
    model = freeze(model if rm.quantization_bit else model.to(device))
    extra = f" + {', '.join(rm.adapters)}" if rm.adapters else ""
    return RewardModel("full", f"separate model {rm.path}{extra}", head=head, model=model)


@STAGES.register("ppo")
class PPOStage(Stage):
    """Clipped PPO policy and value losses on sampled completions scored by a reward model."""

    name = "ppo"
    data_kind = "prompt"
    columns = ("input_ids", "prompt", "columns")
    progress_metrics = {"reward": "reward", "kl": "kl", "response_length": "len"}

    def __init__(self, pad_id: int, settings: PPOConfig | None = None, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.settings = settings or PPOConfig()
        self.run = run or RunConfig()
        self.reference: Reference | None = None
        self.reward: RewardModel | None = None
        self.tokenizer: Any = None
        self.template: Any = None
        self.head_source: str | None = None
        s = self.settings
        self.kl = AdaptiveKLController(s.init_kl_coef, s.target, s.horizon)
        self.moments = RunningMoments()
        self.step = 0  # optimizer steps so far (checkpointed)
        self.windows: list[dict[str, Any]] = []  # this cycle's rollouts: {"micro": [[row]], "metrics": {...}}
        self.current: dict[str, list[float]] = {}
        self.emit_rollout_metrics = False

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> PPOStage:
        return cls(pad_id, cfg.ppo, cfg)

    @property
    def sampling(self) -> tuple[float, float, int]:
        """(temperature, top_p, top_k): the generation section's when it samples (temperature > 0), else
        LLaMA-Factory's generation defaults 0.95, 0.7, 50 (PPO needs sampling)."""
        gen = self.run.generation
        return (gen.temperature, gen.top_p, gen.top_k) if gen.temperature > 0 else LF_SAMPLING

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Value head (the critic: loaded from the starting adapter or model if it has one), reference, reward model."""
        from tuneforge.models.hub import resolve_model_dir
        from tuneforge.models.load import load_tokenizer
        from tuneforge.templates import get_template

        data = self.run.data
        self.tokenizer = load_tokenizer(self.run.model)
        self.template = get_template(data.template, self.tokenizer, data.default_system, data.enable_thinking,
                                     data.tool_format)
        head = ValueHead(hidden_size(model), 0.0)
        source = Path(self.run.model.adapter_path[-1]) if self.run.model.adapter_path else \
            resolve_model_dir(self.run.model)
        found = find_value_head(source)
        if found:
            load_value_head(found, head)
        self.head_source = str(found) if found else None
        wrapped = WithValueHead(model, head)
        disable_dropout(wrapped)
        self.reference = build_reference(self.run, wrapped, acc.device)
        self.reward = build_reward_model(self.run, wrapped, acc.device)
        return wrapped

    def describe(self) -> str:
        """One line for the plan: schedule, reward model, sampling, reference."""
        s, t = self.settings, self.run.train
        temperature, top_p, top_k = self.sampling
        ref = self.reference.description if self.reference else "-"
        reward = self.reward.description if self.reward else self.run.reward_model.path
        critic = f"loaded from {self.head_source}" if self.head_source else "new"
        prompts = t.batch_size * t.gradient_accumulation_steps
        return (f"ppo: {s.epochs} epochs x {s.buffer_size} windows per rollout ({s.epochs * s.buffer_size} optimizer "
                f"steps), {prompts} prompts per window and process, up to {self.run.generation.max_new_tokens} new "
                f"tokens each (temperature {temperature:g}, top_p {top_p:g}, top_k {top_k}); kl_coef "
                f"{s.init_kl_coef:g} -> target {s.target:g}; reward model ({self.run.reward_model.type}): {reward}; "
                f"value head {critic}; reference: {ref}")

    def rollout_shape(self, batch_size: int, longest_prompt: int) -> tuple[int, int]:
        """Rows and longest row of a forward pass over a rollout (the plan's memory estimate): one completion of
        up to max_new_tokens per prompt."""
        return batch_size, longest_prompt + self.run.generation.max_new_tokens

    def reward_model(self) -> nn.Module | None:
        """The separately loaded reward model (reward_model.type=full), for the plan's memory."""
        return self.reward.model if self.reward is not None else None

    # ------------------------------------------------------------------------------------------------ rollout

    def prepare_step(self, model: nn.Module, parts: list[list[Row]], acc: Any) -> list[list[Row]]:
        """The rows this step trains on: a new rollout of these prompts (the cycle's first pass) or a stored one."""
        s = self.settings
        position = self.step % (s.epochs * s.buffer_size)
        index = position % s.buffer_size
        if position == 0:
            self.windows = []
        if index >= len(self.windows):  # first pass over this window (or a run resumed without it)
            seed = step_seed(self.run.train.seed, self.step, acc.process_index)
            self.windows.append(self.make_window(model, parts, acc, seed))
        window = self.windows[index]
        self.step += 1
        self.current = window["metrics"]
        self.emit_rollout_metrics = True
        return window["micro"]

    def eval_step(self, model: nn.Module, rows: list[Row], acc: Any, index: int) -> \
            tuple[list[Row], dict[str, Tensor]]:
        """One completion per validation prompt (seeded by the batch's index, so every evaluation samples alike),
        scored: eval_reward, eval_kl, eval_response_length and the losses at the rollout (eval_value_loss: the
        critic's error). The KL controller and the running score moments are left as they are."""
        seed = step_seed(self.run.train.seed, -1 - index, acc.process_index)
        window = self.make_window(model, [rows], acc, seed, training=False)
        return window["micro"][0], {name: metric(total, count) for name, (total, count) in window["metrics"].items()}

    def make_window(self, model: nn.Module, parts: list[list[Row]], acc: Any, seed: int,
                    training: bool = True) -> dict[str, Any]:
        """Generate, score, then old log-probs and values, reference log-probs, rewards, advantages and returns.
        Evaluation (training False) neither updates the KL controller nor the score moments."""
        s, gen = self.settings, self.run.generation
        temperature, top_p, top_k = self.sampling
        stop_ids = template_stop_ids(self.tokenizer, self.template)
        prompts = [r for part in parts for r in part]
        started = time.perf_counter()
        with rollout_mode(model, seed) as device:
            outputs: list[list[int]] = []
            for part in parts:
                outputs += sample_completions(model.pretrained_model, [r["input_ids"] for r in part], self.pad_id,
                                              stop_ids, max_new_tokens=gen.max_new_tokens, temperature=temperature,
                                              top_p=top_p, top_k=top_k, repetition_penalty=gen.repetition_penalty)
            completions, _ = cut_at_stop(outputs, stop_ids)
            generation_s = time.perf_counter() - started
            sequences = [list(p["input_ids"]) + c for p, c in zip(prompts, completions)]
            scores = self.reward.score(model, sequences, self.tokenizer, self.pad_id, device)
            rows = [{"input_ids": seq, "labels": [IGNORE_INDEX] * len(p["input_ids"]) + c}
                    for p, seq, c in zip(prompts, sequences, completions)]
            logps, values, ref_logps = [], [], []
            start = 0
            for part in parts:
                chunk = rows[start:start + len(part)]
                start += len(part)
                batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
                keep = batch["labels"][:, 1:] != IGNORE_INDEX
                lp, v = logps_and_values(model, batch)
                with self.reference.active(model) as ref_model:
                    ref = completion_logps(ref_model, batch, 1.0)
                for i, m in enumerate(keep):
                    logps.append(lp[i][m].float().cpu())
                    values.append(v[i][m].float().cpu())
                    ref_logps.append(ref[i][m].float().cpu())
        lengths = [len(c) for c in completions]
        mask = torch.tensor([[1.0] * n + [0.0] * (max(lengths) - n) for n in lengths])

        def grid(seqs: list[Tensor]) -> Tensor:
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)

        lp, v, ref = grid(logps), grid(values), grid(ref_logps)
        used = scores
        if s.score_norm:
            if training:
                self.moments.update(self.gather(acc, scores))
            used = self.moments.normalize(scores)
        kl_coef = self.kl.value
        rewards = ppo_rewards(used, lp, ref, mask, kl_coef)
        advantages, returns = gae(rewards, v, mask, s.gamma, s.lam, s.whiten_rewards)
        seq_kl = ((lp - ref) * mask).sum(1)
        if training:
            all_kl = self.gather(acc, seq_kl)
            self.kl.update(float(all_kl.mean()), all_kl.numel())
        for i, (row, n) in enumerate(zip(rows, lengths)):
            for key, values_ in zip(TOKEN_FIELDS, (lp, v, advantages, returns)):
                row[key] = values_[i, :n].tolist()
        micro, start = [], 0
        for part in parts:
            micro.append(rows[start:start + len(part)])
            start += len(part)
        n = float(len(rows))
        metrics = {"reward": [float(scores.sum()), n], "kl": [float(seq_kl.sum()), n], "kl_coef": [kl_coef, 1.0],
                   "response_length": [float(sum(lengths)), n]}
        if s.score_norm:
            metrics["reward_normalized"] = [float(used.sum()), n]
        metrics["timing/generation_s"] = [generation_s, 1.0]
        metrics["timing/rollout_s"] = [time.perf_counter() - started, 1.0]
        return {"micro": micro, "metrics": metrics}

    @staticmethod
    def gather(acc: Any, values: Tensor) -> Tensor:
        """values of every process, concatenated (this process's alone when there is one)."""
        if acc is None or acc.num_processes == 1:
            return values
        return acc.gather(values.to(acc.device)).cpu()

    # --------------------------------------------------------------------------------------------- training

    def units(self, rows: list[Row]) -> int:
        """Completions: each forward pass's token-mean losses count with its number of rows."""
        return len(rows)

    def collate(self, rows: list[Row]) -> Batch:
        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": pad(ids, self.pad_id), "attention_mask": attention_mask(ids)}
        if "labels" not in rows[0]:  # prompt rows (before a rollout)
            return batch
        labels = pad([r["labels"] for r in rows], IGNORE_INDEX)
        batch["labels"] = labels
        keep = labels[:, 1:] != IGNORE_INDEX
        for key in TOKEN_FIELDS:
            if key in rows[0]:
                values = torch.tensor([v for r in rows for v in r[key]], dtype=torch.float32)
                batch[key] = torch.zeros(keep.shape).masked_scatter(keep, values)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """pg + vf_coef * vf (token means over the completions) of this forward pass, weighted by its rows."""
        s = self.settings
        logps, values = logps_and_values(model, batch)
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        loss, extras = ppo_losses(logps, batch["old_logps"], values, batch["old_values"], batch["advantages"],
                                  batch["returns"], mask, cliprange=s.cliprange, cliprange_value=s.cliprange_value,
                                  vf_coef=s.vf_coef, ratio_threshold=s.ratio_threshold)
        n = batch["input_ids"].shape[0]
        metrics = {name: metric(extras[name] * n, n) for name in LOSS_METRICS}
        for name, (total, count) in self.current.items():  # once per step and process
            emit = self.emit_rollout_metrics
            metrics[name] = metric(total if emit else 0.0, count if emit else 0.0)
        self.emit_rollout_metrics = False
        return LossOutput(loss * n, torch.tensor(n), metrics)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Step counter, KL controller, running score moments, and the cycle's rollouts while they are reused."""
        s = self.settings
        reused = self.step % (s.epochs * s.buffer_size) != 0
        return {"step": self.step, "kl": self.kl.state_dict(), "moments": self.moments.state_dict(),
                "windows": self.windows if reused else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])
        if "moments" in state:
            self.moments.load_state_dict(state["moments"])
        self.windows = state.get("windows") or []
