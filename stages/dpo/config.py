from __future__ import annotations

from dataclasses import dataclass, field

from data.formats.comparisons import PAIR_MODES
from pipeline.errors import PipelineError

# TRL's DPOTrainer loss types offered here: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), robust DPO
# with label smoothing (cDPO, Mitchell 2023; unbiased form, Chowdhury et al. 2024), hinge (SLiC, Zhao et al. 2023).
LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


@dataclass
class DPOStageConfig:
    run_dir: str = field(
        default="runs/default",
        metadata={"help": "Run directory; this stage reads RUN_DIR/sft and writes RUN_DIR/dpo."},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from this model (finished stage dir or HF checkpoint dir) instead of RUN_DIR/sft; it is also the reference."
        },
    )
    train_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/comparisons_train.jsonl"],
        metadata={
            "help": "Comparison files, in every format the reward stage reads (K-wise rankings, chosen/rejected pairs, HH transcripts, OpenAssistant or LLaMA-Factory ranked lists), mixed freely; e.g. add {run_dir}/comparisons/policy_comparisons.jsonl."
        },
    )
    val_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/comparisons_val.jsonl"],
        metadata={
            "help": "Held-out comparison files for the preference accuracy (the world's; for comparisons of your own: val_fraction of them instead); `none` = no held-out accuracy."
        },
    )
    val_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Share of the training groups held out for the preference accuracy when training on comparisons of your own without val_files."
        },
    )
    world_dir: str = field(
        default="{run_dir}/world",
        metadata={
            "help": "Embedded world (truth.json, eval_prompts.jsonl): accuracy against its noise-free ranking and the gold evaluation; ignored when absent or when the comparisons are your own."
        },
    )
    max_train_groups: int = field(default=0, metadata={"help": "Use only the first N training groups (0 = all)."})
    max_val_groups: int = field(default=0, metadata={"help": "Use only the first N held-out groups (0 = all)."})
    skip_invalid: bool = field(
        default=False,
        metadata={
            "help": "Skip groups with empty/duplicate responses, chosen == rejected or diverging transcripts instead of stopping."
        },
    )
    pairs: str = field(
        default="top",
        metadata={
            "help": "How a ranking of K answers becomes pairs: top = the best answer against each of the K-1 others; all = every C(K,2) pair. K = 2 gives the one pair either way."
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "TRL DPOTrainer loss: sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023; beta is its tau), robust (label-smoothed DPO for noisy labels: label_smoothing = the assumed share of flipped labels), hinge (SLiC)."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Strength of the KL tie to the reference: the implicit reward is beta * log(pi / pi_ref); higher stays closer to SFT."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "loss_type robust: the assumed probability that a preference label is flipped, in [0, 0.5)."
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an NLL term on the chosen answers added to the preference loss (RPO: Pang et al. 2024; Liu et al. 2024), TRL's loss_type sft beside the main one: it holds up the chosen answers' likelihood, which the DPO loss alone lets fall with the rejected ones'; 0 = off."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Score every pair under the reference once before training, so only the trained model is in memory while it trains (TRL's precompute_ref_log_probs)."
        },
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Token limit of prompt+answer: longer ones are cut at the end (TRL's keep_start), and pairs whose prompt alone fills it are dropped; capped at the model's context."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch pairs of similar length (random megabatches sorted by length): padded batches hold about half padding on the world otherwise."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Preference PAIRS per device per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    eval_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward when scoring held-out answers and precomputing."}
    )
    num_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (may be a fraction)."})
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = derived from num_epochs."})
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "transformers scheduler type: cosine, linear, constant_with_warmup, ..."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps spent in linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient norm clip; 0 disables."})
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank; 0 trains all weights. With LoRA the reference is the model with its adapters off (no second copy); the saved checkpoint is merged."
        },
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (update scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters ('all-linear' or names such as q_proj v_proj)."},
    )
    eval_prompts: int = field(
        default=-1,
        metadata={
            "help": "Held-out world prompts answered greedily by this model and by the reference for the gold evaluation; -1 all, 0 skip."
        },
    )
    eval_max_new_tokens: int = field(default=40, metadata={"help": "Tokens per answer in the gold evaluation and KL."})
    kl_prompts: int = field(
        default=-1,
        metadata={
            "help": "Held-out prompts whose sampled answers measure KL to the reference (-1 all eval prompts, 0 skip)."
        },
    )
    kl_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of the answers sampled for KL and of both distributions (PPO measures its kl_to_sft at its sampling temperature)."
        },
    )
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95 percent intervals."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Steps between held-out DPO loss/accuracy logs during training; 0 = only at the end."},
    )
    save_every: int = field(
        default=50, metadata={"help": "Steps between resumable checkpoints (RUN_DIR/dpo/checkpoints)."}
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
    seed: int = field(default=0, metadata={"help": "Random seed (data order, adapters, KL samples)."})
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for torch in each process; 0: the machine's cores shared among the processes launched on it."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if it is finished with this config."})

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_batch_size", "save_every", "log_every", "max_length"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_groups", "max_val_groups", "eval_every", "lora_r", "bootstrap"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_prompts", "kl_prompts"):
            if getattr(self, name) < -1:
                raise PipelineError(f"{name} must be -1 (all), 0 (skip) or a count, got {getattr(self, name)}")
        if not self.train_files:
            raise PipelineError("train_files is empty: give at least one comparison file")
        if self.num_epochs <= 0 and self.max_steps == 0:
            raise PipelineError(f"num_epochs must be > 0 (or set max_steps), got {self.num_epochs}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise PipelineError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.pairs not in PAIR_MODES:
            raise PipelineError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {self.pairs!r}")
        if self.loss_type not in LOSS_TYPES:
            raise PipelineError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.sft_weight < 0:
            raise PipelineError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.beta <= 0:
            raise PipelineError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise PipelineError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "robust":
            # TRL 1.16's sigmoid loss ignores label_smoothing: accepting it there would be a silent no-op.
            raise PipelineError(
                f"label_smoothing applies to loss_type robust only (got loss_type {self.loss_type!r}); "
                "pass --loss_type robust for label-smoothed DPO"
            )
        if self.kl_temperature <= 0:
            raise PipelineError(f"kl_temperature must be > 0, got {self.kl_temperature}")
