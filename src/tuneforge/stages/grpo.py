"""Stage grpo: group relative policy optimisation with reward functions (TRL's GRPOTrainer, inside our own loop).

Each optimizer step rolls out: the step's prompts (data kind "prompt") get num_generations completions each from
the policy itself (adapters on, KV cache, left padding, the template's stop words, the generation section's
sampling), the completions are scored by the reward functions (TRL's signature, extra dataset columns passed
through), rewards become group-relative advantages, and the clipped surrogate (+ beta * k3 KL against the
reference) is trained over the completion tokens only. The loop receives the completion rows from
`prepare_step` and batches, normalises and reduces them like any other stage's rows.

Sampling is seeded from (train.seed, step, process) in a forked RNG, so a resumed run generates exactly what the
uninterrupted one did; with num_iterations > 1 the rollout (with its old log-probs) is kept in the checkpoint.
Log-probs use logits / temperature, as TRL does, so the ratio and KL see the sampling distribution.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.config.schema import GRPOConfig, RunConfig
from tuneforge.data.encode import IGNORE_INDEX
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
from tuneforge.stages.reference import Reference, build_reference, disable_dropout
from tuneforge.stages.registry import STAGES
from tuneforge.stages.rl_math import group_advantages, grpo_reduce, grpo_token_loss, masked_sum_count
from tuneforge.train.losses import token_logps

COMPLETIONS_FILE = "completions.jsonl"


def completion_logps(model: nn.Module, batch: Batch, temperature: float) -> Tensor:
    """log p of every trained (completion) token under logits / temperature, as a [b, t-1] tensor (0 elsewhere);
    the fused chunked head is used where the model allows (hidden / T gives logits / T)."""
    lm = unwrap_causal_lm(model)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if uses_fused_head(lm):
        hidden = decoder_hidden(lm, batch)[:, :-1][keep] / temperature
        values, _ = token_logps(hidden, lm.get_output_embeddings().weight, labels[keep])
    else:
        logits = lm(input_ids=batch["input_ids"], attention_mask=model_mask(batch),
                    use_cache=False).logits[:, :-1][keep].float() / temperature
        values = logits.log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
    out = torch.zeros(labels.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(keep, values)


def step_seed(seed: int, step: int, process: int) -> int:
    """The sampling seed of one step on one process (independent of how the run was interrupted)."""
    return int(hashlib.sha256(f"grpo:{seed}:{step}:{process}".encode()).hexdigest()[:15], 16)


@contextlib.contextmanager
def rollout_mode(model: nn.Module, seed: int) -> Iterator[torch.device]:
    """Eval mode, no gradients and a forked RNG seeded with `seed` for a rollout; yields the model's device.
    Training mode is restored (and the CUDA cache emptied) afterwards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield device
    finally:
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class NucleusFromTopK:
    """Top-p filtering (transformers' TopPLogitsWarper: drop the least likely tokens whose probabilities sum to at
    most 1 - top_p, keep at least one) that looks at the `k` most likely tokens first.

    transformers sorts the whole vocabulary at every decode step (~19 ms for 16 rows of SmolLM2's 49,152 tokens
    on a CPU, 15% of a GRPO rollout); the nucleus of a sampled language model almost always lies within its few
    hundred most likely tokens. Where the top k hold at least top_p of a row's probability, every token outside
    them is dropped by transformers' rule too, and the rule is applied to the k alone; only the other rows are
    sorted whole. Same kept set, up to float rounding at the boundary (the sums are taken in another order) and
    the choice among exactly tied tokens there, which either order makes arbitrarily."""

    def __init__(self, top_p: float, k: int = 1024):
        from transformers.generation.logits_process import TopPLogitsWarper

        self.top_p, self.k = float(top_p), k
        self.full_sort = TopPLogitsWarper(top_p)  # for the rows whose nucleus reaches past the top k

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        k = min(self.k, scores.shape[-1])
        logz = scores.logsumexp(dim=-1, keepdim=True)
        top, index = scores.topk(k, dim=-1)  # descending
        probs = (top - logz).exp()
        # ascending cumulative probability of each kept candidate = 1 - the mass of the more likely ones before it
        before = probs.cumsum(-1) - probs
        remove = (1 - before) <= (1 - self.top_p)
        remove[:, 0] = False  # keep at least one
        out = torch.full_like(scores, -float("inf")).scatter(-1, index, top.masked_fill(remove, -float("inf")))
        wide = (probs.sum(-1) < self.top_p).nonzero().squeeze(-1)  # rows whose nucleus reaches past the top k
        if wide.numel():
            out[wide] = self.full_sort(input_ids, scores[wide])  # (it reads only the scores)
        return out


