"""Direct preference optimisation (Rafailov et al. 2023): the SFT model tuned on the reward stage's
comparisons directly - no reward model, no sampling - through TRL's DPOTrainer.

DPO's loss -log sigmoid(beta * [log pi/pi_ref (chosen) - log pi/pi_ref (rejected)]) is the RLHF objective
(reward minus beta * KL to the reference) solved in closed form: the policy itself is the reward model,
its implicit reward beta * log pi(y|x)/pi_ref(y|x). So the held-out preference accuracy here is the share of
held-out comparisons whose implicit reward margin is positive - the reward stage's pair accuracy, read
off the policy - against the noisy labels and against the world's noise-free ranking.

Recipe: parse -> parent (RUN/sft: the start and the reference) -> comparisons, K-wise rankings as pairs
-> tokenized through the chat template as SFT trained -> trainer (reference model, precomputed reference
log-probs, or LoRA with the adapters off as the reference) -> train (resumable) -> save a plain checkpoint
-> held-out preference accuracy, KL to SFT, gold evaluation against SFT -> manifest.

Batches are padded: TRL 1.16's DPOTrainer has switched its padding_free option off (it warns and pads).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_utils import TrainOutput
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length

from data.formats.comparisons import Group, load_groups, pair_indices
from data.formats.fields import require_text
from data.formats.prompts import as_messages
from data.loading import load_records, split_holdout
from data.tokenizer import template_accepts, use_turn_end_as_eos
from pipeline.config import config_dict, parse_config
from pipeline.divergence import sampled_kl
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer, left_pad, position_ids
from pipeline.lora import lora_config
from pipeline.runtime import (
    cpu_and_backend,
    load_models_whole,
    merged_from_state_dict,
    peak_memory_mb,
    precision_facts,
    precision_line,
    rank_checksums,
    set_threads,
    stage_decides_training_settings,
)
from pipeline.stage import StageRun, last_complete_checkpoint, require_stage, resolve_init, trains_on_world
from pipeline.stats import bootstrap_ci, mean
from pipeline.tracking import truncate_metrics, wandb_enabled, wandb_env
from pipeline.trainer_metrics import JsonlMetricsCallback, quiet_console, replayable_train_sampler, whole_run_loss
from reward.judging import WorldJudge, judge_policies
from reward.losses import group_pairs, pair_accuracy
from stages.dpo.config import DPOStageConfig

# ---- comparisons as tokenized preference pairs ------------------------------------------------------


@dataclass
class TokenizedGroup:
    """One comparison group through the chat template: the prompt's ids (up to the assistant turn) and
    each response's ids after it (through the token that closes the turn), best first."""

    prompt_ids: list[int]
    response_ids: list[list[int]]


def tokenize_group(group: Group, tokenizer) -> TokenizedGroup:
    """The tokens TRL's DPOTrainer and SFTTrainer train on: the prompt rendered with the generation prompt,
    prompt + answer rendered as a conversation, the answer = where the two part (TRL's rule: a template
    may render a prompt alone differently), the same cut for all K answers so they share one prompt."""
    messages = as_messages(group.prompt)
    with template_accepts(group.where):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        fulls = [
            tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": r}], tokenize=False)
            for r in group.responses
        ]
    ids = tokenizer([prompt, *fulls], add_special_tokens=False)["input_ids"]
    cut = min(common_prefix_length(ids[0], full) for full in ids[1:])
    return TokenizedGroup(ids[0][:cut], [full[cut:] for full in ids[1:]])


def tokenize_groups(groups: list[Group], tokenizer, max_length: int, what: str) -> tuple[list, list[Group]]:
    """Tokenized groups, minus those whose prompt alone fills max_length (TRL's cut keeps the start, so no
    answer token would be left to compare); returns them with the groups kept, and says how many went."""
    kept, tokenized = [], []
    for g in groups:
        t = tokenize_group(g, tokenizer)
        if len(t.prompt_ids) < max_length:
            kept.append(g)
            tokenized.append(t)
    if groups and not kept:
        raise PipelineError(
            f"{groups[0].where}: every {what} group's prompt fills max_length {max_length} tokens, so no "
            "answer token is left to compare; raise --max_length"
        )
    if len(kept) < len(groups):
        PartialState().print(
            f"[dpo] warning: dropped {len(groups) - len(kept)} of {len(groups)} {what} groups whose prompt "
            f"fills max_length {max_length}",
            flush=True,
        )
    return tokenized, kept


