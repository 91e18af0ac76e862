from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipeline.errors import PipelineError
from stages.ppo.advantages import ADVANTAGES, CRITIC_FREE, GROUPED, LOSS_AGGREGATION

# What only a critic reads: given to a critic-free method, such an option would be silently ignored.
CRITIC_OPTIONS = ("critic_lr", "vf_coef", "cliprange_value", "lam")


@dataclass
class PPOConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "Run directory; this stage writes RUN_DIR/ppo."})
    sft_path: str = field(
        default="{run_dir}/sft", metadata={"help": "Finished SFT stage: the initial policy and the frozen reference."}
    )
    reward_path: str = field(
        default="{run_dir}/reward",
        metadata={
            "help": "Finished reward stage: the reward model (AutoModelForSequenceClassification, 1 label); the critic starts from it."
        },
    )
    reward_model_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the reward model's score in the reward; 0 with a reward_fn: no reward model is loaded (a critic still starts from reward_path)."
        },
    )
    reward_fn: str = field(
        default="",
        metadata={
            "help": "A rule reward `package.module:function` called as f(prompt, answer) -> float (it may also take record=, the prompt's record, and world_dir=), added to the reward model's score; e.g. world.rewards:instruction_correct, reward.rules:gsm8k_final_answer."
        },
    )
    reward_fn_weight: float = field(default=1.0, metadata={"help": "Weight of reward_fn's value in the reward."})
    prompt_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/ppo_prompts.jsonl"],
        metadata={"help": "Prompt files/dirs/Hub id: records with `prompt` or `messages` ending in a user turn."},
    )
    prompt_field: str = field(
        default="prompt",
        metadata={
            "help": "Record field holding the prompt (a string, or a list of turns whose first is taken: MT-Bench's `turns`); records with `messages` need none. E.g. `instruction` for AlpacaEval, `question` for GSM8K."
        },
    )
    eval_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out prompts for the final evaluation; empty: RUN_DIR/world/eval_prompts.jsonl when the prompts are the world's."
        },
    )
    world_dir: str = field(
        default="{run_dir}/world",
        metadata={
            "help": "Embedded world; when its truth.json exists the gold judge scores answers (gold/* metrics)."
        },
    )
    max_prompt_length: int = field(
        default=96,
        metadata={"help": "Longest prompt in tokens (chat-formatted); a longer one is an error naming its record."},
    )
    skip_long_prompts: bool = field(
        default=False,
        metadata={"help": "Drop prompts longer than max_prompt_length (their count is printed) instead of stopping."},
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "Response length limit; a response without EOS by then gets no_eos_penalty."}
    )
    temperature: float = field(
        default=0.7,
        metadata={
            "help": "Sampling temperature of rollouts; log-probs are recomputed from logits / temperature (N+)."
        },
    )
    penalize_no_eos: bool = field(
        default=True, metadata={"help": "Replace the score of responses that never emit EOS by no_eos_penalty (N+)."}
    )
    no_eos_penalty: float = field(
        default=-1.0, metadata={"help": "Score given to a response cut off at max_new_tokens."}
    )
    advantage: str = field(
        default="gae",
        metadata={
            "help": "Advantage estimator: gae (PPO, a critic), grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline (no critic; stages/ppo/advantages.py)."
        },
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Answers sampled per prompt (G); grpo, dr_grpo, rloo and reinforce_pp_baseline compare each with the other answers to its prompt (G >= 2)."
        },
    )
    kl_penalty: str = field(
        default="reward",
        metadata={
            "help": "Where kl_coef applies: reward (per-token k1 in the reward, Ziegler et al. 2019) or loss (k3 term added to the loss, GRPO)."
        },
    )
    loss_aggregation: str = field(
        default="",
        metadata={
            "help": "Per-token loss to a number: token (mean over the batch's tokens), sequence (per answer, then over answers), constant (sum / max_new_tokens); empty: the method's own (grpo sequence, dr_grpo constant, else token)."
        },
    )
    num_updates: int = field(default=100, metadata={"help": "PPO updates (rollout batch + optimisation epochs each)."})
    rollout_batch_size: int = field(default=64, metadata={"help": "Episodes per update, summed over all processes."})
    num_minibatches: int = field(default=4, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    gradient_accumulation: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per minibatch (memory knob; same maths)."}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Forwards without cache read each batch's episodes packed in one row, no padding (varlen attention); padded rows for models that cannot keep packed sequences apart."
        },
    )
    forward_batch_size: int = field(
        default=0,
        metadata={
            "help": "Episodes per no-grad forward in the rollout (reference, critic, reward); 0: the whole per-process rollout."
        },
    )
    lr: float = field(default=1e-5, metadata={"help": "Policy learning rate (AdamW, constant)."})
    critic_lr: float = field(default=0.0, metadata={"help": "Critic learning rate; 0: same as lr."})
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon (N+: 1e-5)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(
        default=1.0,
        metadata={
            "help": "Gradient norm clip, of policy and critic each (under DeepSpeed: of both together, by its engine); 0 disables."
        },
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Initial KL penalty coefficient beta (per-token reward -beta * (log pi - log pi_ref))."},
    )
    target_kl: float = field(
        default=0.0,
        metadata={
            "help": "Adaptive KL controller target (summed KL per episode, Ziegler et al. 2019); 0: fixed kl_coef."
        },
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL controller horizon in episodes."})
    max_kl: float = field(
        default=100.0,
        metadata={
            "help": "Stop (keeping the last good checkpoint) when the mean summed KL per episode exceeds this; 0 disables."
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon."})
    cliprange_high: float = field(
        default=0.0,
        metadata={"help": "Upper ratio clip 1 + cliprange_high (DAPO's clip-higher); 0: cliprange."},
    )
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "PPO-ptx (InstructGPT): weight gamma of the pretraining LM loss mixed into each micro-batch; 0 disables."
        },
    )
    ptx_files: list[str] = field(
        default_factory=lambda: ["{run_dir}/world/corpus.jsonl"], metadata={"help": "Pretraining text for PPO-ptx."}
    )
    ptx_field: str = field(default="text", metadata={"help": "Record field holding PPO-ptx text."})
    ptx_batch_size: int = field(default=4, metadata={"help": "PPO-ptx sequences per micro-batch."})
    ptx_length: int = field(
        default=64, metadata={"help": "PPO-ptx block length in tokens (at most the model's context)."}
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "EMA of the policy weights (InstructGPT); the EMA weights are saved. 0 disables."},
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank for the policy; the reference is the same backbone with adapters off. 0: full fine-tuning."
        },
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters ('all-linear' or names such as q_proj v_proj)."},
    )
    gold_every: int = field(
        default=10,
        metadata={
            "help": "Updates between gold-judge evaluations of greedy answers (embedded world only); 0 disables."
        },
    )
    gold_eval_size: int = field(
        default=64, metadata={"help": "Held-out prompts in each periodic gold evaluation (a fixed subset)."}
    )
    eval_size: int = field(default=0, metadata={"help": "Held-out prompts in the final evaluation; 0: all."})
    eval_holdout: int = field(
        default=64,
        metadata={
            "help": "Without eval_files, on prompts of your own: training prompts held out for the final evaluation and `make eval` (at most a tenth of them, and eval_size; 0: none)."
        },
    )
    save_every: int = field(default=10, metadata={"help": "Updates between resumable checkpoints."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast over fp32 weights on a GPU with bf16 or a CPU with AMX / AVX-512 BF16, fp32 elsewhere), fp32, bf16 or fp16."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory on large policies."}
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the update's policy and critic forward (symbolic lengths); when it pays: docs/experiments.md."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (prompt order, sampling)."})
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads for torch in each process; 0: the machine's cores shared among the processes launched on it."
        },
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if it is finished with this config."})

    def validate(self) -> None:
        if self.temperature <= 0:
            raise PipelineError(f"temperature must be > 0 for PPO rollouts, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise PipelineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in (
            "max_prompt_length",
            "num_updates",
            "rollout_batch_size",
            "num_minibatches",
            "gradient_accumulation",
            "ppo_epochs",
            "save_every",
            "keep_checkpoints",
            "kl_horizon",
        ):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("forward_batch_size", "gold_every", "gold_eval_size", "eval_size", "lora_r", "ptx_batch_size"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "lr",
            "kl_coef",
            "target_kl",
            "max_kl",
            "cliprange",
            "cliprange_value",
            "vf_coef",
            "ptx_coef",
            "critic_lr",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.prompt_field:
            raise PipelineError("prompt_field must name a record field")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise PipelineError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise PipelineError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ptx_coef > 0 and (self.ptx_batch_size < 1 or self.ptx_length < 2):
            raise PipelineError("ptx_coef > 0 needs ptx_batch_size >= 1 and ptx_length >= 2")
        self._validate_method()

    def _validate_method(self) -> None:
        """The estimator and its companions: groups where a method compares answers, no critic option
        given to a method without a critic, a reward to maximise."""
        if self.advantage not in ADVANTAGES:
            raise PipelineError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.samples_per_prompt < 1:
            raise PipelineError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.advantage in GROUPED and self.samples_per_prompt < 2:
            raise PipelineError(
                f"advantage {self.advantage} compares the answers to one prompt: samples_per_prompt must be >= 2, "
                f"got {self.samples_per_prompt}"
            )
        if self.advantage in CRITIC_FREE:
            defaults = {f.name: f.default for f in fields(self)}
            given = [name for name in CRITIC_OPTIONS if getattr(self, name) != defaults[name]]
            if given:
                raise PipelineError(
                    f"{given[0]} is a critic option, and advantage {self.advantage} trains no critic: leave it out"
                )
        if self.kl_penalty not in ("reward", "loss"):
            raise PipelineError(f"kl_penalty must be reward or loss, got {self.kl_penalty!r}")
        if self.loss_aggregation not in ("", "token", "sequence", "constant"):
            raise PipelineError(f"loss_aggregation must be token, sequence or constant, got {self.loss_aggregation!r}")
        if self.cliprange_high < 0 or self.reward_model_weight < 0 or self.reward_fn_weight < 0:
            raise PipelineError("cliprange_high, reward_model_weight and reward_fn_weight must be >= 0")
        if self.reward_model_weight == 0 and not (self.reward_fn and self.reward_fn_weight > 0):
            raise PipelineError(
                "reward_model_weight 0 needs a reward_fn with reward_fn_weight > 0: nothing to maximise"
            )

    @property
    def has_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def uses_reward_model(self) -> bool:
        return self.reward_model_weight > 0

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or LOSS_AGGREGATION.get(self.advantage, "token")
