"""What the stages trained by HF Trainer (sft, reward) share: metrics.jsonl, the whole run's training
loss, a quiet console, and a length-grouped data order a resumed run replays.

Its own module because importing transformers' Trainer stack costs seconds (it pulls in peft); the
stages with their own loop (pretrain, ppo) and the report import pipeline.tracking without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from pipeline.tracking import clean


class QuietProgress(ProgressCallback):
    """Trainer's progress bar, with the latest loss beside it instead of a raw dict of every log event
    printed under it: those go to metrics.jsonl and wandb."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """No second bar for each held-out evaluation: it is over in seconds."""


def quiet_console(trainer) -> None:
    """No raw log dicts on the console: QuietProgress replaces Trainer's bar (or, with the bar off in CI,
    the printer of every log event)."""
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(QuietProgress)


class JsonlMetricsCallback(TrainerCallback):
    """HF Trainer stages (sft, reward): mirror every log event into metrics.jsonl, and log the loss at every
    checkpoint step as well, so the log_history a checkpoint keeps accounts for each step before it
    (whole_run_loss adds a resumed run's steps to those)."""

    def __init__(self, stage_dir: str | Path):
        self.path = Path(stage_dir) / "metrics.jsonl"

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer's DefaultFlowCallback runs first and has decided whether this step saves.
        if control.should_save:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **clean(logs)}) + "\n")


def whole_run_loss(log_history: list[dict], resumed_at: int, steps: int, loss_since_resume: float) -> float:
    """Mean training loss over every step of a run that resumed from the checkpoint of step `resumed_at`
    (0: it did not) and ended at step `steps`. Trainer's training_loss averages the steps of its own
    train() call only (`loss_since_resume`); the steps before come from the loss lines the checkpoint's
    log_history kept, each the mean since the line before (JsonlMetricsCallback logs one at each
    checkpoint step, so they cover them all; steps an older checkpoint left unlogged are left out)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and last < entry.get("step", 0) <= resumed_at:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    total += loss_since_resume * (steps - resumed_at)
    return total / max(last + steps - resumed_at, 1)


class EpochSeededLengthSampler(LengthGroupedSampler):
    """transformers' length-grouped order (a random permutation cut into megabatches, each sorted by length)
    with the permutation drawn from (seed, epoch) alone. transformers draws it from the global RNG, whose
    state at an epoch's start a resumed run does not have: it trained on other batches than an
    uninterrupted run. Trainer calls set_epoch at every epoch, the resumed one included."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # as stages/ppo's _shuffle
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def replayable_train_sampler(trainer, dataset) -> EpochSeededLengthSampler | None:
    """For a Trainer's _get_train_sampler: an EpochSeededLengthSampler when it groups by length, else None
    (Trainer's random order is accelerate's seedable sampler, seeded by epoch already)."""
    args = trainer.args
    if args.train_sampling_strategy != "group_by_length" or dataset is None or not hasattr(dataset, "column_names"):
        return None
    if args.length_column_name in dataset.column_names:
        lengths = list(dataset[args.length_column_name])
    elif "input_ids" in dataset.column_names:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    else:
        return None
    seed = args.data_seed if args.data_seed is not None else args.seed
    return EpochSeededLengthSampler(args.train_batch_size * args.gradient_accumulation_steps, lengths, seed)
