"""Tracking: every logged step goes to `metrics.jsonl` in the stage directory and to wandb.

wandb runs offline unless the user sets WANDB_MODE (the runs sync later with `wandb sync`);
WANDB_MODE=disabled turns it off. Only the main process logs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)  # JSON has no NaN; keep it visible
        out[k] = v
    return out


def wandb_env(stage_dir: str | Path) -> None:
    """Offline by default and files inside the stage directory (HF Trainer reads these too)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(stage_dir))
    os.environ.setdefault("WANDB_PROJECT", "rlhf-pipeline")
    os.environ.setdefault("WANDB_SILENT", "true")


def wandb_enabled() -> bool:
    return os.environ.get("WANDB_MODE", "offline") != "disabled"


class Tracker:
    """metrics.jsonl + wandb for the stages that run their own loop (pretrain, ppo)."""

    def __init__(
        self, stage_dir: str | Path, stage: str, config: dict, enabled: bool = True, run_name: str | None = None
    ):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wandb_env(stage_dir)
        if wandb_enabled():
            import wandb

            self.wandb = wandb.init(
                project=os.environ["WANDB_PROJECT"],
                name=run_name or stage,
                group=stage,
                config=config,
                dir=str(stage_dir),
                resume="allow",
                id=_run_id(stage_dir, stage),
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **clean(metrics)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            truncate_metrics(self.path, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def truncate_metrics(path: str | Path, step: int) -> None:
    """On resume, drop metrics.jsonl rows logged after the checkpoint we resume from (they will be redone)."""
    path = Path(path)
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        path.write_text(
            "".join(line + "\n" for line in rows if json.loads(line).get("step", 0) <= step), encoding="utf-8"
        )


def _run_id(stage_dir: str | Path, stage: str) -> str:
    import hashlib

    return f"{stage}-" + hashlib.sha1(str(Path(stage_dir).resolve()).encode()).hexdigest()[:10]


def read_metrics(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