def pair_dataset(tokenized: list[TokenizedGroup], mode: str) -> Dataset:
    """TRL's tokenized preference rows (prompt_ids, chosen_ids, rejected_ids), every group's pairs under
    `mode` (data.formats.comparisons.pair_indices: top-vs-rest or all C(K,2))."""
    rows = [
        {
            "prompt_ids": t.prompt_ids,
            "chosen_ids": t.response_ids[i],
            "rejected_ids": t.response_ids[j],
            "length": len(t.prompt_ids) + max(len(t.response_ids[i]), len(t.response_ids[j])),  # padded width
        }
        for t in tokenized
        for i, j in pair_indices(len(t.response_ids), mode)
    ]
    return Dataset.from_list(rows)


class StageDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on rows `pair_dataset` tokenized already (the same tokens the held-out accuracy
    scores, each group rendered once rather than every pair's prompt and answers again), batched by
    length on request in an order a resumed run replays (pipeline.trainer_metrics)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "length"]  # kept for the sampler; the collator skips it

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return replayable_train_sampler(self, dataset) or super()._get_train_sampler(train_dataset)


# ---- held-out preference accuracy ---------------------------------------------------------------------


@torch.no_grad()
def answer_logps(model, tokenized: list[TokenizedGroup], pad_id: int, batch_size: int, max_length: int) -> list:
    """Summed log-prob of every response of every group given its prompt, as TRL's loss sums it (sequences
    cut to max_length at the end, as its collator cuts them); groups one after another, best first. Rows are
    left-padded so every answer ends in the last column: the LM head runs on the answers' positions only."""
    seqs = [(t.prompt_ids, r) for t in tokenized for r in t.response_ids]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))  # less padding
    device = next(model.parameters()).device
    out = torch.empty(len(seqs), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [(seqs[i][0] + seqs[i][1])[:max_length] for i in idx]
        kept = torch.tensor([len(row) - len(seqs[i][0]) for i, row in zip(idx, rows, strict=True)], device=device)
        width = int(kept.max())  # >= 1: tokenize_groups dropped the prompts that fill max_length
        ids, mask = (t.to(device) for t in left_pad(rows, pad_id))
        logits = (
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
                logits_to_keep=width + 1,
            )
            .logits[:, :-1]
            .float()
        )  # the positions that predict the last `width` tokens
        logp = logits.gather(-1, ids[:, -width:, None]).squeeze(-1) - logits.logsumexp(-1)
        in_answer = torch.arange(width, device=device)[None] >= (width - kept)[:, None]
        out[idx] = (logp * in_answer).sum(1).double().cpu()
    return out.tolist()


def gold_scores(judge: WorldJudge, group: Group) -> list[float] | None:
    """The gold judge's score of each response, None for a prompt that is not the world's."""
    if not isinstance(group.prompt, str):
        return None
    try:
        return [judge.gold.judge(group.prompt, r).score for r in group.responses]
    except KeyError:
        return None


def preference_accuracy(rewards: torch.Tensor, groups: list[Group], judge: WorldJudge | None) -> dict:
    """Held-out metrics of the implicit rewards (one per response, groups best first), as the reward stage
    reports its reward model's: against the labels over all C(K,2) pairs and top-vs-rest, and on world
    prompts against the noise-free ranking (the pairs the gold judge orders strictly; a tie says nothing)."""
    sizes = [len(g.responses) for g in groups]
    better, worse, _ = group_pairs(sizes)
    per_group = list(torch.split(rewards, sizes))
    m = {
        "val_groups": len(groups),
        "val_pairs": len(better),
        "val_pair_accuracy": pair_accuracy(rewards, sizes).item(),
        "val_top_vs_rest_accuracy": torch.cat([r[0] > r[1:] for r in per_group]).float().mean().item(),
        "val_margin_mean": (rewards[better] - rewards[worse]).mean().item(),
    }
    if judge is None:
        return m
    right = pairs = 0
    ceiling = []  # a reward equal to the gold score, against these noisy labels (ties half)
    for g, r in zip(groups, per_group, strict=True):
        gold = gold_scores(judge, g)
        if gold is None:
            continue
        for i, j in pair_indices(len(gold), "all"):
            ceiling.append(1.0 if gold[i] > gold[j] else 0.5 if gold[i] == gold[j] else 0.0)
            if gold[i] != gold[j]:
                hi, lo = (i, j) if gold[i] > gold[j] else (j, i)
                right += int(r[hi] > r[lo])
                pairs += 1
    if pairs:
        m.update(val_gold_pair_accuracy=right / pairs, val_gold_pairs=pairs, val_label_ceiling_accuracy=mean(ceiling))
    return m


