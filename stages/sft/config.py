from __future__ import annotations

from dataclasses import dataclass, field

from data.formats.demonstrations import COLUMN_ROLES, column_map
from pipeline.errors import PipelineError


@dataclass
class SFTStageConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "Run directory; this stage writes RUN_DIR/sft."})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from this model (finished stage dir, HF checkpoint dir or Hub id) instead of RUN_DIR/pretrain."
        },
    )
    train_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/sft_train.jsonl"],
        metadata={"help": "Demonstration files (.jsonl .json .parquet .csv), directories, or a Hub dataset id."},
    )
    val_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out demonstrations for validation loss. Empty: the world's sft_val.jsonl when training on the world's sft_train.jsonl, else val_fraction of train_files held out."
        },
    )
    val_fraction: float = field(
        default=0.05, metadata={"help": "Share of training records held out when there is no validation file."}
    )
    columns: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Map other field names, as role=field pairs, e.g. prompt=question completion=answer. Roles: "
            + ", ".join(COLUMN_ROLES)
            + "."
        },
    )
    skip_invalid: bool = field(
        default=False,
        metadata={
            "help": "Skip demonstrations with an empty prompt, answer or turn (counted in the manifest, with a warning) instead of stopping at the first; other format errors still stop."
        },
    )
    lm_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Pretraining text mixed into fine-tuning with a loss on every token, so SFT does not overwrite what pretraining stored (facts); empty: none."
        },
    )
    lm_field: str = field(default="text", metadata={"help": "Record field holding the text of lm_files."})
    lm_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Pretraining documents mixed in per demonstration (a seeded sample, the same every epoch); 0 disables."
        },
    )
    max_length: int = field(
        default=128,
        metadata={
            "help": "Tokens per prompt+completion; longer ones are cut at the end, and records whose prompt alone fills it are dropped."
        },
    )
    epochs: float = field(
        default=2.0,
        metadata={
            "help": "Passes over the demonstrations (InstructGPT's SFT: 16 epochs, picked by validation reward)."
        },
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 means run `epochs` epochs."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, constant_with_warmup, ...)."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent in linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient norm clip."})
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank; 0 trains all weights. The saved checkpoint is always a plain merged model."},
    )
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names that get adapters; all-linear = every linear layer but the output head."},
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Concatenate a batch's sequences into one row (position ids restart per sequence) instead of padding them: the same loss without computing on padding; attention stays per sequence (flash attention, or varlen sdpa from pipeline.packing). Checked on the model first; padded batches if it fails."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch demonstrations of similar length together: ~40 percent less padding on the world, but same-length batches (e.g. all refusals) learn worse at the default lr."
        },
    )
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
    eval_every: int = field(
        default=0, metadata={"help": "Steps between validation-loss evaluations during training; 0: only at the end."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per validation batch per process."})
    world_dir: str | None = field(
        default=None,
        metadata={
            "help": "Embedded world (truth.json, eval_prompts.jsonl) for the gold evaluation; default RUN_DIR/world when it exists and train_files are its own."
        },
    )
    eval_prompts: int = field(
        default=-1,
        metadata={
            "help": "Held-out world prompts answered by this model and its parent for the gold evaluation; -1 all, 0 skip."
        },
    )
    eval_max_new_tokens: int = field(default=40, metadata={"help": "Tokens per greedy answer in the gold evaluation."})
    num_samples: int = field(
        default=5, metadata={"help": "Sample answers (this model vs its parent) kept in the manifest."}
    )
    save_every: int = field(default=50, metadata={"help": "Steps between resumable checkpoints."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    log_every: int = field(default=10, metadata={"help": "Steps between metric log lines."})
    seed: int = field(default=0, metadata={"help": "Random seed (data order, init of adapters)."})
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for torch in each process; 0: the machine's cores shared among the processes launched on it."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if it is finished with this config."})

    def validate(self) -> None:
        for name in (
            "max_length",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "save_every",
            "log_every",
            "keep_checkpoints",
            "eval_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise PipelineError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise PipelineError(f"epochs must be > 0, got {self.epochs}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise PipelineError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lm_ratio < 0:
            raise PipelineError(f"lm_ratio must be >= 0, got {self.lm_ratio}")
        if self.lm_ratio > 0 and not self.lm_files:
            raise PipelineError("lm_ratio > 0 needs lm_files (pretraining text to mix in)")
        if self.lora_r < 0:
            raise PipelineError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.eval_prompts < -1:
            raise PipelineError(f"eval_prompts must be -1 (all), 0 (skip) or a count, got {self.eval_prompts}")
        if not self.train_files:
            raise PipelineError("train_files is empty")
        column_map(self.columns)
