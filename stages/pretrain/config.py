from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError


@dataclass
class PretrainConfig:
    run_dir: str = field(
        default="runs/default", metadata={"help": "Run directory; this stage writes RUN_DIR/pretrain."}
    )
    train_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/corpus.jsonl"],
        metadata={"help": "Corpus files (.txt .jsonl .json .parquet .csv), directories, or a Hub dataset id."},
    )
    text_field: str = field(default="text", metadata={"help": "Record field that holds the text."})
    val_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out for validation loss."})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Continue pretraining this model (stage dir, HF checkpoint dir or Hub id) instead of training from scratch."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Use this tokenizer (dir or Hub id) instead of training one; defaults to init_from's."},
    )
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size when training a tokenizer."})
    n_layers: int = field(default=4, metadata={"help": "Transformer blocks (from scratch)."})
    hidden_size: int = field(default=256, metadata={"help": "Model width (from scratch)."})
    n_heads: int = field(default=4, metadata={"help": "Attention heads (from scratch)."})
    intermediate_size: int = field(
        default=0, metadata={"help": "MLP width; 0 means 8/3 of hidden_size rounded to 64 (Llama)."}
    )
    context: int = field(
        default=128, metadata={"help": "Sequence length of packed training blocks and the model's max positions."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine decay floor as a fraction of lr."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay on matrices (not norms or biases)."}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient norm clip; 0 disables."})
    eval_every: int = field(default=200, metadata={"help": "Steps between held-out loss evaluations."})
    eval_batches: int = field(default=8, metadata={"help": "Batches used for each held-out loss estimate."})
    save_every: int = field(default=200, metadata={"help": "Steps between resumable checkpoints."})
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
            "help": "torch.compile each transformer block (one graph serves all); when it repays its compile time: docs/experiments.md."
        },
    )
    sample_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompts for the final sample completions; default: openings of held-out documents."},
    )
    sample_tokens: int = field(default=40, metadata={"help": "Tokens per sample completion."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature for sample completions."})
    seed: int = field(default=0, metadata={"help": "Random seed (data order, init, sampling)."})
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for torch in each process; 0: the machine's cores shared among the processes launched on it."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if it is finished with this config."})

    def validate(self) -> None:
        if self.hidden_size % self.n_heads:
            raise PipelineError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        for name in ("batch_size", "grad_accum", "max_steps", "context", "eval_batches", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
