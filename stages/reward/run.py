"""Reward model (InstructGPT step 2): a scalar reward learned from ranked answers.

Recipe: parse -> parent (SFT) -> comparisons -> model -> train (resumable) -> save a plain checkpoint
-> normalise (reference demonstrations score 0) -> evaluate on held-out comparisons -> manifest.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from transformers.trainer_utils import TrainOutput
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from data.formats.comparisons import Group, load_groups
from data.formats.fields import require_text
from data.loading import load_records, split_holdout
from data.tokenizer import ensure_chat_ready, template_accepts
from pipeline.config import config_dict, parse_config
from pipeline.errors import PipelineError, cli_main
from pipeline.lora import lora_config
from pipeline.packing import common_prefix_length, pack_rows, packs_sequences
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
from reward.losses import group_pairs, pair_accuracy, pair_mean_loss, ranking_loss
from reward.model import BIAS_KEY, check_reward_tokenizer, encode, fold_offset, load_reward_model, right_pad, score
from stages.reward.config import RewardStageConfig
from world.judge import GoldJudge

# ---- training on K-wise groups ------------------------------------------------------------------


@dataclass
class GroupCollator:
    """A batch of groups -> all their responses, group after group, plus each group's size: one
    packed row (`pipeline.packing.pack_rows`; with share_prompts each group's common start - the
    prompt - once, its responses branching off it; `last` is where each response ends) or, with
    packed False, right-padded rows."""

    pad_token_id: int
    packed: bool = False
    share_prompts: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        sizes = torch.tensor([len(ex["group_ids"]) for ex in examples])
        if not self.packed:
            ids, mask = right_pad([seq for ex in examples for seq in ex["group_ids"]], self.pad_token_id)
            return {"input_ids": ids, "attention_mask": mask, "group_sizes": sizes}
        ids, positions, where = pack_rows([ex["group_ids"] for ex in examples], self.share_prompts)
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "last": torch.tensor([at[-1] for at in where]),
            "group_sizes": sizes,
        }


class HeadOutputs:
    """The reward head's output at every token of the latest forward, kept by a forward hook. A
    sequence-classification model applies its head to every token and returns the last row's
    token only; in a packed row each sequence ends elsewhere, so the loss reads them from here."""

    def __init__(self, head: torch.nn.Module):
        self.scores = None
        head.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.scores = output


class RankingRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer taught InstructGPT's K-wise groups.

    Why a subclass and not a plain transformers Trainer: RewardTrainer already does the reward-model
    plumbing (pad token on the config so the head finds the last token, dropout off, PEFT wrapping,
    reward/accuracy logging, checkpoints). Only its data path is pairwise - a batch is [chosen...,
    rejected...] and the loss -logsigmoid(chosen - rejected). We replace exactly those pieces: our
    groups arrive tokenized (prompt + each response through the chat template, best first), the
    collator keeps each group's K responses together, and compute_loss applies `ranking_loss` (all
    C(K,2) pairs of a prompt in one batch element). For K = 2 it is TRL's loss.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by `tokenize_groups`

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["group_ids", "length"]

    def _get_train_sampler(self, train_dataset=None):
        # Length-grouped batches drawn from (seed, epoch), so a resumed run replays them (pipeline.trainer_metrics).
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return replayable_train_sampler(self, dataset) or super()._get_train_sampler(train_dataset)

    def __init__(self, *args, group_loss=ranking_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_loss = group_loss
        self.head = None  # packed batches read the head per token (HeadOutputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        sizes = inputs["group_sizes"].tolist()
        if "position_ids" in inputs:  # packed: each sequence's score at its own last token
            if self.head is None:
                # Hooked at the first forward: after peft wrapped the head (the module that runs) and
                # after a DeepSpeed ZeRO-3 engine hooked it, whose hook replaces the head's output by
                # one that gathers the head's weights again for the backward pass - the output the
                # loss must be computed from.
                self.head = HeadOutputs(self.model.score)
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
            rewards = self.head.scores[0, inputs["last"]].squeeze(-1).float()
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards = outputs.logits.squeeze(-1).float()
        loss = self.group_loss(rewards, sizes)
        with torch.no_grad():
            accuracy = self.accelerator.gather_for_metrics(pair_accuracy(rewards, sizes)).mean()
            mean_reward = self.accelerator.gather_for_metrics(rewards.mean()).mean()
            self._metrics[mode]["accuracy"].append(accuracy.item())
            self._metrics[mode]["mean_reward"].append(mean_reward.item())
        return (loss, outputs) if return_outputs else loss


def tokenize_groups(groups: list[Group], tokenizer, max_length: int) -> tuple[Dataset, int]:
    """Each group as {"group_ids": [ids of prompt+response, best first], "length": longest of them}
    (the length lets the sampler batch similar groups: less padding). Returns (dataset, #truncated).

    Too long: the start of the prompt goes, the same tokens from every response of the group, so
    the K responses are compared on the same context (cut one by one, a longer answer would see
    less of the prompt than a shorter one) and still share it in packed rows. A response that does
    not fit even so loses its own start too."""
    rows, truncated = [], 0
    for g in groups:
        with template_accepts(g.where):
            seqs = [encode(tokenizer, g.prompt, r) for r in g.responses]
        over = max(map(len, seqs)) - max_length
        if over > 0:
            truncated += sum(len(s) > max_length for s in seqs)
            cut = min(over, common_prefix_length(seqs))
            seqs = [s[cut:][-max_length:] for s in seqs]
        rows.append({"group_ids": seqs, "length": max(map(len, seqs))})
    return Dataset.from_list(rows), truncated


# ---- parent, head, reference data ---------------------------------------------------------------


def parent_model(cfg: RewardStageConfig) -> tuple[str, dict | None]:
    """RUN/sft (must be finished), or --init_from (a finished stage or a plain HF checkpoint dir)."""
    if cfg.init_from:
        return resolve_init(cfg.init_from)
    sft = Path(cfg.run_dir) / "sft"
    return str(sft), require_stage(sft, "sft", cfg.run_dir)


def reward_body(parent_path: str, tokenizer):
    """The parent transformer with a one-output head: the parent's own if it is a reward model, a
    fresh one if it is a language model."""
    with suppress_seqcls_warning():  # "score.weight newly initialised / lm_head unused" is the point here
        model = AutoModelForSequenceClassification.from_pretrained(parent_path, num_labels=1, dtype=torch.float32)
    ensure_chat_ready(tokenizer, model)  # pad distinct from EOS, on the config: the head skips pads only
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        init_score_head(model)
    return model


def init_score_head(model) -> None:
    """N(0, 1/sqrt(d_model + 1)) reward head (Huang et al. 2024, after Ziegler et al. 2019): rewards
    start at unit scale instead of near 0 as with the default 0.02 init."""
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)


def demonstration(rec: dict) -> tuple:
    """(prompt, answer) of a reference record: prompt/completion, or messages ending in an assistant turn."""
    if (
        isinstance(rec.get("messages"), list)
        and rec["messages"]
        and isinstance(rec["messages"][-1], dict)
        and rec["messages"][-1].get("role") == "assistant"
    ):
        return rec["messages"][:-1], str(rec["messages"][-1].get("content", ""))
    return require_text(rec, "prompt"), require_text(rec, "completion")


def reference_set(cfg: RewardStageConfig, train_groups: list[Group]) -> tuple[list, list[str]]:
    """Demonstrations whose mean reward becomes 0 (default: a seeded subset of the SFT data)."""
    if cfg.norm_files:
        try:
            pairs = [demonstration(r) for r in load_records(cfg.norm_files)]
        except PipelineError as e:  # the default names the world's SFT data, which runs on real data lack
            raise PipelineError(
                f"{e} (norm_files: demonstrations with prompt/completion or messages; "
                "'--norm_files none' centres on the top-ranked training answers)"
            ) from None
    else:
        pairs = [(g.prompt, g.responses[0]) for g in train_groups]  # the labelers' favourite answers
    pairs = random.Random(cfg.seed).sample(pairs, min(cfg.norm_samples, len(pairs)))
    return [p for p, _ in pairs], [a for _, a in pairs]


# ---- evaluation -----------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def evaluate(
    model,
    tokenizer,
    groups: list[Group],
    judge: GoldJudge | None,
    batch_size: int,
    max_length: int,
    group_loss=ranking_loss,
) -> dict:
    """Held-out metrics. Pair accuracy is measured against the labels (noisy on the world), over all
    C(K,2) pairs; top-vs-rest over the pairs (best, other). On world prompts also against the gold
    judge: its noise-free ranking (the world's `gold_ranking`) over the pairs it orders strictly - a
    tie carries no preference - and the Pearson correlation of reward with gold score."""
    prompts = [g.prompt for g in groups for _ in g.responses]
    rewards = score(model, tokenizer, prompts, [r for g in groups for r in g.responses], batch_size, max_length)
    sizes = [len(g.responses) for g in groups]
    per_group = list(torch.split(rewards, sizes))
    chosen, rejected = [r[0].item() for r in per_group], [r[-1].item() for r in per_group]
    top_vs_rest = torch.cat([r[0] > r[1:] for r in per_group]).float()
    m = {
        "val_groups": len(groups),
        "val_pairs": len(group_pairs(sizes)[0]),
        "val_loss": group_loss(rewards, sizes).item(),  # the training loss, as eval_loss during training
        "val_pair_accuracy": pair_accuracy(rewards, sizes).item(),
        "val_top_vs_rest_accuracy": top_vs_rest.mean().item(),
        "val_top1_accuracy": sum(int(r.argmax().item() == 0) for r in per_group) / len(groups),
    }
    m["val_chosen_mean"], m["val_chosen_std"] = _mean_std(chosen)  # best-ranked response of each group
    m["val_rejected_mean"], m["val_rejected_std"] = _mean_std(rejected)  # worst-ranked (for K = 2: the pair)
    if judge is None:
        return m

    ceiling, label_pairs = 0.0, 0
    xs, ys = [], []
    by_family: dict[str, list[int]] = {}  # family -> [right, pairs] against gold: where the reward model errs
    by_labels: dict[str, list[int]] = {}  # "family: better label > worse label" -> [right, pairs]
    for g, r in zip(groups, per_group, strict=False):
        try:
            verdicts = [judge.judge(g.prompt, resp) for resp in g.responses] if isinstance(g.prompt, str) else None
        except KeyError:
            verdicts = None
        if verdicts is None:
            continue
        gold = [v.score for v in verdicts]
        family = by_family.setdefault(verdicts[0].family, [0, 0])
        xs += r.tolist()
        ys += gold
        for i in range(len(gold)):
            for j in range(i + 1, len(gold)):
                # the labels say i beats j: a perfect gold-aligned reward agrees when gold[i] > gold[j]
                ceiling += 1.0 if gold[i] > gold[j] else 0.5 if gold[i] == gold[j] else 0.0
                label_pairs += 1
                if gold[i] != gold[j]:
                    better, worse = (i, j) if gold[i] > gold[j] else (j, i)
                    name = f"{verdicts[0].family}: {verdicts[better].label} > {verdicts[worse].label}"
                    kind = by_labels.setdefault(name, [0, 0])
                    for tally in (family, kind):
                        tally[0] += int(r[better] > r[worse])
                        tally[1] += 1
    gold_right = sum(right for right, _ in by_family.values())
    gold_pairs = sum(n for _, n in by_family.values())
    if gold_pairs:
        m["val_gold_pair_accuracy"] = gold_right / gold_pairs
        m["val_gold_pairs"] = gold_pairs
        m["val_gold_pair_accuracy_by_family"] = {f: right / n for f, (right, n) in sorted(by_family.items()) if n}
        # Which kinds of pairs it gets wrong (e.g. a right answer below its padded form).
        m["val_gold_pairs_by_labels"] = {
            k: {"right": right, "pairs": n} for k, (right, n) in sorted(by_labels.items())
        }
        m["val_gold_pearson"] = torch.corrcoef(torch.tensor([xs, ys]))[0, 1].item()
        # What a reward equal to the gold score would get against these noisy labels (ties half):
        # the ceiling for val_pair_accuracy on the world.
        m["val_label_ceiling_accuracy"] = ceiling / label_pairs
    return m


# ---- the recipe's steps, in order ---------------------------------------------------------------


def settle_data_files(cfg: RewardStageConfig) -> bool:
    """Resolve the data-file defaults in cfg; True when the held-out groups come out of train_files."""
    for name in ("val_files", "norm_files"):  # "none" (a list cannot be empty on the command line)
        if [f.lower() for f in getattr(cfg, name)] == ["none"]:
            setattr(cfg, name, [])
    # Comparisons of your own: the world's held-out comparisons and demonstrations (the defaults) say
    # nothing about them; hold out val_fraction of yours, centre on their top-ranked answers.
    run_world = Path(cfg.run_dir) / "world"
    own_data = not trains_on_world(cfg.train_files, run_world)

    def the_worlds(files: list[str], name: str) -> bool:
        return [Path(f).resolve() for f in files] == [(run_world / name).resolve()]

    split_val = own_data and the_worlds(cfg.val_files, "comparisons_val.jsonl")
    if split_val:
        cfg.val_files = []
    if own_data and the_worlds(cfg.norm_files, "sft_train.jsonl"):
        cfg.norm_files = []
    return split_val


def start_processes() -> PartialState:
    # On CPU accelerate needs cpu=True to run DDP (gloo) under torchrun; without it every process
    # would train alone on the same directory (pipeline.runtime.cpu_and_backend; DeepSpeed differs).
    stage_decides_training_settings()
    use_cpu, backend = cpu_and_backend()
    return PartialState(cpu=use_cpu, backend=backend)


@dataclass
class Comparisons:
    train: list[Group]
    val: list[Group]
    reference: tuple[list, list[str]]  # (prompts, answers) of the demonstrations whose mean reward becomes 0


def load_comparisons(cfg: RewardStageConfig, split_val: bool, is_main: bool) -> Comparisons:
    """The training groups, the held-out ones (with split_val: val_fraction of the training file's), and the
    reference demonstrations."""
    train_groups = load_groups(cfg.train_files, cfg.skip_invalid, cfg.max_train_groups)
    if split_val:
        train_groups, val_groups = split_holdout(train_groups, cfg.val_fraction, cfg.seed)
        val_groups = val_groups[: cfg.max_val_groups or None]
        if is_main:
            centre = "--norm_files" if cfg.norm_files else "the top-ranked training answers"
            print(
                f"[reward] comparisons of your own: {len(val_groups)} of {len(train_groups) + len(val_groups)} "
                f"groups held out for validation; rewards centred on {centre}",
                flush=True,
            )
    else:
        val_groups = load_groups(cfg.val_files, cfg.skip_invalid, cfg.max_val_groups) if cfg.val_files else []
    return Comparisons(train_groups, val_groups, reference_set(cfg, train_groups))


def gold_judge(cfg: RewardStageConfig) -> GoldJudge | None:
    """The world's gold judge, if --world_dir holds a world: held-out metrics against the truth too."""
    world = Path(cfg.world_dir)
    return GoldJudge.load(world) if (world / "truth.json").is_file() else None


def stage_run(
    cfg: RewardStageConfig, stage_dir: Path, parent_path: str, parent_manifest: dict | None, is_main: bool
) -> StageRun:
    """The stage directory's bookkeeping: its config, parent and data files."""
    data_files = cfg.train_files + cfg.val_files + cfg.norm_files
    return StageRun("reward", stage_dir, config_dict(cfg), parent_manifest, parent_path, data_files, is_main)


def begins(run: StageRun, force: bool, state: PartialState) -> bool:
    """Whether the stage runs (not finished already). The main process decides (only it fingerprints the
    data); the others follow."""
    if not broadcast_object_list([run.begin(force) if state.is_main_process else None])[0]:
        return False
    state.wait_for_everyone()
    return True


def batch_layout(cfg: RewardStageConfig, model, parent_path: str, is_main: bool) -> tuple[bool, bool]:
    """(packed, share_prompts): padding-free batches if the transformer keeps packed sequences apart
    (pipeline.packing), and then each group's prompt once if its attention allows it."""
    packed = cfg.padding_free and packs_sequences(model)
    if cfg.padding_free and not packed and is_main:
        print(
            f"[reward] {parent_path}: the model does not keep packed sequences apart; padding batches instead",
            flush=True,
        )
    # A group's K responses share its prompt (InstructGPT's point for K-wise groups: K forwards give
    # C(K,2) comparisons); the prompt's tokens then go through the model once, not K times.
    share = packed and cfg.share_prompts and packs_sequences(model, share_prefix=True)
    if packed and cfg.share_prompts and not share and is_main:
        print(
            f"[reward] {parent_path}: the model's attention cannot share a prompt between responses; "
            "packing each whole",
            flush=True,
        )
    return packed, share


def pair_count(groups: list[Group]) -> int:
    return sum(len(g.responses) * (len(g.responses) - 1) // 2 for g in groups)


def tokenized(
    cfg: RewardStageConfig, data: Comparisons, tokenizer, max_length: int, state: PartialState, threads: int
) -> tuple[Dataset, Dataset | None, int]:
    """The training groups and, when evaluated during training, the held-out ones, tokenized; and how many
    sequences were cut to max_length."""
    train_ds, truncated = tokenize_groups(data.train, tokenizer, max_length)
    val_ds = tokenize_groups(data.val, tokenizer, max_length)[0] if data.val and cfg.eval_every else None
    if state.is_main_process:
        print(
            f"[reward] {len(data.train)} training groups ({sum(len(g.responses) for g in data.train)} responses, "
            f"{pair_count(data.train)} pairs), {len(data.val)} held-out groups, {state.num_processes} process(es) "
            f"x {threads} thread(s); {truncated} sequences cut to {max_length} tokens; "
            f"{precision_line(cfg.mixed_precision)}",
            flush=True,
        )
    return train_ds, val_ds, truncated


def reward_lora(cfg: RewardStageConfig):
    """LoRA: adapters on the body, the new score head trained in full (None without --use_lora)."""
    return lora_config(
        cfg.lora_r if cfg.use_lora else 0,
        cfg.lora_alpha,
        cfg.lora_target_modules,
        cfg.lora_dropout,
        "SEQ_CLS",
        modules_to_save=["score"],
    )


def training_args(cfg: RewardStageConfig, run: StageRun, evaluates: bool) -> RewardConfig:
    use_cpu, backend = cpu_and_backend()  # as the process group was started (start_processes)
    return RewardConfig(
        output_dir=str(run.checkpoints),
        use_cpu=use_cpu,
        ddp_backend=backend,
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        torch_compile=cfg.compile,
        disable_dropout=True,
        max_length=None,
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=cfg.eval_every or None,
        prediction_loss_only=True,
        report_to=["wandb"] if wandb_enabled() else "none",
        run_name=f"{cfg.run_dir}/reward",
        disable_tqdm=bool(os.environ.get("CI")) and not sys.stderr.isatty(),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


def make_trainer(
    cfg: RewardStageConfig,
    run: StageRun,
    model,
    tokenizer,
    collator: GroupCollator,
    train_ds: Dataset,
    val_ds: Dataset | None,
    peft_config,
    group_loss,
) -> RankingRewardTrainer:
    """TRL's RewardTrainer with the K-wise loss, quiet on the console; checkpoints inside the stage directory."""
    trainer = RankingRewardTrainer(
        model=model,
        args=training_args(cfg, run, val_ds is not None),
        data_collator=collator,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run.dir)],
        peft_config=peft_config,
        group_loss=group_loss,
    )
    quiet_console(trainer)
    return trainer


def train(trainer: RankingRewardTrainer, run: StageRun, state: PartialState) -> tuple[TrainOutput, float]:
    """Train, resuming from the newest complete checkpoint a killed run left (pipeline.trainer_metrics).
    Returns Trainer's result and the whole run's training loss."""
    resume, resume_step = last_complete_checkpoint(run.checkpoints, remove_incomplete=state.is_main_process)
    if resume and state.is_main_process:
        truncate_metrics(run.dir / "metrics.jsonl", resume_step)
        print(f"[reward] resumed from {resume} (step {resume_step})", flush=True)
    state.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=resume)
    # Trainer's training_loss covers the steps since the resume only; the manifest reports the whole run's.
    return result, whole_run_loss(trainer.state.log_history, resume_step, result.global_step, result.training_loss)


def save_plain_checkpoint(
    trainer: RankingRewardTrainer,
    use_lora: bool,
    peft_config,
    parent_path: str,
    tokenizer,
    stage_dir: Path,
    is_main: bool,
) -> None:
    """The trained model as a plain checkpoint. With LoRA the adapters are merged into the weights (the
    trained head kept) of a fresh copy on the main process, given the weights gathered from every process."""
    if not use_lora:
        trainer.save_model(str(stage_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if is_main:
        from peft import get_peft_model

        fresh = get_peft_model(reward_body(parent_path, tokenizer), peft_config)
        merged_from_state_dict(fresh, state_dict).save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)


@dataclass
class Normalisation:
    raw: torch.Tensor  # the reference demonstrations' rewards before the shift
    offset: float  # the shift: minus their mean
    folded: bool  # in the weights (else in config.json)


def normalise(
    reward_model,
    reward_tokenizer,
    reference: tuple[list, list[str]],
    batch_size: int,
    max_length: int,
    stage_dir: Path,
) -> Normalisation:
    """Shift the saved model's rewards so the reference demonstrations average 0, and save the shift."""
    setattr(reward_model.config, BIAS_KEY, 0.0)
    raw = score(reward_model, reward_tokenizer, *reference, batch_size, max_length)
    offset = -raw.mean().item()
    setattr(reward_model.config, BIAS_KEY, offset)
    # Into the weights where the architecture holds it (GPT-2's final LayerNorm bias), so plain transformers
    # logits are the reward; Llama-style models (RMSNorm, bias-free head) keep it in config.json.
    folded = fold_offset(reward_model)
    (reward_model if folded else reward_model.config).save_pretrained(stage_dir)
    return Normalisation(raw, offset, folded)


def training_metrics(
    result: TrainOutput, train_loss: float, data: Comparisons, norm: Normalisation, reward_model
) -> dict:
    normalised = norm.raw + norm.offset
    return {
        "train_loss": train_loss,
        "train_steps": result.global_step,
        "train_groups": len(data.train),
        "train_pairs": pair_count(data.train),
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "reference_raw_mean": norm.raw.mean().item(),
        "reference_mean": normalised.mean().item(),
        "reference_std": normalised.std().item() if len(normalised) > 1 else 0.0,
        "reference_size": len(normalised),
        "params": sum(p.numel() for p in reward_model.parameters()),
        "peak_memory_mb": round(peak_memory_mb()),
    }


def manifest_facts(
    state: PartialState,
    threads: int,
    norm: Normalisation,
    truncated: int,
    max_length: int,
    checksums: list[float],
    precision: str,
) -> dict:
    """What the manifest records beside the metrics: how the run ran, and where the reward's offset lives."""
    return {
        "processes": state.num_processes,
        "threads": threads,
        "precision": precision_facts(precision),
        BIAS_KEY: norm.offset,
        "reward_bias_folded": norm.folded,
        "truncated_sequences": truncated,
        "max_length": max_length,
        "weights_checksum_per_rank": checksums,
    }


def report(metrics: dict, norm: Normalisation, stage_dir: Path) -> None:
    summary = ", ".join(
        f"{k} {metrics[k]:.3f}"
        for k in (
            "val_pair_accuracy",
            "val_top_vs_rest_accuracy",
            "val_gold_pair_accuracy",
            "val_gold_pearson",
            "val_label_ceiling_accuracy",
        )
        if k in metrics
    )
    print(
        f"[reward] done in {metrics['train_seconds']}s: {summary or 'no held-out set'}; reward bias "
        f"{norm.offset:+.3f}{' (in the weights)' if norm.folded else ''} -> {stage_dir}",
        flush=True,
    )


# ---- the stage -------------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> None:
    # 1. Config, parent and data - all checked before anything is written.
    cfg = parse_config(RewardStageConfig, "reward", argv)
    threads = set_threads(cfg.threads)
    split_val = settle_data_files(cfg)
    state = start_processes()
    stage_dir = Path(cfg.run_dir) / "reward"
    parent_path, parent_manifest = parent_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(parent_path)
    check_reward_tokenizer(tokenizer, parent_path)
    data = load_comparisons(cfg, split_val, state.is_main_process)
    judge = gold_judge(cfg)
    run = stage_run(cfg, stage_dir, parent_path, parent_manifest, state.is_main_process)
    if not begins(run, cfg.force, state):
        return
    wandb_env(stage_dir)

    # 2. Model: the SFT transformer with a one-output head, reward read at the last (EOS) token.
    set_seed(cfg.seed)
    model = reward_body(parent_path, tokenizer)
    max_length = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
    packed, share = batch_layout(cfg, model, parent_path, state.is_main_process)
    train_ds, val_ds, truncated = tokenized(cfg, data, tokenizer, max_length, state, threads)

    # 3. Trainer: TRL's RewardTrainer with the K-wise loss; checkpoints inside the stage directory.
    group_loss = pair_mean_loss if cfg.loss == "pairs" else ranking_loss
    peft_config = reward_lora(cfg)
    collator = GroupCollator(tokenizer.pad_token_id, packed, share)
    trainer = make_trainer(cfg, run, model, tokenizer, collator, train_ds, val_ds, peft_config, group_loss)

    # 4. Train, resuming from the newest complete checkpoint a killed run left (pipeline.trainer_metrics).
    result, train_loss = train(trainer, run, state)
    checksums = rank_checksums(trainer.accelerator, trainer.model)  # replicas in sync (2-process tests)

    # 5. Save a plain checkpoint (LoRA merged into the weights, the trained head kept; merged into a
    #    fresh copy given the weights gathered from every process). Models loaded from here on, on
    #    the main process alone, load whole.
    load_models_whole()
    save_plain_checkpoint(trainer, cfg.use_lora, peft_config, parent_path, tokenizer, stage_dir, state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    (stage_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of Trainer internals, not part of a model

    # 6. Normalise on the saved checkpoint, as every consumer will load it: shift so the reference
    #    demonstrations average 0 (Ouyang et al. 2022; Huang et al. 2024, "reward normalization").
    reward_model, reward_tokenizer = load_reward_model(stage_dir, device=state.device)
    norm = normalise(reward_model, reward_tokenizer, data.reference, cfg.eval_batch_size, max_length, stage_dir)

    # 7. Evaluate on held-out comparisons, then write the manifest (last).
    metrics = {}
    if data.val:
        metrics = evaluate(
            reward_model, reward_tokenizer, data.val, judge, cfg.eval_batch_size, max_length, group_loss
        )
    metrics.update(training_metrics(result, train_loss, data, norm, reward_model))
    trainer.log({k: v for k, v in metrics.items() if k.startswith(("val_", "reference_"))})  # -> metrics.jsonl, wandb
    run.finish(metrics, manifest_facts(state, threads, norm, truncated, max_length, checksums, cfg.mixed_precision))
    report(metrics, norm, stage_dir)