# ---- gold evaluation and KL against the reference -------------------------------------------------------


def gold_evaluation(cfg: DPOStageConfig, world: Path, prompts: list, policy, reference, tokenizer) -> tuple:
    """Greedy answers of this model and of the reference (SFT) to the world's held-out prompts, judged by
    the gold judge (reward.judging, as the SFT and PPO stages and `make eval` judge): gold scores, the win
    rate over SFT with its bootstrap 95% interval and ceiling, hallucination and refusal rates."""
    prompts = prompts[: cfg.eval_prompts if cfg.eval_prompts > 0 else None]
    ours = answer(policy, tokenizer, prompts, max_new_tokens=cfg.eval_max_new_tokens)
    theirs = answer(reference, tokenizer, prompts, max_new_tokens=cfg.eval_max_new_tokens)
    evaluation = judge_policies(
        WorldJudge.load(world), prompts, {"dpo": ours, "sft": theirs}, [("dpo", "sft")], n_boot=cfg.bootstrap
    )
    dpo, sft, win = evaluation.summaries["dpo"], evaluation.summaries["sft"], evaluation.win_rates["dpo_vs_sft"]
    metrics = {
        "eval_prompts": len(prompts),
        "gold_score": dpo["gold_score"],
        "gold_score_ci": dpo["gold_score_ci"],
        "sft_gold_score": sft["gold_score"],
        "gold_win_rate": win["win_rate"],
        "gold_win_rate_ci": win["ci"],
        "gold_win_rate_ceiling": win["ceiling"],
        "gold_win_rate_by_family": win["by_family"],
        "hallucination_rate": dpo["hallucination_rate"],
        "sft_hallucination_rate": sft["hallucination_rate"],
        "harmful_refusal_rate": dpo["refusal_accuracy"],
        "sft_harmful_refusal_rate": sft["refusal_accuracy"],
        "over_refusal_rate": dpo["over_refusal_rate"],
        "response_words": dpo["response_words"],
        "sft_response_words": sft["response_words"],
        "gold_labels": {label: n for label, n in dpo["labels"].items() if n},
        "sft_gold_labels": {label: n for label, n in sft["labels"].items() if n},
        "gold_by_family": dpo["gold_score_by_family"],
        "sft_gold_by_family": sft["gold_score_by_family"],
    }
    samples = [{"prompt": p, "dpo": a, "sft": b} for p, a, b in list(zip(prompts, ours, theirs, strict=True))[:8]]
    return metrics, samples


def kl_to_reference(cfg: DPOStageConfig, prompts: list, policy, reference, tokenizer) -> dict:
    """KL(this model || SFT) in nats per answer, from one sampled answer per held-out prompt (k1, summed
    over the answer: pipeline.divergence), with its bootstrap 95% interval."""
    prompts = prompts[: cfg.kl_prompts if cfg.kl_prompts > 0 else None]
    kls, lengths = sampled_kl(
        policy, reference, tokenizer, prompts, cfg.eval_max_new_tokens, cfg.kl_temperature, cfg.seed
    )
    return {
        "kl_to_sft": mean(kls),
        "kl_to_sft_ci": list(bootstrap_ci(kls, cfg.bootstrap, cfg.seed)),
        "kl_temperature": cfg.kl_temperature,
        "kl_prompts": len(kls),
        "kl_response_tokens": mean(lengths),
    }


# ---- the recipe's steps, in order -----------------------------------------------------------------------


def settle_data_files(cfg: DPOStageConfig) -> tuple[bool, Path | None]:
    """Resolve the data-file defaults in cfg. Returns whether the held-out groups come out of train_files
    (comparisons of your own: the world's held-out file says nothing of them) and the world that judges
    (None when the comparisons are your own or there is no world)."""
    if [f.lower() for f in cfg.val_files] == ["none"]:  # a list cannot be empty on the command line
        cfg.val_files = []
    run_world = Path(cfg.run_dir) / "world"
    own_data = not trains_on_world(cfg.train_files, run_world)
    split_val = own_data and [Path(f).resolve() for f in cfg.val_files] == [
        (run_world / "comparisons_val.jsonl").resolve()
    ]
    if split_val:
        cfg.val_files = []
    world = Path(cfg.world_dir)
    return split_val, (world if not own_data and (world / "truth.json").is_file() else None)


