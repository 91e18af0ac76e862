"""LoRA set-up, one for every stage: peft's LoraConfig from a stage's lora_* options."""

from __future__ import annotations


def lora_config(
    r: int,
    alpha: int,
    target_modules: list[str],
    dropout: float = 0.0,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
):
    """peft's LoraConfig, or None when r is 0 (every weight trained). `target_modules` ["all-linear"] is
    peft's every-linear-layer-but-the-output-head; `modules_to_save` are trained in full beside the
    adapters (the reward model's new score head)."""
    if r <= 0:
        return None
    from peft import LoraConfig

    targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