def sample_completions(model: nn.Module, prompts: list[list[int]], pad_id: int, stop_ids: list[int], *,
                       max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                       repetition_penalty: float) -> list[list[int]]:
    """One sampled continuation per prompt (left-padded into one batch, KV cache), as raw generated ids."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    nucleus = 0 < top_p < 1  # (applied after temperature and top-k, where transformers applies its own)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_p=1.0 if nucleus else top_p, top_k=top_k or None,
                         repetition_penalty=repetition_penalty, pad_token_id=pad_id, eos_token_id=stop_ids,
                         use_cache=True,
                         logits_processor=LogitsProcessorList([NucleusFromTopK(top_p)] if nucleus else []))
    result = out[:, longest:].tolist()
    del out, input_ids, mask
    return result


def cut_at_stop(outputs: list[list[int]], stop_ids: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Each generated sequence up to and including its first stop id, and whether it had none (truncated)."""
    stops = set(stop_ids)
    completions, truncated = [], []
    for ids in outputs:
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        completions.append(ids if end is None else ids[: end + 1])
        truncated.append(end is None)
    return completions, truncated


def template_stop_ids(tokenizer: Any, template: Any) -> list[int]:
    """The template's single-token stop words and eos (as chat generation uses them)."""
    from tuneforge.chat.engine import ChatEngine

    return ChatEngine(None, tokenizer, template, None).stop_ids()


def decode_completion(tokenizer: Any, template: Any, ids: list[int]) -> str:
    """Completion text: no special tokens, cut at the template's stop words."""
    from tuneforge.chat.engine import cut_at_stop_words

    text = tokenizer.decode(ids, skip_special_tokens=True)
    return "".join(cut_at_stop_words(iter([text]), template.stop_words))