def start_processes() -> PartialState:
    # On CPU accelerate needs cpu=True to run DDP (gloo) under torchrun (pipeline.runtime.cpu_and_backend).
    stage_decides_training_settings()
    use_cpu, backend = cpu_and_backend()
    return PartialState(cpu=use_cpu, backend=backend)


def parent_model(cfg: DPOStageConfig) -> tuple[str, dict | None]:
    """RUN/sft (must be finished), or --init_from: a causal LM with a chat template, the start and the reference."""
    if cfg.init_from:
        path, manifest = resolve_init(cfg.init_from)
    else:
        path = str(Path(cfg.run_dir) / "sft")
        manifest = require_stage(path, "sft", cfg.run_dir)
    try:
        heads = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{path}: could not read a model config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if (manifest or {}).get("stage") == "reward" or (
        heads and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in heads)
    ):
        raise PipelineError(
            f"{path}: parent is not a causal LM ({heads[0] if heads else 'reward model'}); start DPO from an sft stage"
        )
    return path, manifest


def chat_tokenizer(path: str):
    """The parent's tokenizer; DPO compares answers in the chat format SFT trained on, so it must have one."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"{path}: tokenizer has no chat template; DPO compares answers in the SFT model's chat format "
            "(train the parent with the pipeline or add its template)"
        )
    with template_accepts(path):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}], tokenize=False
        )
    if "ping" not in text or "pong" not in text:
        raise PipelineError(f"{path}: chat template does not render both the prompt and the answer")
    use_turn_end_as_eos(tokenizer)  # answers end where the template closes the turn, as SFT set it
    return tokenizer


def context_length(path: str) -> int:
    return getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 10**9


def stage_run(cfg: DPOStageConfig, stage_dir: Path, parent_path: str, parent_manifest, is_main: bool) -> StageRun:
    """The stage directory's bookkeeping: its config, parent and data files."""
    data_files = cfg.train_files + cfg.val_files
    return StageRun("dpo", stage_dir, config_dict(cfg), parent_manifest, parent_path, data_files, is_main)


@dataclass
class Comparisons:
    train: list[Group]
    val: list[Group]


def load_comparisons(cfg: DPOStageConfig, split_val: bool, is_main: bool) -> Comparisons:
    """The training groups and the held-out ones (with split_val: val_fraction of the training groups), read
    as the reward stage reads them (data.formats.comparisons: the same formats, the same one-line errors)."""
    train = load_groups(cfg.train_files, cfg.skip_invalid, cfg.max_train_groups)
    if split_val:
        train, val = split_holdout(train, cfg.val_fraction, cfg.seed)
        val = val[: cfg.max_val_groups or None]
        if is_main:
            print(f"[dpo] comparisons of your own: {len(val)} of {len(train) + len(val)} groups held out", flush=True)
    else:
        val = load_groups(cfg.val_files, cfg.skip_invalid, cfg.max_val_groups) if cfg.val_files else []
    return Comparisons(train, val)


def begins(run: StageRun, force: bool, state: PartialState) -> bool:
    """Whether the stage runs (not finished already): the main process decides, the others follow."""
    if not broadcast_object_list([run.begin(force) if state.is_main_process else None])[0]:
        return False
    state.wait_for_everyone()
    return True


@dataclass
class Data:
    train: Dataset
    val: Dataset | None  # held-out pairs for the loss during training (eval_every)
    val_groups: list[Group]  # the held-out groups kept, and their tokens, for the final accuracy
    val_tokens: list[TokenizedGroup]
    train_groups: int


def tokenized(cfg: DPOStageConfig, data: Comparisons, tokenizer, max_length: int) -> Data:
    train_tokens, train_groups = tokenize_groups(data.train, tokenizer, max_length, "training")
    val_tokens, val_groups = tokenize_groups(data.val, tokenizer, max_length, "held-out")
    val = pair_dataset(val_tokens, cfg.pairs) if val_tokens and cfg.eval_every else None
    return Data(pair_dataset(train_tokens, cfg.pairs), val, val_groups, val_tokens, len(train_groups))


