"""metrics.jsonl for the stages trained by HF Trainer (sft, reward).

Its own module because importing transformers' Trainer stack costs seconds (it pulls in peft); the
stages with their own loop (pretrain, ppo) and the report import pipeline.tracking without it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from pipeline.tracking import clean


class JsonlMetricsCallback(TrainerCallback):
    """HF Trainer stages (sft, reward): mirror every log event into metrics.jsonl."""

    def __init__(self, stage_dir: str | Path):
        self.path = Path(stage_dir) / "metrics.jsonl"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **clean(logs)}) + "\n")