@STAGES.register("grpo")
class GRPOStage(Stage):
    """Clipped policy-gradient loss on sampled completions with group-normalised reward advantages."""

    name = "grpo"
    data_kind = "prompt"
    columns = ("input_ids", "prompt", "columns")
    progress_metrics = {"reward": "reward", "reward_std": "r_std", "completions/mean_length": "len"}

    def __init__(self, pad_id: int, settings: GRPOConfig | None = None, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.settings = settings or GRPOConfig()
        self.run = run or RunConfig()
        self.reference: Reference | None = None
        self.rewards: Any = None  # tuneforge.rewards.RewardSet, built in setup
        self.tokenizer: Any = None
        self.template: Any = None
        self.step = 0  # optimizer steps rolled out so far (checkpointed)
        self.rollout: list[list[Row]] | None = None  # the current rollout's micro-batches (num_iterations > 1)
        self.rollout_metrics: dict[str, float | None] = {}
        self.emit_rollout_metrics = False

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> GRPOStage:
        return cls(pad_id, cfg.grpo, cfg)

    @property
    def temperature(self) -> float:
        """Sampling temperature: generation.temperature, or 1.0 (TRL's default) when that is 0 (greedy)."""
        return self.run.generation.temperature or 1.0

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Dropout off; tokenizer and template for generation; the reward functions; a reference only if beta > 0."""
        from tuneforge.models.load import load_tokenizer
        from tuneforge.rewards import RewardSet
        from tuneforge.templates import get_template

        disable_dropout(model)
        data = self.run.data
        self.tokenizer = load_tokenizer(self.run.model)
        self.template = get_template(data.template, self.tokenizer, data.default_system, data.enable_thinking,
                                     data.tool_format)
        self.stop_token_ids = template_stop_ids(self.tokenizer, self.template)
        s = self.settings
        self.rewards = RewardSet(s.reward_funcs, s.reward_weights or None)
        if s.beta > 0:
            self.reference = build_reference(self.run, model, acc.device)
        return model

    def describe(self) -> str:
        """One line for the plan, with the rollout size of a step."""
        s, t = self.settings, self.run.train
        prompts = t.batch_size * t.gradient_accumulation_steps
        ref = self.reference.description if self.reference else "none (beta 0)"
        return (f"grpo {s.loss_type}, {s.num_generations} completions per prompt, epsilon {s.epsilon:g}/"
                f"{s.epsilon_high if s.epsilon_high is not None else s.epsilon:g}, beta {s.beta:g}, scale_rewards "
                f"{s.scale_rewards}, temperature {self.temperature:g}; rollout per step and process: {prompts} "
                f"prompts x {s.num_generations} = {prompts * s.num_generations} completions, up to "
                f"{prompts * s.num_generations * s.max_completion_length:,} generated tokens; reference: {ref}")

    def rollout_shape(self, batch_size: int, longest_prompt: int) -> tuple[int, int]:
        """Rows and longest row of a forward pass over a rollout (the plan's memory estimate): batch x G
        completions of up to the longest prompt + max_completion_length tokens."""
        return batch_size * self.settings.num_generations, longest_prompt + self.settings.max_completion_length

    # ------------------------------------------------------------------------------------------------ rollout

    def prepare_step(self, model: nn.Module, parts: list[list[Row]], acc: Any) -> list[list[Row]]:
        """The completion rows this step trains on: a fresh rollout of these prompts, or (num_iterations > 1)
        the current rollout again."""
        s = self.settings
        if self.rollout is None or self.step % s.num_iterations == 0:
            seed = step_seed(self.run.train.seed, self.step, acc.process_index)
            self.rollout, self.rollout_metrics = self.make_rollout(model, parts, acc, seed)
        self.step += 1
        self.emit_rollout_metrics = True
        return self.rollout

    def eval_step(self, model: nn.Module, rows: list[Row], acc: Any, index: int) -> \
            tuple[list[Row], dict[str, Tensor]]:
        """num_generations completions of each validation prompt (seeded by the batch's index, so every evaluation
        samples alike), scored: eval_reward, eval_rewards/<fn>/mean ... and the loss at the rollout."""
        seed = step_seed(self.run.train.seed, -1 - index, acc.process_index)
        micro, values = self.make_rollout(model, [rows], acc, seed, training=False)
        return micro[0], {name: metric(v, 1.0) for name, v in values.items() if v is not None}

    def make_rollout(self, model: nn.Module, parts: list[list[Row]], acc: Any, seed: int, training: bool = True) \
            -> tuple[list[list[Row]], dict[str, float | None]]:
        """Generate, score, compute advantages (and old / reference log-probs where needed): the micro-batches
        of completion rows and the rollout's metrics. Evaluation (training False) logs no completions and keeps
        batch-scaled advantages to this process (its batches are not in step with the others')."""
        s = self.settings
        g = s.num_generations
        generated: list[list[list[int]]] = []
        started = time.perf_counter()
        with rollout_mode(model, seed) as device:
            for part in parts:
                generated.append(self.generate(model, [r["input_ids"] for r in part], device))
        prompts = [r for part in parts for r in part]
        outputs = [ids for part in generated for ids in part]  # [P * G] raw generated ids
        completions, truncated = cut_at_stop(outputs, self.stop_ids())
        generation_s = time.perf_counter() - started
        texts = [self.decode(ids) for ids in completions]
        repeated = [p for p in prompts for _ in range(g)]
        columns = self.columns_of(repeated)
        rewards, per_function, names = self.rewards([r["prompt"] for r in repeated], texts, completions, columns)
        if s.scale_rewards == "batch" and acc.num_processes > 1 and training:  # the std of every process's rewards
            everything = acc.gather(rewards.to(acc.device)).cpu()
            start = acc.process_index * rewards.numel()
            advantages = group_advantages(everything, g, "batch")[start:start + rewards.numel()]
        else:
            advantages = group_advantages(rewards, g, s.scale_rewards)
        values = self.metrics_of(rewards, per_function, names, completions, truncated)
        rows = [{"input_ids": list(p["input_ids"]) + c, "labels": [IGNORE_INDEX] * len(p["input_ids"]) + c,
                 "advantage": float(a), "truncated": t}
                for p, c, a, t in zip(repeated, completions, advantages.tolist(), truncated)]
        micro, start = [], 0
        for part in parts:
            micro.append(rows[start:start + len(part) * g])
            start += len(part) * g
        if s.num_iterations > 1 or s.beta > 0:
            self.add_fixed_logps(model, micro, device)
        if training:
            self.log_completions(acc, repeated, texts, rewards, per_function, names, advantages)
        values["timing/generation_s"] = generation_s
        values["timing/rollout_s"] = time.perf_counter() - started
        return micro, values

    def generate(self, model: nn.Module, prompts: list[list[int]], device: torch.device) -> list[list[int]]:
        """G sampled continuations of each prompt (repeated contiguously), left-padded into one batch."""
        g, gen = self.settings.num_generations, self.run.generation
        seqs = [p for p in prompts for _ in range(g)]
        return sample_completions(model, seqs, self.pad_id, self.stop_ids(),
                                  max_new_tokens=self.settings.max_completion_length, temperature=self.temperature,
                                  top_p=gen.top_p, top_k=gen.top_k, repetition_penalty=gen.repetition_penalty)

    def stop_ids(self) -> list[int]:
        """The template's single-token stop words and eos (as chat generation uses them; found once, at setup)."""
        return self.stop_token_ids

    def decode(self, ids: list[int]) -> str:
        """Completion text for reward functions: no special tokens, cut at the template's stop words."""
        return decode_completion(self.tokenizer, self.template, ids)

    @staticmethod
    def columns_of(rows: list[Row]) -> dict[str, list[Any]]:
        """Every extra dataset column, aligned with the completions (None where a row lacks it)."""
        values = [json.loads(r["columns"]) if r.get("columns") else {} for r in rows]
        names = sorted({k for v in values for k in v})
        return {name: [v.get(name) for v in values] for name in names}

    def metrics_of(self, rewards: Tensor, per_function: Tensor, names: list[str], completions: list[list[int]],
                   truncated: list[bool]) -> dict[str, float | None]:
        """The rollout's reward and length metrics (TRL's names); None where undefined (e.g. std of one value)."""
        from tuneforge.rewards import reward_metrics

        out: dict[str, float | None] = dict(reward_metrics(rewards, per_function, names, self.settings.num_generations,
                                                           self.settings.scale_rewards))
        lengths = [len(c) for c in completions]
        out["completions/mean_length"] = sum(lengths) / len(lengths)
        out["completions/min_length"] = float(min(lengths))
        out["completions/max_length"] = float(max(lengths))
        out["completions/clipped_ratio"] = sum(truncated) / len(truncated)
        return {k: (None if v is None or math.isnan(v) else v) for k, v in out.items()}

    def add_fixed_logps(self, model: nn.Module, micro: list[list[Row]], device: torch.device) -> None:
        """Old (num_iterations > 1) and reference (beta > 0) log-probs of each completion token, at rollout."""
        s = self.settings
        with torch.no_grad():
            for rows in micro:
                batch = {k: v.to(device) for k, v in self.collate(rows).items()}
                keep = batch["labels"][:, 1:] != IGNORE_INDEX
                if s.num_iterations > 1:
                    old = completion_logps(model, batch, self.temperature)
                    for row, values, m in zip(rows, old, keep):
                        row["old_logps"] = values[m].tolist()
                if s.beta > 0:
                    with self.reference.active(model) as ref_model:
                        ref = completion_logps(ref_model, batch, self.temperature)
                    for row, values, m in zip(rows, ref, keep):
                        row["ref_logps"] = values[m].tolist()

    def log_completions(self, acc: Any, prompts: list[Row], texts: list[str], rewards: Tensor, per_function: Tensor,
                        names: list[str], advantages: Tensor) -> None:
        """A few sampled completions with their rewards, appended to <run>/completions.jsonl (main process)."""
        s = self.settings
        every = s.completions_log_steps or self.run.train.logging_steps
        if not acc.is_main_process or not s.completions_logged or (self.step + 1) % every:
            return
        lines = []
        for i in range(min(s.completions_logged, len(texts))):
            scores = {n: (None if math.isnan(v) else v) for n, v in zip(names, per_function[i].tolist())}
            lines.append(json.dumps({"step": self.step + 1, "prompt": prompts[i]["prompt"], "completion": texts[i],
                                     "reward": float(rewards[i]), "rewards": scores,
                                     "advantage": float(advantages[i])}, ensure_ascii=False))
        path = self.completions_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def completions_path(self) -> Path:
        """<run>/completions.jsonl (the folder the loop trains in: a scratch folder when --plan measures steps)."""
        return (self.run_dir or Path(self.run.output.dir)) / COMPLETIONS_FILE

    # --------------------------------------------------------------------------------------------- training

    def units(self, rows: list[Row]) -> int:
        """What the loss type averages over: completions (grpo), N x max_completion_length (dr_grpo) or
        completion tokens that are trained (bnpo, dapo)."""
        if not rows or "advantage" not in rows[0]:  # prompt rows (before a rollout)
            return len(rows)
        s = self.settings
        if s.loss_type == "grpo":
            return len(rows)
        if s.loss_type == "dr_grpo":
            return len(rows) * s.max_completion_length
        masked = s.mask_truncated_completions
        return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows if not (masked and r["truncated"]))

    def collate(self, rows: list[Row]) -> Batch:
        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": pad(ids, self.pad_id), "attention_mask": attention_mask(ids)}
        if "advantage" not in rows[0]:
            return batch
        labels = pad([r["labels"] for r in rows], IGNORE_INDEX)
        batch.update(labels=labels, advantages=torch.tensor([r["advantage"] for r in rows]),
                     truncated=torch.tensor([bool(r["truncated"]) for r in rows]))
        keep = labels[:, 1:] != IGNORE_INDEX
        for key in ("old_logps", "ref_logps"):
            if key in rows[0]:
                values = torch.tensor([v for r in rows for v in r[key]], dtype=torch.float32)
                batch[key] = torch.zeros(keep.shape).masked_scatter(keep, values)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Summed clipped surrogate (+ beta k3 KL) over the completion tokens, normalised by the loss type."""
        s = self.settings
        logps = completion_logps(model, batch, self.temperature)  # [b, t-1]
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        if s.mask_truncated_completions:
            mask = mask * (~batch["truncated"]).float()[:, None]
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        eps_high = s.epsilon_high if s.epsilon_high is not None else s.epsilon
        per_token, extras = grpo_token_loss(logps, old, batch["advantages"].to(logps.dtype), mask,
                                            epsilon_low=s.epsilon, epsilon_high=eps_high, beta=s.beta,
                                            ref_logps=batch.get("ref_logps"))
        loss_sum, units = grpo_reduce(per_token, mask, s.loss_type, s.max_completion_length)
        metrics = {f"clip_ratio/{k.removeprefix('clip_')}_mean": metric(*masked_sum_count(extras[k], mask))
                   for k in ("clip_low", "clip_high", "clip_region")}
        if "kl" in extras:
            metrics["kl"] = metric(*masked_sum_count(extras["kl"], mask))
        for name, value in self.rollout_metrics.items():  # once per step and process: counted 1 when defined
            emit = self.emit_rollout_metrics and value is not None
            metrics[name] = metric(value if emit else 0.0, 1.0 if emit else 0.0)
        self.emit_rollout_metrics = False
        return LossOutput(loss_sum, torch.tensor(units), metrics)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The step counter, and the rollout being reused when num_iterations > 1."""
        keep = self.settings.num_iterations > 1 and self.step % self.settings.num_iterations != 0
        return {"step": self.step, "rollout": self.rollout if keep else None,
                "rollout_metrics": self.rollout_metrics if keep else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter (and rollout); completions logged after the checkpoint's step are dropped."""
        self.step = int(state.get("step", 0))
        self.rollout = state.get("rollout")
        self.rollout_metrics = state.get("rollout_metrics") or {}
        path = self.completions_path()
        if path.is_file() and os.environ.get("RANK", "0") == "0":
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
