"""Supervised fine-tuning: imitate labeler demonstrations (InstructGPT step 1, Ouyang et al. 2022, sec. 3.5).

Every demonstration becomes TRL's conversational prompt/completion pair, so the tokenizer's chat template
decides the tokens - the same template the reward model, PPO and chat use later - and TRL's SFTTrainer
puts the loss on the completion (the labeler's answer) only.

Recipe: parse -> parent -> demonstrations (optionally plus pretraining documents) -> model -> trainer
(optionally LoRA) -> train (resumable) -> validation loss -> save a plain merged checkpoint -> gold
evaluation vs the parent -> manifest.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from data.formats.demonstrations import column_map, load_demonstrations
from data.formats.fields import require_text
from data.formats.text import load_texts
from data.loading import load_records, split_holdout
from data.tokenizer import ensure_chat_ready, template_accepts, use_turn_end_as_eos
from pipeline.config import config_dict, parse_config
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer
from pipeline.lora import lora_config
from pipeline.packing import packs_sequences
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
from pipeline.tracking import truncate_metrics, wandb_enabled, wandb_env
from pipeline.trainer_metrics import JsonlMetricsCallback, quiet_console, replayable_train_sampler, whole_run_loss
from reward.judging import Evaluation, WorldJudge, judge_policies
from stages.sft.config import SFTStageConfig

# ---- demonstrations (their formats: data.formats.demonstrations) ---------------------------------


def validation_files(cfg: SFTStageConfig) -> list[str]:
    """--val_files, else the world's validation split when training on the world's demonstrations;
    an empty list means: hold out val_fraction of the training records."""
    if cfg.val_files:
        return list(cfg.val_files)
    world_train = Path(cfg.run_dir) / "world" / "sft_train.jsonl"
    if [Path(f) for f in cfg.train_files] == [world_train]:
        return [str(world_train.with_name("sft_val.jsonl"))]
    return []


def fit_to_length(examples: list[dict], tokenizer, max_length: int, what: str) -> tuple[list[dict], dict]:
    """Drop demonstrations whose prompt alone fills max_length: truncation (which keeps the start) would
    leave no completion token to learn from. Longer completions are only cut; both are counted."""

    def lengths(conversations, **kwargs) -> list[int]:  # rendered and tokenized in one batch: fast
        try:
            texts = tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)
        except jinja2.TemplateError:  # find the record the template refuses, and say which
            for ex, conversation in zip(examples, conversations, strict=False):
                with template_accepts(ex["_where"]):
                    tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
            raise
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    prompt_len = lengths([ex["prompt"] for ex in examples], add_generation_prompt=True)
    full_len = lengths([ex["prompt"] + ex["completion"] for ex in examples])
    kept, dropped, cut = [], [], 0
    for ex, n_prompt, n_full in zip(examples, prompt_len, full_len, strict=False):
        if n_prompt >= max_length:
            dropped.append(ex["_where"])
            continue
        cut += n_full > max_length
        kept.append(ex)
    if dropped and not kept:
        raise PipelineError(
            f"{dropped[0]}: every {what} record's prompt fills max_length {max_length} tokens, so no "
            f"completion token is left to train on; raise --max_length"
        )
    if dropped:
        PartialState().print(
            f"[sft] warning: dropped {len(dropped)} of {len(examples)} {what} records whose prompt "
            f"fills max_length {max_length} (first: {dropped[0]})",
            flush=True,
        )
    return kept, {"dropped": len(dropped), "truncated": cut}


def cut_to_max_length(tokenized: Dataset, max_length: int) -> Dataset:
    """Cut tokenized demonstrations at the end to max_length and drop those left with no answer token,
    as TRL does when batches are padded."""
    if max(len(ids) for ids in tokenized["input_ids"]) <= max_length:
        return tokenized
    cut = tokenized.map(lambda r: {"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]})
    return cut.filter(lambda r: any(label != -100 for label in r["labels"]))


def as_dataset(examples: list[dict]) -> Dataset:
    return Dataset.from_list([{"prompt": ex["prompt"], "completion": ex["completion"]} for ex in examples])


def mix_pretraining_text(
    train: Dataset, texts: list[str], cfg: SFTStageConfig, tokenizer, document_end: int
) -> tuple[Dataset, int]:
    """The trainer's tokenized demonstrations plus round(lm_ratio x demonstrations) pretraining documents,
    each [bos] text [document_end] as pretraining saw it, cut to max_length, with a loss on every token.

    Why: a few epochs on a few hundred facts' questions overwrite facts that pretraining stored but no
    demonstration asks about (on the world, SFT alone forgets about half of the held-out ones) - the
    regression InstructGPT's PPO-ptx counters by mixing pretraining gradients into PPO."""
    count = round(cfg.lm_ratio * len(train))
    if count == 0 or not texts:
        return train, 0
    texts = random.Random(cfg.seed).sample(texts, min(count, len(texts)))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [
        (bos + doc + [document_end])[: cfg.max_length]
        for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    train = train.select_columns(["input_ids", "labels"])  # what the collator uses of SFTTrainer's preparation
    documents = Dataset.from_dict({"input_ids": ids, "labels": ids}).cast(train.features)
    return concatenate_datasets([train, documents]), len(ids)


# ---- parent model ------------------------------------------------------------------------------


def parent_model(cfg: SFTStageConfig):
    """RUN/pretrain by default (it must be finished), or any finished stage / HF checkpoint / Hub id.
    Returns (path, manifest or None, model config)."""
    if cfg.init_from:
        path, manifest = resolve_init(cfg.init_from)
    else:
        path = str(Path(cfg.run_dir) / "pretrain")
        manifest = require_stage(path, "pretrain", cfg.run_dir)
    if manifest is not None and manifest.get("stage") == "reward":
        raise PipelineError(
            f"{path}: parent is not a causal LM (it is a reward model); start from a pretrain or sft stage"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{path}: could not read a model config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    heads = config.architectures or []
    if heads and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in heads):
        raise PipelineError(
            f"{path}: parent is not a causal LM (architecture {heads[0]}); SFT needs a language-model head"
        )
    return path, manifest, config


def load_tokenizer(path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{path}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    ensure_chat_ready(tokenizer)  # a foreign base model gets our pad token and chat template
    return tokenizer


def load_causal_lm(path: str, tokenizer):
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"{path}: parent is not a causal LM that transformers can load "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    ensure_chat_ready(tokenizer, model)  # room for the tokens it added; the config learns the pad/eos/bos ids
    return model


# ---- trainer -----------------------------------------------------------------------------------


def quiet() -> bool:
    """No progress bars in CI logs (as pipeline.runtime.progress): Trainer's, datasets' and loading bars."""
    if os.environ.get("CI") and not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        return True
    return False


def training_args(cfg: SFTStageConfig, stage_dir: Path) -> SFTConfig:
    stage_decides_training_settings()
    cpu, backend = cpu_and_backend()
    return SFTConfig(
        output_dir=str(stage_dir / "checkpoints"),
        # Loss on the demonstration's answer only: the prompt is given, not imitated.
        completion_only_loss=True,
        # Padding-free batches: TRL leaves truncation to us (cut_to_max_length), the same cut at the end.
        max_length=None if cfg.padding_free else cfg.max_length,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        padding_free=cfg.padding_free,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        bf16=cfg.mixed_precision == "bf16",  # TRL defaults it to True: ours is resolved (pipeline.runtime)
        fp16=cfg.mixed_precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,  # TRL turns it on by default; tiny models need not
        torch_compile=cfg.compile,
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.keep_checkpoints,
        logging_steps=cfg.log_every,
        report_to=["wandb"] if wandb_enabled() else "none",
        run_name=f"{cfg.run_dir}/sft",
        seed=cfg.seed,
        disable_tqdm=quiet(),
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        # Without use_cpu, accelerate treats torchrun's CPU workers as unrelated single processes.
        use_cpu=cpu,
        ddp_backend=backend,
    )


def adapters(cfg: SFTStageConfig):
    """This stage's LoRA adapters (pipeline.lora), None at lora_r 0."""
    return lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)


class StageSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose length-grouped batches (--group_by_length) a resumed run replays: drawn from
    (seed, epoch) rather than the global RNG (pipeline.trainer_metrics.EpochSeededLengthSampler)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return replayable_train_sampler(self, dataset) or super()._get_train_sampler(train_dataset)


def build_trainer(
    cfg: SFTStageConfig, args: SFTConfig, model, tokenizer, train: Dataset, val: Dataset | None, stage_dir: Path
) -> SFTTrainer:
    trainer = StageSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=adapters(cfg),
        callbacks=[JsonlMetricsCallback(stage_dir)],
    )
    quiet_console(trainer)
    if args.padding_free:
        trainer.train_dataset = cut_to_max_length(trainer.train_dataset, cfg.max_length)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = cut_to_max_length(trainer.eval_dataset, cfg.max_length)
    return trainer