def training_args(cfg: DPOStageConfig, run: StageRun, max_length: int, evaluates: bool) -> DPOConfig:
    use_cpu, backend = cpu_and_backend()  # as the process group was started (start_processes)
    return DPOConfig(
        output_dir=str(run.checkpoints),
        use_cpu=use_cpu,
        ddp_backend=backend,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # RPO (sft_weight > 0): TRL adds its "sft" loss, the chosen answers' mean token NLL, with that weight.
        loss_type=[cfg.loss_type, "sft"] if cfg.sft_weight else [cfg.loss_type],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.eval_batch_size,
        max_length=max_length,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        bf16=cfg.mixed_precision == "bf16",  # TRL defaults it to True; on a CPU we want fp32
        fp16=cfg.mixed_precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,  # TRL turns it on by default; tiny models need not
        torch_compile=cfg.compile,
        disable_dropout=True,
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=cfg.eval_every or None,
        report_to=["wandb"] if wandb_enabled() else "none",
        run_name=f"{cfg.run_dir}/dpo",
        disable_tqdm=bool(os.environ.get("CI")) and not sys.stderr.isatty(),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


def adapters(cfg: DPOStageConfig):
    """LoRA adapters (pipeline.lora), None at lora_r 0. With them TRL's reference is the model with its
    adapters switched off: the SFT weights, no second copy in memory."""
    return lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)


def make_trainer(cfg: DPOStageConfig, run: StageRun, parent_path: str, tokenizer, data: Data, max_length: int):
    """TRL's DPOTrainer, quiet on the console. Its reference: a second copy of the parent (TRL loads it), none
    in memory while training with precompute_ref_log_probs (scored once up front), or with LoRA the adapters off."""
    set_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(parent_path, dtype=torch.float32)
    trainer = StageDPOTrainer(
        model=model,
        args=training_args(cfg, run, max_length, data.val is not None),
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run.dir)],
        peft_config=adapters(cfg),
    )
    quiet_console(trainer)
    return trainer


def describe(cfg: DPOStageConfig, data: Data, state: PartialState, threads: int, max_length: int) -> None:
    reference = (
        "the SFT model with adapters off"
        if cfg.lora_r
        else "log-probs precomputed"
        if cfg.precompute_ref_log_probs
        else "a frozen copy of the SFT model"
    )
    loss = f"{cfg.loss_type} + {cfg.sft_weight} x NLL of the chosen" if cfg.sft_weight else cfg.loss_type
    state.print(
        f"[dpo] {data.train_groups} training groups -> {len(data.train)} pairs ({cfg.pairs}), "
        f"{len(data.val_groups)} held-out groups; loss {loss}, beta {cfg.beta}; reference: {reference}; "
        f"max_length {max_length}; {state.num_processes} process(es) x {threads} thread(s); "
        f"{precision_line(cfg.mixed_precision)}",
        flush=True,
    )


def train(trainer: DPOTrainer, run: StageRun, state: PartialState) -> tuple[TrainOutput, float]:
    """Train, resuming from the newest complete checkpoint a killed run left (pipeline.stage). Returns
    Trainer's result and the whole run's training loss (Trainer's covers the steps since the resume only)."""
    resume, resume_step = last_complete_checkpoint(run.checkpoints, remove_incomplete=state.is_main_process)
    if resume and state.is_main_process:
        truncate_metrics(run.dir / "metrics.jsonl", resume_step)
        print(f"[dpo] resumed from {resume} (step {resume_step})", flush=True)
    state.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=resume)
    loss = whole_run_loss(trainer.state.log_history, resume_step, result.global_step, result.training_loss)
    if not torch.isfinite(torch.tensor(loss)):
        raise PipelineError(f"dpo: training loss became {loss}; lower lr (now {trainer.args.learning_rate})")
    return result, loss


def save_plain_checkpoint(trainer: DPOTrainer, cfg: DPOStageConfig, parent_path: str, tokenizer, stage_dir: Path):
    """The trained model as a plain checkpoint (the parent's generation config kept). With LoRA the adapters
    are merged into a fresh copy on the main process, given the weights gathered from every process."""
    if not cfg.lora_r:
        trainer.save_model(str(stage_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        from peft import get_peft_model

        fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(parent_path, dtype=torch.float32), adapters(cfg))
        merged_from_state_dict(fresh, state_dict).save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)
    trainer.accelerator.wait_for_everyone()


