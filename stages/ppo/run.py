"""PPO (InstructGPT step 3): optimise the SFT policy against the reward model with a KL penalty.

Recipe (`main`, top to bottom): parse -> parents (SFT policy, reward model: `load_parents`) -> prompts
(`load_prompt_sets`) -> models (policy, reference, critic, reward: `load_models`) -> optimizer and accelerate
(`prepare`) -> resume -> PPO updates -> evaluate, save, manifest (`finish`). Each update generates a trajectory,
then takes the PPO step:

    `rollout`      (1) generate   (2) truncate after EOS   (3) score   (4) log-probs and values
                   (5) KL-shaped rewards   (6) GAE advantages  -> one `Rollout` batch
    `guards`       a non-finite value or a runaway KL stops the run before it learns from the batch
    `ppo_update`   (7) PPO epochs of clipped policy + value updates (`ppo_step` per micro-batch)
    `update_metrics`, logged; a resumable checkpoint now and then.

The tensor math is in stages/ppo/math.py.

Published details followed (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024 "The N+
implementation details of RLHF with PPO", cited as N+): pad token distinct from EOS, left-padded
generation, dropout off everywhere, logits / temperature, truncation after EOS with a fixed score for
responses that never end, per-token KL penalty (fixed or adaptive), reward at the last token, critic
initialised from the reward model, GAE, whitened advantages, clipped policy and value losses.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)
from transformers.cache_utils import DynamicCache

from data.formats.prompts import prompt_of
from data.formats.text import load_texts
from data.loading import load_records
from data.tokenizer import template_accepts
from pipeline.config import config_dict, parse_config
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import chat_ids, left_pad, position_ids
from pipeline.lora import lora_config
from pipeline.packing import document_stream, packs_sequences
from pipeline.runtime import (
    configure_deepspeed,
    load_checkpoint,
    merged_from_state_dict,
    one_entry_per_parameter,
    peak_memory_mb,
    precision_facts,
    precision_line,
    progress,
    rank_checksums,
    save_checkpoint,
    setup,
)
from pipeline.stage import StageRun, require_stage, trains_on_world, write_text_atomic
from pipeline.stats import mean
from pipeline.tracking import Tracker
from reward.judging import Answers, RewardModelJudge, WorldJudge, judge_answers, judge_policies, summarize
from reward.model import load_reward_model, reward_offset
from reward.rules import RewardFunction
from stages.ppo.advantages import group_advantages, k3_kl, minus_group_mean, reinforce_pp_advantages
from stages.ppo.config import PPOConfig
from stages.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    apply_no_eos_penalty,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_shaped_rewards,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    sample_categorical,
    truncate_after_eos,
    value_loss,
    whiten,
)
from world.judge import GoldJudge

# Prompts held out of training when PPO trains on a prompt set of your own; the manifest names the file.
HELD_OUT_FILE = "heldout_prompts.jsonl"

# ---- batch sizes and prompts --------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSizes:
    per_process: int  # episodes each process generates per update
    minibatch: int  # episodes per optimizer step, per process
    micro: int  # episodes per forward/backward (gradient accumulation splits a minibatch)
    group: int = 1  # answers sampled per prompt, next to each other on one process


def batch_sizes(
    rollout_batch_size: int, num_minibatches: int, gradient_accumulation: int, processes: int, group: int = 1
) -> BatchSizes:
    """Derive every batch size once, from the global rollout size, and demand exact division
    (cleanrl / summarize_from_feedback_details): no silently dropped or repeated episodes. A prompt's
    group of answers stays on one process, so its baseline needs no communication."""
    if rollout_batch_size % (group * processes):
        raise PipelineError(
            f"rollout_batch_size {rollout_batch_size} is not divisible by samples_per_prompt {group} "
            f"* processes {processes}"
        )
    if rollout_batch_size % (num_minibatches * processes):
        raise PipelineError(
            f"rollout_batch_size {rollout_batch_size} is not divisible by num_minibatches "
            f"{num_minibatches} * processes {processes}"
        )
    if rollout_batch_size % (num_minibatches * gradient_accumulation * processes):
        raise PipelineError(
            f"rollout_batch_size {rollout_batch_size} is not divisible by num_minibatches "
            f"{num_minibatches} "
            f"* gradient_accumulation {gradient_accumulation} * processes {processes}"
        )
    per_process = rollout_batch_size // processes
    minibatch = per_process // num_minibatches
    return BatchSizes(per_process, minibatch, minibatch // gradient_accumulation, group)


def load_prompts(
    files: list[str], tokenizer, max_prompt_length: int, field: str = "prompt", skip_long: bool = False
) -> tuple[list, list[list[int]], list[dict]]:
    """Prompts, their chat-formatted token ids and their records (a rule reward may read a record's other
    fields: GSM8K's answer); a prompt over max_prompt_length is an error, or
    dropped with `skip_long` (real prompt sets have a long tail: 1 of AlpacaEval's 805 is over 448
    tokens in Llama 3's and Qwen2's vocabularies)."""
    records = load_records(files)
    if not records:
        raise PipelineError(f"{', '.join(files)}: no prompts")
    prompts, ids, kept, long = [], [], [], []
    for rec in records:
        prompt = prompt_of(rec, field)
        with template_accepts(rec["_where"]):
            tokens = chat_ids(tokenizer, prompt)
        if len(tokens) > max_prompt_length:
            if not skip_long:
                raise PipelineError(
                    f"{rec['_where']}: prompt is {len(tokens)} tokens, longer than max_prompt_length "
                    f"{max_prompt_length} (raise it, or set skip_long_prompts true to drop such "
                    "prompts)"
                )
            long.append(rec["_where"])
            continue
        prompts.append(prompt)
        ids.append(tokens)
        kept.append(rec)
    if long:
        PartialState().print(
            f"[ppo] dropped {len(long)} of {len(records)} prompts over max_prompt_length "
            f"{max_prompt_length}, first: {long[0]}",
            flush=True,
        )
    if not prompts:
        raise PipelineError(f"{', '.join(files)}: no prompt fits max_prompt_length {max_prompt_length}")
    return prompts, ids, kept


def hold_out(columns: list[list], n: int, seed: int) -> tuple[list[list], list[list]]:
    """(training rows, held-out rows) of parallel columns (prompts, ids, records): n rows drawn with
    `seed`, the rest in order."""
    held = set(random.Random(seed).sample(range(len(columns[0])), n))
    keep = [i for i in range(len(columns[0])) if i not in held]
    out = sorted(held)
    return [[c[i] for i in keep] for c in columns], [[c[i] for i in out] for c in columns]


@functools.lru_cache(maxsize=4)
def _shuffle(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def prompt_indices(
    n: int, update: int, rollout_batch_size: int, rank: int, per_process: int, seed: int, group: int = 1
) -> list[int]:
    """Prompt p of the run is prompt p of an endless stream of shuffled passes over the prompts; an
    update takes rollout_batch_size / group of them, each process its slice, and each prompt is
    answered `group` times, the copies side by side. A function of the update number, so a resumed
    run sees exactly the prompts the uninterrupted run would have seen."""
    first = (update * rollout_batch_size + rank * per_process) // group
    return [_shuffle(n, seed, p // n)[p % n] for p in range(first, first + per_process // group) for _ in range(group)]


def ptx_batch(stream: torch.Tensor, batch_size: int, length: int, seed: int) -> torch.Tensor:
    """Random pretraining blocks for PPO-ptx, seeded so a resumed run draws the same ones."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (batch_size,), generator=g)
    return stream[starts[:, None] + torch.arange(length)]


# ---- episodes as the models read them ------------------------------------------------------------


@dataclass
class Episodes:
    """Prompt + response episodes for a forward without cache. `seq` [B, P + T] holds left-padded
    prompts then right-padded responses (`resp_mask` [B, T]). The models read them packed - every
    episode's real tokens in one row, position ids restarting (no padding computed at all) - or as
    the padded rows when a model cannot keep packed sequences apart."""

    seq: torch.Tensor
    resp_mask: torch.Tensor
    ids: torch.Tensor  # model input: [1, real tokens] packed, or the padded rows
    mask: torch.Tensor | None  # attention mask of the padded rows; None when packed
    pos: torch.Tensor
    keep: torch.Tensor  # output positions whose outputs predict the response tokens, in [B, T] order
    last: torch.Tensor  # [B] position of each episode's last real token in the flattened output


def episodes(seq: torch.Tensor, seq_mask: torch.Tensor, resp_mask: torch.Tensor, packed: bool) -> Episodes:
    B, L = seq.shape
    P = L - resp_mask.shape[1]
    pos = position_ids(seq_mask)
    end = P + last_token_index(resp_mask)
    if not packed:
        return Episodes(
            seq,
            resp_mask,
            seq,
            seq_mask,
            pos,
            torch.arange(P - 1, L - 1, device=seq.device),
            torch.arange(B, device=seq.device) * L + end,
        )
    real = seq_mask.bool()
    where = real.reshape(-1).cumsum(0).view(B, L) - 1  # each real token's place in the packed row
    # The token before each response token predicts it; where that is padding the target is padding
    # too (masked out of every loss), so any place will do.
    keep = where[:, P - 1 : L - 1].clamp(min=0).reshape(-1)
    return Episodes(
        seq, resp_mask, seq[real][None], None, pos[real][None], keep, where.gather(1, end[:, None]).squeeze(1)
    )


# ---- models -------------------------------------------------------------------------------------


def _is_dropout_rate(name: str) -> bool:
    # attention_dropout (Llama, Qwen2), attn_pdrop (GPT-2), layerdrop (OPT: whole layers skipped in training)
    return any(part in name for part in ("dropout", "pdrop", "layerdrop", "drop_path"))


def without_dropout(path: str):
    """A model's config with every dropout rate 0 (so a saved checkpoint says what was trained)."""
    config = AutoConfig.from_pretrained(path)
    for key, value in config.to_dict().items():
        if _is_dropout_rate(key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def switch_off_dropout(model: nn.Module) -> nn.Module:
    """p = 0 in every dropout module, and 0 in every float dropout rate a module keeps: the config's
    names vary by model (GPT-2's resid_pdrop, embd_pdrop, attn_pdrop), the modules do not."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def load_without_dropout(cls, path: str, **kwargs) -> nn.Module:
    """Dropout off in every model (N+): with dropout the log-probs of the rollout and of the update
    differ for reasons that have nothing to do with the policy changing (train mode, which gradient
    checkpointing needs, would switch it on)."""
    return switch_off_dropout(cls.from_pretrained(path, config=without_dropout(path), **kwargs))


class Critic(nn.Module):
    """Per-token values from a sequence-classification model: its score head on every hidden state
    (the reward model reads the same head at the last token only). Initialised from the reward
    model (InstructGPT), plus the reward's stored normalising offset so values start on its scale."""

    def __init__(self, seq_cls, offset: float = 0.0):
        super().__init__()
        self.body = getattr(seq_cls, seq_cls.base_model_prefix)
        self.head = seq_cls.score
        self.offset = offset

    def forward(self, ep: Episodes) -> torch.Tensor:
        """Values [B, T] of the states before each response token."""
        hidden = self.body(
            input_ids=ep.ids, attention_mask=ep.mask, position_ids=ep.pos, use_cache=False
        ).last_hidden_state
        return self.head(hidden[:, ep.keep]).view(*ep.resp_mask.shape).float() + self.offset


class ActorCritic(nn.Module):
    """Policy and critic as one module: one prepare() wraps both (a DeepSpeed engine takes a single
    model) and one DDP forward/backward syncs both gradients. The training forward of a micro-batch:
    response logits / temperature, values, and the optional PPO-ptx language-modelling loss."""

    def __init__(self, policy: nn.Module, critic: Critic | None):
        super().__init__()
        self.policy, self.critic = policy, critic
        # FSDP's transformer-based wrapping gives each decoder layer its own shard unit, finding the
        # layers by the class names a transformers model lists here; without them this wrapper would
        # be one unit, every weight of both models gathered at once.
        bodies = (policy,) if critic is None else (policy, critic.body)
        self._no_split_modules = sorted(
            {name for m in bodies for name in (getattr(m, "_no_split_modules", None) or [])}
        )

    def forward(self, ep: Episodes, temperature: float, ptx_ids=None):
        """Response logits, values (None without a critic) and the PPO-ptx loss of a micro-batch."""
        logits = response_logits(self.policy, ep, temperature)
        values = self.critic(ep) if self.critic is not None else None
        ptx = (
            self.policy(input_ids=ptx_ids, labels=ptx_ids, use_cache=False).loss
            if ptx_ids is not None
            else torch.zeros((), device=ep.ids.device)
        )
        return logits, values, ptx

    def enter(self) -> None:
        """Nothing. `gathered` registers it as an FSDP2 forward method, so a call runs the pair's
        forward hooks: FSDP2 sets up its root on the first of them, and the rollout calls the policy
        inside the pair directly (its first decoder layer would otherwise become a root of its own)."""


@contextmanager
def gathered(accelerator, model: nn.Module):
    """Full weights on every process for the no-grad passes (generation, reference, values, evaluation).

    Sharded engines (ZeRO-3, FSDP) otherwise all-gather layer by layer in every forward - a collective
    per new token, and a hang as soon as two processes stop sampling at different lengths. Gather the
    prepared model once instead, as rollouts need it anyway. DDP and a single process hold full weights."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        # The engine's per-layer hooks would still gather and release each layer on every forward
        # (a collective per token again); they come off while the weights are whole.
        offload = model.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            offload._remove_module_hooks()
            try:
                yield
            finally:
                offload.forward_hooks, offload.backward_hooks = [], []
                offload.setup_zero_stage3_hooks()
    elif getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if not hasattr(model.enter, "__wrapped__"):  # registered once
            register_fsdp_forward_method(model, "enter")
        model.enter()
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True)
    else:
        yield


@contextmanager
def as_trained(accelerator, model: nn.Module):
    """No-grad passes (rollout, evaluation) on full weights (`gathered`) and at the precision of the
    training forward, which the prepared model runs under accelerator.autocast: the rollout's log-probs
    and values are then what the first minibatch recomputes (ratio 1, N+), and the reference's match
    the policy's while both are the SFT model."""
    with gathered(accelerator, model), accelerator.autocast():
        yield


class EMA:
    """Exponential moving average of the trainable policy weights (InstructGPT); saved instead of
    the raw weights when enabled. state_dict/load_state_dict let accelerate checkpoint it."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def clip_grad_norms_(accelerator, groups: list, bound: float) -> None:
    """Clip each group's gradients (policy, critic) to `bound` on its own. The gradients are unscaled
    once: under fp16 the GradScaler unscales an optimizer once per step, and accelerate's
    clip_grad_norm_ unscales on every call (a second call raises). DeepSpeed's engine clips (to the
    norm of both together: configure_deepspeed) and keeps the gradients to itself."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    accelerator.unscale_gradients()
    for params in groups:
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # FSDP2: each process holds a shard of the gradients
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, bound, norm)