def save_plain_checkpoint(
    trainer: SFTTrainer,
    cfg: SFTStageConfig,
    parent_path: str,
    tokenizer,
    stage_dir: Path,
    generation_config: GenerationConfig,
) -> None:
    """The trained model as a plain checkpoint later stages load without peft. With LoRA the adapters
    are folded into a fresh copy on the main process, given the weights gathered from every process
    (never the live model, which FSDP or ZeRO-3 may hold sharded: pipeline.runtime.merged_from_state_dict)."""
    if not cfg.lora_r:
        trainer.model.generation_config = generation_config
        trainer.save_model(str(stage_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        from peft import get_peft_model

        fresh = get_peft_model(load_causal_lm(parent_path, tokenizer), adapters(cfg))
        model = merged_from_state_dict(fresh, state_dict)
        model.generation_config = generation_config
        model.save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)
    trainer.accelerator.wait_for_everyone()


# ---- gold evaluation on the embedded world -----------------------------------------------------


def gold_metrics(evaluation: Evaluation) -> dict:
    """The manifest's gold metrics of this model ("sft") and of its parent ("base_..."), from reward.judging's
    summaries: mean score, hallucination rate, refusal accuracy on harmful requests, the labels given and
    the mean score of each family asked, and the win rate against the parent (ties half)."""
    metrics = {"win_rate_vs_base": evaluation.win_rates["sft_vs_base"]["win_rate"]}
    for prefix, name in (("", "sft"), ("base_", "base")):
        s = evaluation.summaries[name]
        metrics.update(
            {
                f"{prefix}gold_score": s["gold_score"],
                f"{prefix}hallucination_rate": s["hallucination_rate"],
                f"{prefix}harmful_refusal_rate": s["refusal_accuracy"],
                f"{prefix}gold_labels": {label: n for label, n in s["labels"].items() if n},
                f"{prefix}gold_by_family": {f: m for f, m in s["gold_score_by_family"].items() if m is not None},
            }
        )
    return metrics


def sample_indices(families: list[str], k: int) -> list[int]:
    """One prompt per family first, then the next ones in order: a small, varied showcase."""
    first = {}
    for i, f in enumerate(families):
        first.setdefault(f, i)
    picked = sorted(first.values())[:k]
    picked += [i for i in range(len(families)) if i not in picked][: k - len(picked)]
    return sorted(picked)


def gold_evaluation(
    cfg: SFTStageConfig, world: Path, stage_dir: Path, tokenizer, parent_path: str, device
) -> tuple[dict, list[dict]]:
    """Greedy answers to held-out world prompts from the saved model and from its parent, judged by
    the gold labeler. The saved checkpoint, not the trainer's model: under FSDP or ZeRO-3 that one is
    sharded, and a forward on the main process alone would wait for the others forever."""
    model = load_causal_lm(str(stage_dir), tokenizer).to(device)
    judge = WorldJudge.load(world)
    records = load_records([str(world / "eval_prompts.jsonl")])
    if cfg.eval_prompts > 0:
        records = records[: cfg.eval_prompts]
    prompts = [require_text(r, "prompt") for r in records]
    base_tokenizer = load_tokenizer(parent_path)
    use_turn_end_as_eos(base_tokenizer)  # the parent's answer, too, ends where its turn ends
    base = load_causal_lm(parent_path, base_tokenizer)
    base.to(device)
    ours = answer(model, tokenizer, prompts, max_new_tokens=cfg.eval_max_new_tokens)
    theirs = answer(base, base_tokenizer, prompts, max_new_tokens=cfg.eval_max_new_tokens)
    del base
    evaluation = judge_policies(judge, prompts, {"sft": ours, "base": theirs}, pairs=[("sft", "base")])
    sft, parent = evaluation.judged["sft"], evaluation.judged["base"]
    metrics = {**gold_metrics(evaluation), "eval_prompts": len(prompts)}
    samples = [
        {
            "prompt": prompts[i],
            "family": sft.families[i],
            "sft": ours[i],
            "sft_label": sft.labels[i],
            "base": theirs[i],
            "base_label": parent.labels[i],
        }
        for i in sample_indices(sft.families, cfg.num_samples)
    ]
    return metrics, samples


def world_for_eval(cfg: SFTStageConfig) -> Path | None:
    """The world to judge on: --world_dir (must exist), else RUN/world if it holds a truth.json and the
    demonstrations are the world's (its judge says nothing of a model tuned on data of your own)."""
    if cfg.eval_prompts == 0:
        return None
    if cfg.world_dir:
        world = Path(cfg.world_dir)
        for name in ("truth.json", "eval_prompts.jsonl"):
            if not (world / name).is_file():
                raise PipelineError(
                    f"{world / name}: no such file; generate the world with `python -m world --out {world}`"
                )
        return world
    world = Path(cfg.run_dir) / "world"
    judged = trains_on_world(cfg.train_files, world) and (world / "truth.json").is_file()
    return world if judged and (world / "eval_prompts.jsonl").is_file() else None


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"  # None: nothing to average (reward.judging)


# ---- the recipe's steps, in order ---------------------------------------------------------------


def check_context(cfg: SFTStageConfig, parent_path: str, parent_config) -> None:
    context = getattr(parent_config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise PipelineError(
            f"max_length {cfg.max_length} exceeds the parent's context of {context} tokens "
            f"({parent_path}); lower --max_length"
        )


def chat_tokenizer(parent_path: str, is_main: bool) -> tuple[Any, int]:
    """The parent's tokenizer with the chat template's turn end as EOS, and the EOS pretraining documents
    end with (mixed-in documents keep theirs)."""
    tokenizer = load_tokenizer(parent_path)
    document_end = tokenizer.eos_token_id
    replaced = use_turn_end_as_eos(tokenizer)
    if replaced and is_main:
        print(
            f"[sft] {parent_path}: the chat template closes answers with {tokenizer.eos_token}, which becomes EOS "
            f"(was {replaced}): generation and PPO stop there",
            flush=True,
        )
    return tokenizer, document_end


def stage_run(
    cfg: SFTStageConfig,
    stage_dir: Path,
    parent_path: str,
    parent_manifest: dict | None,
    val_files: list[str],
    is_main: bool,
) -> StageRun:
    """The stage directory's bookkeeping: its config, parent and data files (pretraining text when mixed in)."""
    data_files = list(cfg.train_files) + val_files + (list(cfg.lm_files) if cfg.lm_ratio > 0 else [])
    return StageRun("sft", stage_dir, config_dict(cfg), parent_manifest, parent_path, data_files, is_main)


@dataclass
class Demonstrations:
    train: list[dict]
    val: list[dict]
    skipped: int  # unusable records passed over (skip_invalid)
    dropped: int  # records whose prompt alone fills max_length
    truncated: int  # records cut to max_length
    lm_texts: list[str]  # pretraining documents to mix in (lm_ratio > 0)


def load_data(cfg: SFTStageConfig, val_files: list[str], tokenizer) -> Demonstrations:
    """Training and validation demonstrations as prompt/completion conversations (held out of the training
    records without val_files), fitted to max_length; and the pretraining text to mix in at step 4."""
    columns = column_map(cfg.columns)
    demonstrations, skipped = load_demonstrations(cfg.train_files, columns, cfg.skip_invalid)
    train, train_fit = fit_to_length(demonstrations, tokenizer, cfg.max_length, "training")
    if val_files:
        held_out, skipped_val = load_demonstrations(val_files, columns, cfg.skip_invalid)
        val, val_fit = fit_to_length(held_out, tokenizer, cfg.max_length, "validation")
        skipped += skipped_val
    else:
        train, val = split_holdout(train, cfg.val_fraction, cfg.seed)
        val_fit = {"dropped": 0, "truncated": 0}
    lm_texts = load_texts(cfg.lm_files, cfg.lm_field) if cfg.lm_ratio > 0 else []
    return Demonstrations(
        train,
        val,
        skipped,
        train_fit["dropped"] + val_fit["dropped"],
        train_fit["truncated"] + val_fit["truncated"],
        lm_texts,
    )


def check_padding_free(cfg: SFTStageConfig, args: SFTConfig, model, parent_path: str) -> None:
    """Padded batches (cut at max_length) instead, if the model does not keep packed sequences apart."""
    if cfg.padding_free and not packs_sequences(model):
        PartialState().print(
            f"[sft] {parent_path}: the model does not keep packed sequences apart; padding batches instead", flush=True
        )
        args.padding_free, args.max_length = False, cfg.max_length


def make_trainer(
    cfg: SFTStageConfig, args: SFTConfig, model, tokenizer, data: Demonstrations, document_end: int, stage_dir: Path
) -> tuple[SFTTrainer, int]:
    """The trainer on the demonstrations, plus the pretraining documents mixed in; and how many those are."""
    if not data.val:
        args.eval_strategy = "no"  # a single demonstration leaves nothing to validate on
    trainer = build_trainer(
        cfg, args, model, tokenizer, as_dataset(data.train), as_dataset(data.val) if data.val else None, stage_dir
    )
    trainer.train_dataset, lm_documents = mix_pretraining_text(
        trainer.train_dataset, data.lm_texts, cfg, tokenizer, document_end
    )
    return trainer, lm_documents


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total). ZeRO-3 holds partitions; ds_numel is a parameter's whole size."""
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def resume_point(run: StageRun, is_main: bool) -> tuple[str | None, int]:
    """The newest complete checkpoint a killed run left and its step, or (None, 0); the metrics logged after
    it are dropped."""
    resume, resume_step = last_complete_checkpoint(run.checkpoints, remove_incomplete=is_main)
    PartialState().wait_for_everyone()
    if is_main:
        truncate_metrics(run.dir / "metrics.jsonl", resume_step)
        if resume:
            print(f"[sft] resumed from {resume} (step {resume_step})", flush=True)
    return resume, resume_step


def describe(
    cfg: SFTStageConfig,
    data: Demonstrations,
    lm_documents: int,
    trainable: int,
    total: int,
    processes: int,
    threads: int,
) -> None:
    mixed = f" + {lm_documents} pretraining documents" if lm_documents else ""
    print(
        f"[sft] {len(data.train)} demonstrations{mixed} ({len(data.val)} held out), {trainable / 1e6:.2f}M of "
        f"{total / 1e6:.2f}M parameters trained{' (LoRA)' if cfg.lora_r else ''}, {processes} process(es) x "
        f"{threads} thread(s); {precision_line(cfg.mixed_precision)}",
        flush=True,
    )


def whole_train_loss(trainer: SFTTrainer, result: TrainOutput, resume_step: int, lr: float) -> float:
    # Trainer's training_loss covers the steps since the resume only; the manifest reports the whole run's.
    train_loss = whole_run_loss(
        trainer.state.log_history, resume_step, trainer.state.global_step, result.training_loss
    )
    if not torch.isfinite(torch.tensor(train_loss)):
        raise PipelineError(f"sft: training loss became {train_loss}; lower lr (now {lr})")
    return train_loss


def greedy_generation_config(cfg: SFTStageConfig, tokenizer) -> GenerationConfig:
    """Greedy answers ending at the turn end (EOS), as the gold evaluation asks them."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=cfg.eval_max_new_tokens,
    )


def training_metrics(
    trainer: SFTTrainer,
    result: TrainOutput,
    data: Demonstrations,
    lm_documents: int,
    val_loss: float | None,
    train_loss: float,
    trainable: int,
    total: int,
) -> dict:
    return {
        "val_loss": val_loss,
        "train_loss": train_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_records": len(data.train),
        "val_records": len(data.val),
        "lm_documents": lm_documents,
        "dropped_records": data.dropped,
        "skipped_records": data.skipped,
        "truncated_records": data.truncated,
        "params": total,
        "trainable_params": trainable,
        "train_seconds": result.metrics.get("train_runtime"),
    }


def manifest_facts(
    cfg: SFTStageConfig, samples: list[dict], processes: int, threads: int, checksums: list[float]
) -> dict:
    """What the manifest records beside the metrics: sample answers and how the run ran."""
    return {
        "samples": samples,
        "processes": processes,
        "threads": threads,
        "precision": precision_facts(cfg.mixed_precision),
        "lora": bool(cfg.lora_r),
        "weights_checksum_per_rank": checksums,
    }


def report(metrics: dict, samples: list[dict], world: Path | None, stage_dir: Path) -> None:
    val_loss = metrics["val_loss"]
    line = f"[sft] done: val loss {val_loss:.3f}" if val_loss is not None else "[sft] done"
    if world is not None:
        line += (
            f", gold score {_fmt(metrics['gold_score'], 3)} vs parent {_fmt(metrics['base_gold_score'], 3)}, "
            f"win rate {_fmt(metrics['win_rate_vs_base'], 2)} on {metrics['eval_prompts']} held-out prompts"
        )
    print(f"{line} -> {stage_dir}", flush=True)
    for s in samples:
        print(
            f"  {s['prompt']!r}\n    sft  [{s['sft_label']}] {s['sft']!r}\n    base [{s['base_label']}] {s['base']!r}",
            flush=True,
        )


# ---- the recipe ---------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> None:
    # 1. Config, parent, and the stage directory: finished already? resumable checkpoints?
    cfg = parse_config(SFTStageConfig, "sft", argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = set_threads(cfg.threads)
    stage_dir = Path(cfg.run_dir) / "sft"
    wandb_env(stage_dir)
    args = training_args(cfg, stage_dir)
    args.device  # noqa: B018 - sets up the process group (torchrun / accelerate launch) before we ask who is main
    is_main = args.process_index == 0
    parent_path, parent_manifest, parent_config = parent_model(cfg)
    check_context(cfg, parent_path, parent_config)
    world = world_for_eval(cfg)
    val_files = validation_files(cfg)
    run = stage_run(cfg, stage_dir, parent_path, parent_manifest, val_files, is_main)
    if not run.begin(cfg.force):
        return
    PartialState().wait_for_everyone()

    # 2. Demonstrations, validated and mapped to prompt/completion conversations; the parent's tokenizer
    #    (its chat template decides every token) finds the ones max_length would leave without an answer.
    tokenizer, document_end = chat_tokenizer(parent_path, is_main)
    data = load_data(cfg, val_files, tokenizer)

    # 3. Parent model; padding-free batches only if it keeps packed sequences apart.
    model = load_causal_lm(parent_path, tokenizer)
    check_padding_free(cfg, args, model, parent_path)

    # 4. Trainer (TRL's SFTTrainer; LoRA adapters through peft when lora_r > 0).
    trainer, lm_documents = make_trainer(cfg, args, model, tokenizer, data, document_end, stage_dir)
    trainable, total = parameter_counts(trainer.model)

    # 5. Train, resuming from the newest complete checkpoint a killed run left (pipeline.trainer_metrics:
    #    its trainer_state.json parses and its weights are there; newer half-written ones are removed).
    resume, resume_step = resume_point(run, is_main)
    if is_main:
        describe(cfg, data, lm_documents, trainable, total, args.world_size, threads)
    result = trainer.train(resume_from_checkpoint=resume)
    checksums = rank_checksums(trainer.accelerator, trainer.model)  # replicas in sync (2-process tests)
    train_loss = whole_train_loss(trainer, result, resume_step, cfg.lr)

    # 6. Validation loss (completion tokens only, like the training loss).
    val_loss = trainer.evaluate()["eval_loss"] if data.val else None

    # 7. Save a plain checkpoint: merged weights, tokenizer with chat template, generation config.
    #    Models loaded after training (a LoRA merge, the gold evaluation) load whole on one process.
    load_models_whole()
    save_plain_checkpoint(trainer, cfg, parent_path, tokenizer, stage_dir, greedy_generation_config(cfg, tokenizer))

    # 8. Gold evaluation against the parent (main process), then the manifest, written last.
    if is_main:
        metrics = training_metrics(trainer, result, data, lm_documents, val_loss, train_loss, trainable, total)
        samples = []
        if world is not None:
            gold, samples = gold_evaluation(cfg, world, stage_dir, tokenizer, parent_path, args.device)
            metrics.update(gold)
        metrics["peak_memory_mb"] = round(peak_memory_mb())
        (stage_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest holds the config
        run.finish(metrics, manifest_facts(cfg, samples, args.world_size, threads, checksums))
        report(metrics, samples, world, stage_dir)
    PartialState().wait_for_everyone()