def evaluate(cfg, stage_dir: Path, parent_path: str, tokenizer, data: Data, world, max_length, device) -> tuple:
    """On the saved checkpoint (never the trainer's model, which FSDP or ZeRO-3 may hold sharded) against the
    parent: held-out preference accuracy of the implicit reward beta * log pi/pi_ref, KL to SFT on held-out
    prompts, and on the world the gold evaluation. Returns (metrics, samples)."""
    policy = AutoModelForCausalLM.from_pretrained(stage_dir, dtype=torch.float32).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(parent_path, dtype=torch.float32).to(device).eval()
    metrics, samples = {}, []
    if data.val_groups:
        logps = [
            torch.tensor(answer_logps(m, data.val_tokens, tokenizer.pad_token_id, cfg.eval_batch_size, max_length))
            for m in (policy, reference)
        ]
        judge = WorldJudge.load(world) if world is not None else None
        metrics.update(preference_accuracy(cfg.beta * (logps[0] - logps[1]), data.val_groups, judge))
    eval_file = world / "eval_prompts.jsonl" if world is not None else None
    if eval_file is not None and eval_file.is_file():
        prompts = [require_text(r, "prompt") for r in load_records([str(eval_file)])]
        if cfg.eval_prompts != 0:
            gold, samples = gold_evaluation(cfg, world, prompts, policy, reference, tokenizer)
            metrics.update(gold)
    else:  # comparisons of your own: their held-out prompts, each once
        prompts = list({repr(g.prompt): g.prompt for g in data.val_groups}.values())
    if cfg.kl_prompts != 0 and prompts:
        metrics.update(kl_to_reference(cfg, prompts, policy, reference, tokenizer))
    return metrics, samples


def report(metrics: dict, stage_dir: Path) -> None:
    def fmt(key: str, digits: int = 3) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    line = (
        f"[dpo] done in {metrics['train_seconds']}s: held-out preference accuracy {fmt('val_pair_accuracy')} "
        f"(labels), {fmt('val_gold_pair_accuracy')} (noise-free); KL to SFT {fmt('kl_to_sft', 2)}"
    )
    if "gold_win_rate" in metrics:
        low, high = metrics["gold_win_rate_ci"]
        line += (
            f"; gold score {fmt('gold_score')} vs SFT {fmt('sft_gold_score')}, win rate {fmt('gold_win_rate')} "
            f"[{low:.3f}, {high:.3f}] on {metrics['eval_prompts']} held-out prompts"
        )
    print(f"{line} -> {stage_dir}", flush=True)


# ---- the stage ------------------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> None:
    # 1. Config, parent and data - all checked before anything is written.
    cfg = parse_config(DPOStageConfig, "dpo", argv)
    threads = set_threads(cfg.threads)
    split_val, world = settle_data_files(cfg)
    state = start_processes()
    stage_dir = Path(cfg.run_dir) / "dpo"
    parent_path, parent_manifest = parent_model(cfg)
    tokenizer = chat_tokenizer(parent_path)
    comparisons = load_comparisons(cfg, split_val, state.is_main_process)
    max_length = min(cfg.max_length, context_length(parent_path))
    data = tokenized(cfg, comparisons, tokenizer, max_length)
    run = stage_run(cfg, stage_dir, parent_path, parent_manifest, state.is_main_process)
    if not begins(run, cfg.force, state):
        return
    wandb_env(stage_dir)

    # 2. Trainer: TRL's DPOTrainer from the parent, which is also the reference.
    trainer = make_trainer(cfg, run, parent_path, tokenizer, data, max_length)
    describe(cfg, data, state, threads, max_length)

    # 3. Train, resuming from the newest complete checkpoint a killed run left.
    result, train_loss = train(trainer, run, state)
    checksums = rank_checksums(trainer.accelerator, trainer.model)  # replicas in sync (2-process tests)

    # 4. Save a plain checkpoint; models loaded from here on, on the main process alone, load whole.
    load_models_whole()
    save_plain_checkpoint(trainer, cfg, parent_path, tokenizer, stage_dir)
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    (stage_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of Trainer internals, not part of a model

    # 5. Evaluate against the parent (held-out preference accuracy, KL, gold), then the manifest, written last.
    metrics, samples = evaluate(cfg, stage_dir, parent_path, tokenizer, data, world, max_length, state.device)
    metrics.update(
        train_loss=train_loss,
        train_steps=result.global_step,
        train_groups=data.train_groups,
        train_pairs=len(data.train),
        train_seconds=round(result.metrics.get("train_runtime", 0.0), 1),
        peak_memory_mb=round(peak_memory_mb()),
    )
    trainer.log({k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))})
    facts = {"samples": samples, "processes": state.num_processes, "threads": threads, "max_length": max_length}
    facts["precision"] = precision_facts(cfg.mixed_precision)
    run.finish(metrics, {**facts, "weights_checksum_per_rank": checksums})
    report(metrics, stage_dir)
