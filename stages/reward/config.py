from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError

LOSSES = ("instructgpt", "pairs")


@dataclass
class RewardStageConfig:
    run_dir: str = field(
        default="runs/default",
        metadata={"help": "Run directory; this stage reads RUN_DIR/sft and writes RUN_DIR/reward."},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Initialise from this model (finished stage dir or HF checkpoint dir) instead of RUN_DIR/sft."
        },
    )
    train_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/comparisons_train.jsonl"],
        metadata={
            "help": "Comparison files (K-wise rankings, chosen/rejected pairs, HH transcripts, OpenAssistant or LLaMA-Factory ranked lists), mixed freely; e.g. add {run_dir}/comparisons/policy_comparisons.jsonl."
        },
    )
    val_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/comparisons_val.jsonl"],
        metadata={
            "help": "Held-out comparison files for the accuracy metrics (the world's, for comparisons of your own: val_fraction of them instead); `none` = no held-out evaluation."
        },
    )
    val_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Share of the training groups held out for the accuracy metrics when training on comparisons of your own without val_files."
        },
    )
    world_dir: str = field(
        default="{run_dir}/world",
        metadata={"help": "Embedded world (truth.json) for gold metrics on world prompts; ignored when absent."},
    )
    norm_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/sft_train.jsonl"],
        metadata={
            "help": "Reference demonstrations (prompt/completion or messages) whose mean reward is shifted to 0 (the world's, for comparisons of your own: none); `none` = the top-ranked training responses."
        },
    )
    norm_samples: int = field(
        default=256, metadata={"help": "Reference demonstrations used for normalisation (a seeded random subset)."}
    )
    max_train_groups: int = field(default=0, metadata={"help": "Use only the first N training groups (0 = all)."})
    max_val_groups: int = field(default=0, metadata={"help": "Use only the first N held-out groups (0 = all)."})
    skip_invalid: bool = field(
        default=False,
        metadata={
            "help": "Skip groups with empty/duplicate responses, chosen == rejected or diverging transcripts instead of stopping."
        },
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Token limit of prompt+response (longer: the start of the prompt is cut, by the same tokens for all responses of a group); capped at the model's context."
        },
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Train on each batch's responses packed in one row (position ids restart per sequence, varlen attention) instead of padded rows; padded if the model fails the packing check."
        },
    )
    share_prompts: bool = field(
        default=True,
        metadata={
            "help": "In padding-free batches, write a group's common start (the prompt) once with its K responses branching off it: each response gets what it gets alone, the layers see the prompt once (45 percent fewer tokens on the world); off if the model fails the check."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch groups of similar length (random megabatches sorted by length): a third less padding on the world when batches are padded (--padding_free false)."
        },
    )
    loss: str = field(
        default="instructgpt",
        metadata={
            "help": "instructgpt: each prompt weighs the same (its C(K,2) pairs averaged, Ouyang et al. 2022); pairs: each pair weighs the same (a group of K in proportion to C(K,2)). Equal when every K is the same."
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "Comparison GROUPS per device per micro-batch (each holds K responses)."}
    )
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    eval_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward pass when scoring for evaluation and normalisation."}
    )
    num_epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the training groups (InstructGPT: 1; the reward model overfits after that)."},
    )
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = derived from num_epochs."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "transformers scheduler type: cosine, linear, constant_with_warmup, ..."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps spent in linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient norm clip; 0 disables."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (+ the full score head) and save a merged plain checkpoint."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters ('all-linear' or names such as q_proj v_proj)."},
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "Steps between held-out loss/accuracy logs during training; 0 = only the final evaluation."},
    )
    save_every: int = field(
        default=50, metadata={"help": "Steps between resumable checkpoints (RUN_DIR/reward/checkpoints)."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    log_every: int = field(default=10, metadata={"help": "Steps between metric log lines."})
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast over fp32 weights on a GPU with bf16 or a CPU with AMX / AVX-512 BF16, fp32 elsewhere), fp32, bf16 or fp16."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory on large models."})
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model (transformers' torch_compile); when it repays its compile time: docs/experiments.md."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (head init, data order)."})
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for torch in each process; 0: the machine's cores shared among the processes launched on it."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if it is finished with this config."})

    def validate(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "save_every",
            "log_every",
            "max_length",
            "norm_samples",
        ):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_groups", "max_val_groups", "eval_every"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.train_files:
            raise PipelineError("train_files is empty: give at least one comparison file")
        if self.num_epochs <= 0 and self.max_steps == 0:
            raise PipelineError(f"num_epochs must be > 0 (or set max_steps), got {self.num_epochs}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise PipelineError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.loss not in LOSSES:
            raise PipelineError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
