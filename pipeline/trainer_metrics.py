"""What the stages trained by HF Trainer (sft, reward) share: metrics.jsonl, the whole run's training
loss, the checkpoint a rerun resumes from, and a length-grouped data order a resumed run replays.

Its own module because importing transformers' Trainer stack costs seconds (it pulls in peft); the
stages with their own loop (pretrain, ppo) and the report import pipeline.tracking without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer import FSDP_MODEL_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

from pipeline.tracking import clean

# The files that hold a checkpoint's weights (full model, sharded, or LoRA adapters), as Trainer loads them.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)


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


def _checkpoint_step(checkpoint: Path) -> int | None:
    """The global step of a complete checkpoint: its trainer_state.json (Trainer writes it last) parses and its
    weights are there. None for a save a kill or a full disk cut short."""
    try:
        step = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["global_step"]
        names = {p.name for p in checkpoint.iterdir()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # Sharded states live in folders: FSDP's pytorch_model_fsdp_0/, DeepSpeed's global_stepN/.
    weights = names & set(WEIGHT_FILES) or any(n.startswith((FSDP_MODEL_NAME, "global_step")) for n in names)
    return step if isinstance(step, int) and weights else None


def last_complete_checkpoint(checkpoints: str | Path, remove_incomplete: bool = False) -> tuple[str | None, int]:
    """(path, global step) of the newest complete Trainer checkpoint in `checkpoints`, or (None, 0).

    Newer incomplete ones are passed over; with `remove_incomplete` (the main process) they are deleted too:
    the resumed run redoes their steps, and a half-written folder must not outlive it."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return None, 0
    found = [p for p in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted((p for p in found if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        step = _checkpoint_step(checkpoint)
        if step is not None:
            return str(checkpoint), step
        if remove_incomplete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None, 0


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