def check_ema_supported(ema_decay: float, zero_stage: int | None) -> None:
    """ZeRO-3 partitions the policy when it is prepared, leaving each parameter's data empty, so an
    EMA of the weights would average nothing and save the raw weights as its own: refuse."""
    if ema_decay > 0 and zero_stage == 3:
        raise PipelineError(
            f"ema_decay {ema_decay} does not work under DeepSpeed ZeRO-3 (the policy's weights are "
            "partitioned): use ZeRO-2 or DDP, or set ema_decay 0"
        )


def with_lora(policy, cfg: PPOConfig):
    """The policy with trainable LoRA adapters (peft); the base weights stay frozen. No dropout on the
    adapters either: rollout and update must compute alike (N+)."""
    from peft import get_peft_model

    return get_peft_model(policy, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, dropout=0.0))


def check_same_tokenizer(policy_tok, reward_tok, sft_path: str, reward_path: str) -> None:
    """The reward model scores the policy's token ids directly, so both must mean the same tokens
    and the same conversation format."""
    if policy_tok.get_vocab() != reward_tok.get_vocab():
        raise PipelineError(
            f"reward model {reward_path} and policy {sft_path} use different tokenizers "
            f"(vocab {len(reward_tok)} vs {len(policy_tok)} tokens or different ids): "
            "train the reward model from this SFT model"
        )
    if policy_tok.chat_template != reward_tok.chat_template:
        raise PipelineError(
            f"reward model {reward_path} and policy {sft_path} use different chat templates: "
            f"the reward model must read conversations as the policy writes them"
        )


@contextmanager
def reference(policy, ref_model):
    """The frozen SFT policy: its own copy, or (LoRA) the policy's backbone with the adapters off,
    so one backbone sits in memory."""
    if ref_model is not None:
        yield ref_model
    else:
        with policy.disable_adapter():
            yield policy


# ---- rollout pieces -----------------------------------------------------------------------------


def sample(
    model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses to left-padded prompts with a KV cache: one forward over the prompts, then
    one single-token forward per new token, stopping when every row has emitted EOS.

    Returns (tokens [B, T], log-probs [B, T] under softmax(logits / temperature)). PPO's "old"
    log-probs come from a full forward instead (rollout step 4): one token at a time under bf16 they
    differ. temperature 0 is greedy. Rows that finished emit padding."""
    # Inference mode, not only no_grad: no autograd bookkeeping on any tensor, a sixth less time per
    # token on a CPU. Its tensors must not meet autograd later, so the results leave as copies.
    with torch.inference_mode():
        pos = position_ids(mask)
        cache = DynamicCache(config=getattr(model, "config", None))
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        tokens, logprobs = [], []
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        next_pos = pos[:, -1:] + 1
        for t in range(max_new_tokens):
            logits = logits.float()
            logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            token = sample_categorical(logp.exp()) if temperature > 0 else logits.argmax(dim=-1)
            logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
            token = token.masked_fill(done, pad_id)
            tokens.append(token)
            done |= token == eos_id
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True
            ).logits[:, -1]
            next_pos = next_pos + 1
        tokens, logprobs = torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
    return tokens.clone(), logprobs.clone()


def response_logits(model, ep: Episodes, temperature: float) -> torch.Tensor:
    """Logits [B, T, V] that predicted each response token, divided by the sampling temperature
    (N+): only the response positions go through the LM head."""
    logits = model(
        input_ids=ep.ids, attention_mask=ep.mask, position_ids=ep.pos, use_cache=False, logits_to_keep=ep.keep
    ).logits
    return logits.view(*ep.resp_mask.shape, -1).float() / temperature


def rollout_logprobs(model, parts: list[Episodes], temperature: float) -> torch.Tensor:
    """Log-probs [B, T] of the response tokens at `temperature`, over a rollout's episodes in parts."""
    return torch.cat(
        [
            logprobs_from_logits(response_logits(model, ep, temperature), ep.seq[:, -ep.resp_mask.shape[1] :])
            for ep in parts
        ]
    )


@torch.no_grad()
def reward_scores(reward_model, ep: Episodes) -> torch.Tensor:
    """The reward model's score head read at each episode's last token (the EOS), plus its stored
    normalising offset (reward stage: demonstrations average 0)."""
    body = getattr(reward_model, reward_model.base_model_prefix)
    hidden = body(input_ids=ep.ids, attention_mask=ep.mask, position_ids=ep.pos, use_cache=False).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[ep.last]
    offset = reward_offset(reward_model.config)
    return reward_model.score(picked).squeeze(-1).float() + offset


def chunks(n: int, size: int) -> list[slice]:
    """[0, n) in slices of `size` (0: one): bounds activation memory of the no-grad rollout
    forwards on big models."""
    size = size or n
    return [slice(i, i + size) for i in range(0, n, size)]


# ---- set-up: parents, prompts, models -----------------------------------------------------------


def load_parents(cfg: PPOConfig) -> tuple[dict, object]:
    """2. The SFT stage's manifest and tokenizer. The reward model must share that tokenizer and chat
    template (it scores the policy's token ids), the pad token must differ from EOS (N+), and a
    prompt and its response must fit the model's context."""
    sft = require_stage(cfg.sft_path, "sft", cfg.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.sft_path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PipelineError(f"{cfg.sft_path}: tokenizer needs a pad token distinct from EOS (N+: separate pad token)")
    if cfg.uses_reward_model or cfg.has_critic:  # a rule reward alone, without a critic, needs no reward stage
        require_stage(cfg.reward_path, "reward", cfg.run_dir)
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(cfg.reward_path), cfg.sft_path, cfg.reward_path)
    max_positions = getattr(AutoConfig.from_pretrained(cfg.sft_path), "max_position_embeddings", None)
    if max_positions and cfg.max_prompt_length + cfg.max_new_tokens > max_positions:
        raise PipelineError(
            f"max_prompt_length {cfg.max_prompt_length} + max_new_tokens {cfg.max_new_tokens} exceeds "
            f"the model's context of {max_positions} tokens ({cfg.sft_path})"
        )
    return sft, tokenizer


@dataclass
class PromptSets:
    """What PPO reads besides the models: training prompts, held-out evaluation prompts (with the gold
    judge when it knows every one of them), PPO-ptx text, and the files they all came from."""

    prompts: list
    ids: list[list[int]]
    records: list[dict]  # each training prompt's record, for a rule reward
    eval_prompts: list
    eval_ids: list[list[int]]
    eval_records: list[dict]
    held_out: list  # training prompts held out for evaluation, saved beside the weights
    judge: GoldJudge | None
    gold_n: int  # held-out prompts in each periodic gold evaluation
    ptx_stream: torch.Tensor | None  # PPO-ptx token stream; None without ptx
    files: list[str]


def load_prompt_sets(cfg: PPOConfig, tokenizer) -> PromptSets:
    """3. Prompts (training, held out) and PPO-ptx text, checked before anything is written."""
    world = Path(cfg.world_dir)
    # The world's evaluation prompts judge a policy trained on the world's prompts; one trained on a
    # prompt set of your own holds some of those out instead.
    eval_files = cfg.eval_files or (
        [str(world / "eval_prompts.jsonl")]
        if trains_on_world(cfg.prompt_files, world) and (world / "eval_prompts.jsonl").is_file()
        else []
    )
    train = list(
        load_prompts(cfg.prompt_files, tokenizer, cfg.max_prompt_length, cfg.prompt_field, cfg.skip_long_prompts)
    )
    eval_field = cfg.prompt_field if cfg.eval_files else "prompt"  # the world's eval prompts say `prompt`
    held = (
        list(load_prompts(eval_files, tokenizer, cfg.max_prompt_length, eval_field, cfg.skip_long_prompts))
        if eval_files
        else [[], [], []]
    )
    held_out = []
    if not eval_files and cfg.eval_holdout:
        # A prompt set alone (no world, no --eval_files): hold a seeded few out of training, so the manifest
        # still reports reward and KL to SFT on prompts PPO never trained on.
        n = min(cfg.eval_holdout, len(train[0]) // 10, cfg.eval_size or len(train[0]))
        train, held = hold_out(train, n, cfg.seed)
        held_out = held[0]
    if cfg.eval_size:
        held = [column[: cfg.eval_size] for column in held]
    (prompts, prompt_ids, records), (eval_prompts, eval_ids, eval_records) = train, held
    judge = GoldJudge.load(world) if (world / "truth.json").is_file() else None
    if judge is not None:  # the gold judge knows only the world's prompts
        known = [i for i, p in enumerate(eval_prompts) if isinstance(p, str) and _knows(judge, p)]
        judge = judge if len(known) == len(eval_prompts) and known else None
    gold_n = min(cfg.gold_eval_size, len(eval_ids))
    ptx_stream = document_stream(tokenizer, load_texts(cfg.ptx_files, cfg.ptx_field)) if cfg.ptx_coef > 0 else None
    if ptx_stream is not None and len(ptx_stream) <= cfg.ptx_length:
        raise PipelineError(f"{cfg.ptx_files}: {len(ptx_stream)} tokens, fewer than one ptx block of {cfg.ptx_length}")
    files = list(cfg.prompt_files) + eval_files + (list(cfg.ptx_files) if cfg.ptx_coef > 0 else [])
    return PromptSets(
        prompts, prompt_ids, records, eval_prompts, eval_ids, eval_records, held_out, judge, gold_n, ptx_stream, files
    )


def _knows(judge: GoldJudge, prompt: str) -> bool:
    try:
        judge.spec(prompt)
        return True
    except KeyError:
        return False


@dataclass
class Models:
    """The four models as loaded: the policy (optionally LoRA) and the critic (None for a critic-free
    estimator), which the stage trains, the frozen reference (None under LoRA: the policy with its
    adapters off) and reward model (None when a rule alone gives the reward)."""

    policy: nn.Module
    critic: Critic | None
    ref_model: nn.Module | None
    reward_model: nn.Module | None
    packed: bool  # padding-free forwards (all but generation): every model keeps packed episodes apart
    trainable: int  # trainable policy parameters


def load_models(cfg: PPOConfig, accelerator, stage: str) -> Models:
    """4. Models: policy (optionally LoRA), frozen reference, critic and reward model (those the method
    uses). Everything stays in eval mode: dropout off (N+); the training forward needs gradients, not
    train mode. The reference loads as the policy does (fp32; cast to the policy's dtype once prepared),
    so at update 0 it computes the policy's log-probs bit for bit (KL 0); the reward model only scores."""
    device = accelerator.device
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    policy = load_without_dropout(AutoModelForCausalLM, cfg.sft_path)
    ref_model = None
    if cfg.lora_r == 0:
        ref_model = load_without_dropout(AutoModelForCausalLM, cfg.sft_path)
        ref_model.requires_grad_(False).eval().to(device)
    reward_model = critic_base = None
    if cfg.uses_reward_model:
        reward_model, _ = load_reward_model(cfg.reward_path, device=device, dtype=frozen_dtype)
        switch_off_dropout(reward_model).requires_grad_(False)
    if cfg.has_critic:
        critic_base = load_without_dropout(AutoModelForSequenceClassification, cfg.reward_path)
    # Padding-free forwards (all but generation) when every model keeps packed episodes apart.
    packed = cfg.padding_free and all(
        [packs_sequences(m) for m in (policy, ref_model, reward_model, critic_base) if m is not None]
    )
    if cfg.padding_free and not packed:
        accelerator.print(f"[{stage}] a model does not keep packed sequences apart; padded batches instead")
    if cfg.lora_r > 0:
        policy = with_lora(policy, cfg)
    critic = Critic(critic_base, reward_offset(critic_base.config)) if critic_base is not None else None
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if critic_base is not None:
            critic_base.gradient_checkpointing_enable()
    policy.eval()
    if critic is not None:
        critic.eval()
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return Models(policy, critic, ref_model, reward_model, packed, trainable)


@dataclass
class Learner:
    """The models as PPO runs them: the policy + critic pair accelerate prepared and its optimizer;
    the unwrapped policy and critic, which the no-grad passes (generation, reference, rollout values,
    evaluation) call, skipping the DDP wrapper; the frozen models; the EMA of the policy."""

    accelerator: Accelerator
    model: nn.Module  # the prepared ActorCritic
    optimizer: torch.optim.Optimizer
    policy: nn.Module
    critic: Critic | None
    ref_model: nn.Module | None
    reward_model: nn.Module | None
    reward_fn: RewardFunction | None
    packed: bool
    clip_groups: list  # policy and critic parameters, each clipped to grad_clip on its own
    ema: EMA | None


def prepare(
    cfg: PPOConfig, accelerator, models: Models, sizes: BatchSizes, reward_fn: RewardFunction | None
) -> Learner:
    """5. AdamW over the trainable weights (the critic at its own rate), accelerate's prepare of the
    pair, and the EMA, registered so that checkpoints carry it."""
    groups = [{"params": [p for p in models.policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if models.critic is not None:
        groups.append({"params": list(models.critic.parameters()), "lr": cfg.critic_lr or cfg.lr})
    optimizer = torch.optim.AdamW(
        groups,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=accelerator.device.type in ("cpu", "cuda"),  # one kernel, not a loop over tensors
    )
    configure_deepspeed(accelerator, sizes.micro, cfg.grad_clip)
    pair = ActorCritic(models.policy, models.critic)
    if cfg.compile:
        # The update's forward only: generation keeps calling the eager policy. Every update's answers
        # have new lengths, so lengths are symbolic: one graph serves them all.
        pair.compile(dynamic=True)
    model, optimizer = accelerator.prepare(pair, optimizer)
    # No-grad passes (generation, reference, rollout values, evaluation) skip the DDP wrapper.
    unwrapped, critic_net = accelerator.unwrap_model(model).policy, accelerator.unwrap_model(model).critic
    if models.ref_model is not None:  # DeepSpeed's bf16 casts the policy it prepares: the reference follows
        models.ref_model.to(next(unwrapped.parameters()).dtype)
    clip_groups = [list(unwrapped.parameters())] + ([list(critic_net.parameters())] if critic_net is not None else [])
    ema = EMA(unwrapped, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return Learner(
        accelerator,
        model,
        optimizer,
        unwrapped,
        critic_net,
        models.ref_model,
        models.reward_model,
        reward_fn,
        models.packed,
        clip_groups,
        ema,
    )


def resume(accelerator, run: StageRun, kl_ctl, tracker: Tracker, stage: str) -> int:
    """The update to start from: 0, or the step of a killed run's newest checkpoint, whose state and KL
    coefficient come back. The tracker drops the rows the resumed (or an abandoned) run logged later."""
    start = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        extra = load_checkpoint(accelerator, latest)
        start, kl_ctl.value = extra["step"], extra["kl_coef"]
        accelerator.print(f"[{stage}] resumed from {latest} (step {start})")
    tracker.truncate_after(start if latest is not None else -1)
    return start


def print_plan(cfg: PPOConfig, accelerator, data: PromptSets, sizes: BatchSizes, trainable: int, stage: str) -> None:
    reward = " + ".join(
        ([f"{cfg.reward_model_weight:g} x reward model"] if cfg.uses_reward_model else [])
        + ([f"{cfg.reward_fn_weight:g} x {cfg.reward_fn}"] if cfg.reward_fn else [])
    )
    accelerator.print(
        f"[{stage}] {cfg.advantage} advantages"
        + (f" over groups of {cfg.samples_per_prompt}" if cfg.samples_per_prompt > 1 else "")
        + f", reward {reward}, KL in the {cfg.kl_penalty}; "
        f"{len(data.prompts)} prompts ({len(data.eval_ids)} held out), "
        f"{trainable / 1e6:.2f}M trainable policy parameters, {accelerator.num_processes} process(es) "
        f"x {torch.get_num_threads()} thread(s); per update: {cfg.rollout_batch_size} episodes, "
        f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches of {sizes.minibatch} "
        f"(micro-batches of {sizes.micro}) per process; {precision_line(cfg.mixed_precision)}"
    )


# ---- one update: rollout, guards, PPO epochs, metrics ----------------------------------------------

Stop = Callable[[str], NoReturn]  # stops the run in one line (`stopper`)


@dataclass
class Rollout:
    """One update's episodes on this process, as steps (1)-(6) made them and the PPO epochs (7) read
    them: B episodes of P prompt and T response tokens; response tensors are [B, T], 0 after the EOS.
    With samples_per_prompt G the G answers to a prompt lie next to each other."""

    query: torch.Tensor  # [B, P] left-padded prompts
    responses: torch.Tensor  # [B, T] truncated after the first EOS, then padding
    mask: torch.Tensor  # [B, T] 1 on the response tokens through the first EOS
    seq: torch.Tensor  # [B, P + T] prompts then responses
    seq_mask: torch.Tensor
    logprobs: torch.Tensor  # the policy's ("old") log-probs
    ref_logprobs: torch.Tensor  # the frozen SFT policy's
    values: torch.Tensor  # the critic's, of the state before each response token (0 without a critic)
    rewards: torch.Tensor  # KL-shaped (with kl_penalty reward), the score on the last token
    kl: torch.Tensor  # per token, log pi - log pi_ref
    advantages: torch.Tensor  # the estimator's, per token
    returns: torch.Tensor  # the critic's targets (the advantages without a critic)
    scores: torch.Tensor  # [B] what the policy maximises: `reward`, or no_eos_penalty for a response without EOS
    reward: torch.Tensor  # [B] the weighted reward model score and rule reward
    rule_scores: torch.Tensor | None  # [B] reward_fn's values, when there is one
    has_eos: torch.Tensor  # [B]


class Laps:
    """Seconds spent in each phase of an update (on a GPU, once its queued work has run): where the
    time goes, generation against the training passes, logged as perf/<phase>_s."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.t
        self.t = now


def rollout(
    cfg: PPOConfig,
    learner: Learner,
    prompts: list,
    prompt_ids: list[list[int]],
    records: list[dict],
    tokenizer,
    kl_coef: float,
    laps: Laps,
) -> Rollout:
    """Steps (1)-(6) on this process's prompts of the update (each already repeated samples_per_prompt
    times): no-grad passes on full weights at the training forward's precision (`as_trained`)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    query, query_mask = (t.to(learner.accelerator.device) for t in left_pad(prompt_ids, pad))
    with torch.no_grad(), as_trained(learner.accelerator, learner.model):
        # (1) Generate: left-padded prompts, KV cache, sampling at temperature.
        raw, sampled_logprobs = sample(
            learner.policy, query, query_mask, cfg.max_new_tokens, cfg.temperature, eos, pad
        )
        laps.lap("generate")
        # (2) Truncate after the first EOS: later tokens become padding, masked out everywhere.
        responses, mask, has_eos = truncate_after_eos(raw, eos, pad)
        seq = torch.cat([query, responses], dim=1)
        seq_mask = torch.cat([query_mask, mask], dim=1)
        parts = [
            episodes(seq[s], seq_mask[s], mask[s], learner.packed) for s in chunks(len(seq), cfg.forward_batch_size)
        ]
        # (3) Score: the reward model at the last token and/or the rule on the answer's text; no EOS: a
        # fixed penalty (N+).
        reward, rule_scores = score_episodes(cfg, learner, parts, prompts, responses, records, tokenizer)
        scores = apply_no_eos_penalty(reward, has_eos, cfg.no_eos_penalty) if cfg.penalize_no_eos else reward
        laps.lap("score")
        # (4) Old log-probs of the policy and the reference (logits / temperature, N+), and the
        # critic's values of the states before each response token. Under mixed precision the
        # policy's come from the forward the update and the reference run, not from sampling (cached,
        # one token at a time: under bf16 the two differ), so at update 0 KL is 0 and the first ratio
        # 1 (N+); in fp32 the sampling pass gives the same to float rounding, and a forward less.
        logprobs = (
            sampled_logprobs
            if learner.accelerator.mixed_precision == "no"
            else rollout_logprobs(learner.policy, parts, cfg.temperature)
        ) * mask
        with reference(learner.policy, learner.ref_model) as ref:
            ref_logprobs = rollout_logprobs(ref, parts, cfg.temperature) * mask
        laps.lap("reference")  # and the policy's old log-probs, under mixed precision
        values = (
            torch.cat([learner.critic(ep) for ep in parts]) * mask
            if learner.critic is not None
            else torch.zeros_like(logprobs)
        )
        laps.lap("values")
        # (5)-(6) KL-shaped rewards and the estimator's advantages.
        rewards, kl, advantages, returns = estimate(cfg, scores, logprobs, ref_logprobs, values, mask, kl_coef)
    return Rollout(
        query,
        responses,
        mask,
        seq,
        seq_mask,
        logprobs,
        ref_logprobs,
        values,
        rewards,
        kl,
        advantages,
        returns,
        scores,
        reward,
        rule_scores,
        has_eos,
    )


def score_episodes(
    cfg: PPOConfig, learner: Learner, parts: list[Episodes], prompts: list, responses, records: list[dict], tokenizer
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3) The reward of each episode, before the no-EOS penalty: reward_model_weight x the reward model's
    score + reward_fn_weight x the rule's value of the answer's text. Returns (reward, rule values)."""
    device = responses.device
    reward = torch.zeros(len(responses), device=device)
    if learner.reward_model is not None:
        reward += cfg.reward_model_weight * torch.cat([reward_scores(learner.reward_model, ep) for ep in parts])
    rule = None
    if learner.reward_fn is not None:
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rule = torch.tensor(
            [learner.reward_fn(p, t.strip(), r) for p, t, r in zip(prompts, texts, records, strict=True)],
            device=device,
        )
        reward += cfg.reward_fn_weight * rule
    return reward, rule


def estimate(
    cfg: PPOConfig,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(5) Per-token rewards: -kl_coef x KL (kl_penalty reward; with kl_penalty loss the KL is a loss
    term instead) and the score on the last response token. (6) Advantages by the estimator: GAE over
    the critic's values, whitened (PPO, N+); one number per answer from its group (grpo, dr_grpo, rloo:
    the answer's reward is its score less the KL summed over its tokens); or REINFORCE++'s whitened
    returns. Returns (rewards, kl, advantages, returns)."""
    beta = kl_coef if cfg.kl_penalty == "reward" else 0.0
    group = cfg.samples_per_prompt
    base = minus_group_mean(scores, group) if cfg.advantage == "reinforce_pp_baseline" else scores
    rewards, kl = kl_shaped_rewards(base, logprobs, ref_logprobs, mask, beta)
    if cfg.advantage == "gae":
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return rewards, kl, whiten(advantages, mask), returns
    if cfg.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages = reinforce_pp_advantages(rewards, mask, cfg.gamma)
    else:
        advantages = group_advantages(rewards.sum(1), group, cfg.advantage)[:, None] * mask
    return rewards, kl, advantages, advantages


def stopper(bar, checkpoints: Path, update: int, stage: str) -> Stop:
    """How a guard stops the run at `update`: in one line that names the kept checkpoint."""

    def stop(why: str) -> NoReturn:
        bar.close()  # the error goes on its own line
        raise PipelineError(
            f"{stage}: {why} at update {update + 1}; stopped, last good checkpoint kept in {checkpoints}"
        )

    return stop


def guards(cfg: PPOConfig, accelerator, batch: Rollout, stop: Stop) -> tuple[float, float]:
    """Guards before learning from this batch: a non-finite value in anything the loss reads (named
    in rollout order, so the first is where it came from), or a runaway KL, stops the run; the
    newest checkpoint on disk is from a good update. (A NaN KL passes `kl > max_kl`.) Returns the
    mean score and the mean summed KL over all processes."""
    guarded = {
        "log-probs": batch.logprobs,
        "reward": batch.reward,
        "reference log-probs": batch.ref_logprobs,
        "values": batch.values,
        "KL": batch.kl,
        "advantages": batch.advantages,
        "returns": batch.returns,
    }
    rollout_stats = accelerator.reduce(
        torch.stack(
            [batch.scores.mean(), batch.kl.sum(1).mean()]
            + [(~torch.isfinite(t)).float().sum() for t in guarded.values()]
        ).to(accelerator.device),
        "sum",
    )
    mean_score, mean_kl = (rollout_stats[:2] / accelerator.num_processes).tolist()
    for name, bad in zip(guarded, rollout_stats[2:].tolist(), strict=False):
        if bad:
            stop(f"non-finite {name}")
    if cfg.max_kl and mean_kl > cfg.max_kl:
        stop(f"KL to the SFT policy {mean_kl:.2f} exceeds max_kl {cfg.max_kl} (lower lr or raise kl_coef)")
    return mean_score, mean_kl


@dataclass
class PPOStats:
    """Step (7)'s statistics, averaged over micro-batches and processes."""

    policy_loss: float
    value_loss: float
    policy_clipfrac: float
    value_clipfrac: float
    approx_kl: float
    entropy: float
    ptx_loss: float
    kl_loss: float  # the k3 KL term (kl_penalty loss; 0 otherwise)
    # The first minibatch of the first epoch, before any step: ~0 and 0 unless the rollout and the
    # update compute the policy differently (precision, dropout, padding; N+).
    approx_kl_first: float
    clipfrac_first: float


def ppo_update(
    cfg: PPOConfig,
    learner: Learner,
    batch: Rollout,
    sizes: BatchSizes,
    update: int,
    ptx_stream: torch.Tensor | None,
    kl_coef: float,
    stop: Stop,
) -> PPOStats:
    """(7) PPO epochs: shuffled minibatches (one optimizer step each), split into micro-batches.
    Dropout is zero in every config, so train mode here only switches on gradient checkpointing."""
    accelerator, model = learner.accelerator, learner.model
    model.train(cfg.gradient_checkpointing)
    stats = []
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(sizes.per_process, device=accelerator.device)
        for mb in range(cfg.num_minibatches):
            for micro in range(cfg.gradient_accumulation):
                first = mb * sizes.minibatch + micro * sizes.micro
                # PPO-ptx (InstructGPT eq. 2): also keep the pretraining distribution's likelihood.
                ptx_ids = (
                    None
                    if ptx_stream is None
                    else ptx_batch(
                        ptx_stream,
                        cfg.ptx_batch_size,
                        cfg.ptx_length,
                        hash((cfg.seed, accelerator.process_index, update, epoch, mb, micro)) % 2**62,
                    ).to(accelerator.device)
                )
                idx = order[first : first + sizes.micro]
                stats.append(ppo_step(cfg, learner, batch, idx, ptx_ids, kl_coef, stop))
            if epoch == 0 and mb == 0:  # before the first optimizer step: the ratio must be 1 (N+)
                first_stats = torch.stack(stats).mean(0)[[4, 2]]  # approx_kl, clipfrac
    model.eval()
    train_stats = accelerator.reduce(torch.stack(stats).mean(0), "mean")
    approx_kl_first, clipfrac_first = accelerator.reduce(first_stats, "mean").tolist()
    return PPOStats(*train_stats.tolist(), approx_kl_first, clipfrac_first)


def ppo_step(
    cfg: PPOConfig,
    learner: Learner,
    batch: Rollout,
    idx: torch.Tensor,
    ptx_ids: torch.Tensor | None,
    kl_coef: float,
    stop: Stop,
) -> torch.Tensor:
    """One micro-batch of (7): the clipped policy loss, the value loss (with a critic), PPO-ptx's and the
    KL term (kl_penalty loss), backward, and at the end of a minibatch the clipped optimizer step and the
    EMA update. Returns [policy loss, value loss, policy clip fraction, value clip fraction, approx KL,
    entropy, ptx loss, KL loss]."""
    accelerator = learner.accelerator
    # Drop the padding columns this micro-batch does not need.
    P = batch.query.shape[1]
    m_T = int(batch.mask[idx].sum(1).max())
    left = int((batch.seq_mask[idx, :P].sum(0) > 0).float().argmax())
    cols = slice(left, P + m_T)
    ep = episodes(batch.seq[idx, cols], batch.seq_mask[idx, cols], batch.mask[idx, :m_T], learner.packed)
    m_resp, m_rmask = batch.responses[idx, :m_T], batch.mask[idx, :m_T].float()
    with accelerator.accumulate(learner.model):
        logits, new_values, ptx_loss = learner.model(ep, cfg.temperature, ptx_ids)
        new_logprobs = logprobs_from_logits(logits, m_resp)
        how = (cfg.aggregation, cfg.max_new_tokens)
        pg_loss, pg_clipfrac, approx_kl = policy_loss(
            new_logprobs,
            batch.logprobs[idx, :m_T],
            batch.advantages[idx, :m_T],
            m_rmask,
            cfg.cliprange,
            cfg.cliprange_high,
            *how,
        )
        loss = pg_loss + cfg.ptx_coef * ptx_loss
        vf_loss = vf_clipfrac = kl_loss = torch.zeros((), device=loss.device)
        if new_values is not None:
            vf_loss, vf_clipfrac = value_loss(
                new_values, batch.values[idx, :m_T], batch.returns[idx, :m_T], m_rmask, cfg.cliprange_value
            )
            loss = loss + cfg.vf_coef * vf_loss
        if cfg.kl_penalty == "loss":  # GRPO: beta x KL(pi || pi_ref) in the loss, not in the reward
            kl_loss = aggregate(k3_kl(new_logprobs, batch.ref_logprobs[idx, :m_T]), m_rmask, *how)
            loss = loss + kl_coef * kl_loss
        # No backward, hence no step (DeepSpeed steps inside it), on a non-finite loss on
        # any process: all of them stop here together.
        if accelerator.reduce((~torch.isfinite(loss.detach())).float()[None], "sum").item():
            stop("non-finite loss")
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:  # policy and critic each to the bound
            clip_grad_norms_(accelerator, learner.clip_groups, cfg.grad_clip)
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
    if learner.ema is not None and accelerator.sync_gradients:
        learner.ema.update(learner.policy)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits), m_rmask)
    return torch.stack([pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approx_kl, entropy, ptx_loss, kl_loss]).detach()


def update_metrics(
    cfg: PPOConfig,
    accelerator,
    batch: Rollout,
    stats: PPOStats,
    kl_coef: float,
    mean_score: float,
    mean_kl: float,
    t0: float,
    laps: Laps,
) -> dict:
    """What the tracker logs for an update that began at time `t0`."""
    lengths = batch.mask.sum(1).float()
    group = cfg.samples_per_prompt
    # Groups whose answers all score alike: a group estimator learns nothing from them.
    flat = (batch.scores.view(-1, group).std(1) == 0).float().mean() if group > 1 else lengths.new_zeros(())
    rule = batch.rule_scores.float().mean() if batch.rule_scores is not None else lengths.new_zeros(())
    rollout = accelerator.reduce(
        torch.stack(
            [
                lengths.mean(),
                (~batch.has_eos).float().mean(),
                explained_variance(batch.values, batch.returns, batch.mask),
                lengths.sum(),
                flat,
                rule,
            ]
        ),
        "mean",
    ).tolist()
    seconds = time.time() - t0
    metrics = {
        "objective/score": mean_score,
        "objective/kl": mean_kl,
        "objective/kl_coef": kl_coef,
        "objective/total_reward": mean_score - kl_coef * mean_kl,
        "policy/entropy": stats.entropy,
        "loss/policy": stats.policy_loss,
        "loss/value": stats.value_loss,
        "policy/clipfrac": stats.policy_clipfrac,
        "value/clipfrac": stats.value_clipfrac,
        "policy/approx_kl": stats.approx_kl,
        "value/explained_variance": rollout[2],
        "policy/approx_kl_first": stats.approx_kl_first,
        "policy/clipfrac_first": stats.clipfrac_first,
        "response/length": rollout[0],
        "response/no_eos_rate": rollout[1],
        "perf/episodes_per_s": cfg.rollout_batch_size / seconds,
        "perf/tokens_per_s": rollout[3] * accelerator.num_processes / seconds,
        **{f"perf/{phase}_s": s for phase, s in laps.seconds.items()},
    }
    if not cfg.has_critic:
        for key in ("loss/value", "value/clipfrac", "value/explained_variance"):
            del metrics[key]
    if group > 1:
        metrics["objective/flat_groups"] = rollout[4]
    if cfg.reward_fn:
        metrics["objective/rule_score"] = rollout[5]
    if cfg.kl_penalty == "loss":
        metrics["loss/kl"] = stats.kl_loss
    if cfg.ptx_coef > 0:
        metrics["loss/ptx"] = stats.ptx_loss
    return metrics


def scoring_penalty(cfg: PPOConfig) -> float | None:
    """The proxy score of evaluations is what training optimises: unfinished answers get no_eos_penalty."""
    return cfg.no_eos_penalty if cfg.penalize_no_eos else None


def gold_metrics(cfg: PPOConfig, learner: Learner, tokenizer, data: PromptSets) -> dict:
    """Greedy answers to a fixed subset of held-out prompts: gold score beside the proxy score.
    Evaluations run on every process (no extra wall time; sharded engines need all of them for the
    gather); the tracker logs on the main one only."""
    prompts, ids = data.eval_prompts[: data.gold_n], data.eval_ids[: data.gold_n]
    with as_trained(learner.accelerator, learner.model):
        greedy = greedy_answers(learner.policy, tokenizer, ids, cfg.max_new_tokens)
    s = summarize(
        judge_answers(
            WorldJudge(data.judge), prompts, greedy, proxy=proxy_judge(cfg, learner, tokenizer), prompt_ids=ids
        )
    )
    return {
        "gold/score": s["gold_score"],
        "gold/hallucination_rate": s["hallucination_rate"],
        "gold/instruction_accuracy": s["instruction_accuracy"],
        "gold/proxy_score": s["proxy_score"],
    }


def train_summary(
    cfg: PPOConfig, last: dict, trainable: int, start: int, loop_seconds: float, phases: dict[str, float]
) -> dict:
    return {
        "updates": cfg.num_updates,
        "episodes": cfg.num_updates * cfg.rollout_batch_size,
        "final/score": last.get("objective/score"),
        "final/kl": last.get("objective/kl"),
        "trainable_params": trainable,
        # Throughput of this process's loop (a resumed run counts its own updates only).
        "train_seconds": loop_seconds,
        "episodes_per_s": (cfg.num_updates - start) * cfg.rollout_batch_size / max(loop_seconds, 1e-9),
        # Where the loop's time went: generate, score, reference, values, update (bench-ppo's split).
        "phase_seconds": {phase: round(s, 3) for phase, s in phases.items()},
    }


def final_evaluation(cfg: PPOConfig, learner: Learner, tokenizer, data: PromptSets, stage: str) -> tuple[dict, list]:
    """7. Evaluation against the SFT policy on held-out prompts: the metrics and sample answers of the
    manifest (reward.judging, as every stage and make eval judge). On every process, like the gold
    metrics; the main one writes the manifest."""
    if not data.eval_ids:
        return {}, []
    with as_trained(learner.accelerator, learner.model):
        policy_answers = greedy_answers(learner.policy, tokenizer, data.eval_ids, cfg.max_new_tokens)
        with reference(learner.policy, learner.ref_model) as ref:
            sft_answers = greedy_answers(ref, tokenizer, data.eval_ids, cfg.max_new_tokens)
        kl_to_sft = kl_to_reference(learner.policy, learner.ref_model, tokenizer, data.eval_ids, cfg)
    # kl_to_sft is between the distributions at the sampling temperature (logits / kl_temperature, N+),
    # of answers sampled at it.
    metrics = {
        "response_length": mean([len(a) for a in policy_answers.ids]),
        "sft_response_length": mean([len(a) for a in sft_answers.ids]),
        "kl_to_sft": kl_to_sft,
        "kl_temperature": cfg.temperature,
        "eval_prompts": len(data.eval_ids),
    }
    samples = [
        {"prompt": p, stage: a, "sft": b}
        for p, a, b in zip(data.eval_prompts[:8], policy_answers.texts, sft_answers.texts, strict=False)
    ]
    proxy = proxy_judge(cfg, learner, tokenizer)
    gold = WorldJudge(data.judge) if data.judge is not None else None
    if learner.reward_fn is not None and gold is None:  # e.g. GSM8K: the rule is the accuracy
        for name, got in (("reward_fn_score", policy_answers), ("sft_reward_fn_score", sft_answers)):
            metrics[name] = mean(
                [
                    learner.reward_fn(p, a, r)
                    for p, a, r in zip(data.eval_prompts, got.texts, data.eval_records, strict=True)
                ]
            )
    if gold is None and proxy is None:
        return metrics, samples
    evaluation = judge_policies(
        gold or proxy,
        data.eval_prompts,
        {stage: policy_answers, "sft": sft_answers},
        pairs=[(stage, "sft")],
        proxy=proxy,
        prompt_ids=data.eval_ids,
        n_boot=1000,  # the win rate's 95% interval, as make eval draws it
    )
    trained, sft = evaluation.summaries[stage], evaluation.summaries["sft"]
    if proxy is not None:
        # reward_score is what training optimises (unfinished answers at no_eos_penalty); *_raw the
        # reward model's own score of the same answers.
        metrics.update(
            {
                "reward_score": trained["proxy_score"],
                "sft_reward_score": sft["proxy_score"],
                "reward_score_raw": mean(evaluation.judged[stage].proxy_raw),
                "sft_reward_score_raw": mean(evaluation.judged["sft"].proxy_raw),
            }
        )
    if gold is not None:
        win = evaluation.win_rates[f"{stage}_vs_sft"]  # its ceiling: what the ideal answer would win against SFT
        metrics.update(
            {
                "gold_score": trained["gold_score"],
                "gold_score_ci": trained["gold_score_ci"],
                "sft_gold_score": sft["gold_score"],
                "gold_win_rate": win["win_rate"],
                "gold_win_rate_ci": win.get("ci"),
                "gold_win_rate_ceiling": win["ceiling"],
                "hallucination_rate": trained["hallucination_rate"],
                "sft_hallucination_rate": sft["hallucination_rate"],
                "instruction_accuracy": trained["instruction_accuracy"],
                "sft_instruction_accuracy": sft["instruction_accuracy"],
                # Named as the SFT and DPO stages name them: harmful requests refused cleanly, harmless ones refused.
                "harmful_refusal_rate": trained["refusal_accuracy"],
                "sft_harmful_refusal_rate": sft["refusal_accuracy"],
                "over_refusal_rate": trained["over_refusal_rate"],
                "sft_over_refusal_rate": sft["over_refusal_rate"],
            }
        )
    return metrics, samples


def proxy_judge(cfg: PPOConfig, learner: Learner, tokenizer) -> RewardModelJudge | None:
    """The reward model scoring held-out answers as the rollout scores them (no-EOS penalty included);
    None when a rule alone gives the reward."""
    if learner.reward_model is None:
        return None
    return RewardModelJudge(learner.reward_model, tokenizer, no_eos_penalty=scoring_penalty(cfg))


def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> Answers:
    """Greedy answers: the token ids as generated (the reward model scores those, as in training) and
    their text (the gold judge reads that)."""
    responses = answers(model, tokenizer, prompt_ids, max_new_tokens)
    return Answers([tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses], ids=responses)


def save_policy(cfg: PPOConfig, policy: nn.Module, pair_state: dict, tokenizer, stage_dir: Path) -> None:
    """8. A plain HF checkpoint of the policy (LoRA merged into the weights), its tokenizer and its
    generation config (the SFT model's, or one naming the tokenizer's special tokens)."""
    state_dict = {k.removeprefix("policy."): v for k, v in pair_state.items() if k.startswith("policy.")}
    final = policy
    if cfg.lora_r > 0:
        fresh = with_lora(load_without_dropout(AutoModelForCausalLM, cfg.sft_path), cfg)
        final, state_dict = merged_from_state_dict(fresh, state_dict), None
    else:
        state_dict = one_entry_per_parameter(final, state_dict)
    gen_config_file = Path(cfg.sft_path) / "generation_config.json"
    final.generation_config = (
        GenerationConfig.from_pretrained(cfg.sft_path)
        if gen_config_file.is_file()
        else GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    final.save_pretrained(stage_dir, state_dict=state_dict)
    tokenizer.save_pretrained(stage_dir)


def finish(
    cfg: PPOConfig, run: StageRun, learner: Learner, tokenizer, data: PromptSets, metrics: dict, stage: str
) -> None:
    """7. Final weights (the EMA when enabled), evaluation against the SFT policy on held-out prompts.
    8. Save a plain HF checkpoint, the held-out prompts, then the manifest (last)."""
    accelerator = learner.accelerator
    if learner.ema is not None:
        learner.ema.copy_to(learner.policy)
    evaluation, samples = final_evaluation(cfg, learner, tokenizer, data, stage)
    metrics.update(evaluation)
    # The pair's state dict is gathered from every shard under FSDP / ZeRO-3 (every process takes part;
    # under ZeRO-3 only the main one receives it).
    pair_state = accelerator.get_state_dict(learner.model)
    checksums = rank_checksums(accelerator, learner.policy)  # replicas in sync (2-process tests)
    if not accelerator.is_main_process:
        return
    save_policy(cfg, learner.policy, pair_state, tokenizer, run.dir)
    # Prompts PPO never trained on: `make eval` evaluates every stage on them (judged by a reward model).
    held_out_file = run.dir / HELD_OUT_FILE
    held_out_file.unlink(missing_ok=True)  # from an earlier run in this directory
    if data.held_out:
        write_text_atomic(
            held_out_file,
            "".join(
                json.dumps({"messages": p} if isinstance(p, list) else {"prompt": p}, ensure_ascii=False) + "\n"
                for p in data.held_out
            ),
        )
    metrics["peak_memory_mb"] = round(peak_memory_mb())
    run.finish(
        metrics,
        {
            "samples": samples,
            "processes": accelerator.num_processes,
            "threads": torch.get_num_threads(),
            "precision": precision_facts(cfg.mixed_precision),
            "reward_path": cfg.reward_path if cfg.uses_reward_model or cfg.has_critic else None,
            "heldout_prompts": HELD_OUT_FILE if data.held_out else None,
            "weights_checksum_per_rank": checksums,
        },
    )
    accelerator.print(
        f"[{stage}] done -> {run.dir}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and k in _SUMMARY)
    )


_SUMMARY = (
    "reward_score",
    "sft_reward_score",
    "reward_fn_score",
    "sft_reward_fn_score",
    "kl_to_sft",
    "gold_score",
    "sft_gold_score",
    "gold_win_rate",
    "gold_win_rate_ceiling",
    "hallucination_rate",
    "sft_hallucination_rate",
)


# ---- the stage ----------------------------------------------------------------------------------


def update_prompts(cfg: PPOConfig, data: PromptSets, update: int, rank: int, sizes: BatchSizes) -> tuple:
    """This process's prompts of an update (`prompt_indices`): (prompts, their ids, their records)."""
    n = len(data.ids)
    picked = prompt_indices(n, update, cfg.rollout_batch_size, rank, sizes.per_process, cfg.seed, sizes.group)
    return tuple([column[i] for i in picked] for column in (data.prompts, data.ids, data.records))


def run_inputs(cfg: PPOConfig, data: PromptSets, reward_fn: RewardFunction | None) -> list[str]:
    """What the run key fingerprints besides the config and the SFT parent: the prompt and ptx files,
    the reward model's manifest (when one is used) and the rule reward's source file."""
    files = list(data.files)
    if cfg.uses_reward_model or cfg.has_critic:
        files.append(str(Path(cfg.reward_path) / "manifest.json"))
    source = reward_fn.source if reward_fn is not None else None
    if source:  # a rule edited since is a new reward: the run is redone
        files.append(source)
    return files


@cli_main
def main(argv: list[str] | None = None, stage: str = "ppo") -> None:
    """The RL stage: PPO by default; `stage` names the directory, profiles and logs of another method's
    run of it (stages/grpo, stages/rloo, ...: advantage, groups and rewards come from their profiles)."""
    # 1. Config, processes and batch sizes (derived once, checked to divide exactly).
    cfg = parse_config(PPOConfig, stage, argv)
    accelerator = setup(cfg.seed, cfg.mixed_precision, cfg.gradient_accumulation, cfg.threads)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    check_ema_supported(cfg.ema_decay, plugin.zero_stage if plugin is not None else None)
    n, G = accelerator.num_processes, cfg.samples_per_prompt
    sizes = batch_sizes(cfg.rollout_batch_size, cfg.num_minibatches, cfg.gradient_accumulation, n, G)
    is_main, stage_dir = accelerator.is_main_process, Path(cfg.run_dir) / stage
    # 2. Parents: the SFT policy and the reward model (which must share its tokenizer), the rule reward.
    sft, tokenizer = load_parents(cfg)
    reward_fn = RewardFunction.load(cfg.reward_fn, cfg.world_dir) if cfg.reward_fn else None
    # 3. Prompts (training, held out) and PPO-ptx text, checked before anything is written.
    data = load_prompt_sets(cfg, tokenizer)
    run = StageRun(stage, stage_dir, config_dict(cfg), sft, cfg.sft_path, run_inputs(cfg, data, reward_fn), is_main)
    if not run.begin(cfg.force):
        return
    accelerator.wait_for_everyone()
    # 4. Models: policy (optionally LoRA), frozen reference, critic and reward model, dropout off (N+).
    models = load_models(cfg, accelerator, stage)
    # 5. Optimizer, accelerate, tracking, KL controller, and resume from a killed run's checkpoint.
    learner = prepare(cfg, accelerator, models, sizes, reward_fn)
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl > 0
        else FixedKLController(cfg.kl_coef)
    )
    tracker = Tracker(stage_dir, stage, config_dict(cfg), enabled=is_main, run_name=f"{cfg.run_dir}/{stage}")
    start = resume(accelerator, run, kl_ctl, tracker, stage)
    print_plan(cfg, accelerator, data, sizes, models.trainable, stage)
    watch_gold = data.judge is not None and cfg.gold_every > 0 and data.gold_n > 0
    if watch_gold and start == 0:
        tracker.log(gold_metrics(cfg, learner, tokenizer, data), 0)  # the SFT policy's starting point

    # 6. Updates: a rollout (1)-(6), the guards, the PPO epochs (7), then log and checkpoint.
    # The bar closes before any error is printed (a rule reward's, say), so the error is the last line.
    last, loop_start, phases = {}, time.time(), Counter()
    with progress(cfg.num_updates, start, stage, is_main) as bar:
        for update in range(start, cfg.num_updates):
            t0, kl_coef, stop = time.time(), kl_ctl.value, stopper(bar, run.checkpoints, update, stage)
            prompts, ids, records = update_prompts(cfg, data, update, accelerator.process_index, sizes)
            laps = Laps(accelerator.device)
            batch = rollout(cfg, learner, prompts, ids, records, tokenizer, kl_coef, laps)
            mean_score, mean_kl = guards(cfg, accelerator, batch, stop)
            stats = ppo_update(cfg, learner, batch, sizes, update, data.ptx_stream, kl_coef, stop)
            laps.lap("update")
            kl_ctl.update(mean_kl, cfg.rollout_batch_size)
            # Log, checkpoint, and now and then ask the gold judge.
            last = update_metrics(cfg, accelerator, batch, stats, kl_coef, mean_score, mean_kl, t0, laps)
            phases.update(laps.seconds)
            if watch_gold and (update + 1) % cfg.gold_every == 0:
                last.update(gold_metrics(cfg, learner, tokenizer, data))
            tracker.log(last, update + 1)
            bar.update(1)
            bar.set_postfix(score=f"{mean_score:.3f}", kl=f"{mean_kl:.2f}")
            if (update + 1) % cfg.save_every == 0 and update + 1 < cfg.num_updates:
                extra = {"kl_coef": kl_ctl.value, "episodes": (update + 1) * cfg.rollout_batch_size}
                save_checkpoint(accelerator, run.checkpoints, update + 1, cfg.keep_checkpoints, extra)
    summary = train_summary(cfg, last, models.trainable, start, time.time() - loop_start, phases)

    # 7-8. Final weights, evaluation against the SFT policy, save, manifest.
    finish(cfg, run, learner, tokenizer, data, summary, stage)
    tracker.close()
    accelerator.wait_for_everyone()


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def answers(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0, batch_size: int = 64
) -> list[list[int]]:
    """Response token ids (through the first EOS) for each prompt; greedy by default."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[i : i + batch_size], tokenizer.pad_token_id)
        tokens, _ = sample(
            model,
            ids.to(device),
            mask.to(device),
            max_new_tokens,
            temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        tokens, resp_mask, _ = truncate_after_eos(tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        out += [row[:n].tolist() for row, n in zip(tokens.cpu(), resp_mask.sum(1).tolist(), strict=False)]
    return out


@torch.no_grad()
def kl_to_reference(
    policy, ref_model, tokenizer, prompt_ids: list[list[int]], cfg: PPOConfig, batch_size: int = 64
) -> float:
    """Mean summed KL(policy || SFT) of sampled answers to held-out prompts (the k1 estimate PPO
    penalises: log pi - log pi_ref, summed over the response), between the distributions at the
    sampling temperature (logits / temperature), both from the same forward, as in the rollout."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(policy.parameters()).device
    total = 0.0
    for i in range(0, len(prompt_ids), batch_size):
        query, query_mask = (t.to(device) for t in left_pad(prompt_ids[i : i + batch_size], pad))
        raw, _ = sample(policy, query, query_mask, cfg.max_new_tokens, cfg.temperature, eos, pad)
        responses, mask, _ = truncate_after_eos(raw, eos, pad)
        ep = episodes(torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1), mask, packed=False)
        logprobs = logprobs_from_logits(response_logits(policy, ep, cfg.temperature), responses)
        with reference(policy, ref_model) as ref:
            ref_logprobs = logprobs_from_logits(response_logits(ref, ep, cfg.temperature), responses)
        total += ((logprobs - ref_logprobs) * mask).sum().item()
    return total / max(len(prompt_ids), 1)
