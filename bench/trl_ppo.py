"""TRL 1.12's PPOTrainer on the benchmark's models and prompts; run by bench/ppo.py inside bench/.trl-venv.

Self-contained on purpose (torch, transformers, datasets, trl only): it runs in TRL's own environment.
Prints one JSON line: {"episodes", "train_seconds", "episodes_per_s", "peak_memory_mb", "optimizer_steps",
"optimizer_steps_per_update", "phase_seconds", "trl"}; with --count_flops, an untimed run under torch's
FLOP counter, "flops" too: what `train()` executed. The batch settings come from bench/ppo.py's
`trl_settings`. The phase split times the functions PPOTrainer.train calls by name in its module
(batch_generation; forward without gradients = the reference; get_reward on the value model or the reward
model; gc.collect); "update" is the rest of the loop: the PPO epochs, GAE and the bookkeeping between.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import tempfile
import time

import torch
import trl
from datasets import Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_module


def time_phases(reward_model) -> dict[str, float]:
    """Wrap what the trainer's loop calls so each call's seconds add to its phase."""
    seconds = {"generate": 0.0, "score": 0.0, "reference": 0.0, "values": 0.0, "gc": 0.0}

    def timed(fn, phase_of):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            phase = phase_of(*args)
            if phase:
                seconds[phase] += time.perf_counter() - t
            return out

        return wrapper

    trl_module.batch_generation = timed(trl_module.batch_generation, lambda *a: "generate")
    trl_module.forward = timed(trl_module.forward, lambda *a: None if torch.is_grad_enabled() else "reference")
    trl_module.get_reward = timed(
        trl_module.get_reward, lambda model, *a: "score" if model is reward_model else "values"
    )

    class TimedGc:
        collect = staticmethod(timed(trl_module.gc.collect, lambda *a: "gc"))

    trl_module.gc = TimedGc
    return seconds


def main() -> None:
    # Over 80 lines: the options it takes from bench/ppo.py and one TRL run set up from them, top to bottom.
    ap = argparse.ArgumentParser()
    for name, kind in [
        ("run_dir", str),
        ("rollout_batch_size", int),
        ("ppo_epochs", int),
        ("max_new_tokens", int),
        ("updates", int),
        ("temperature", float),
        ("lr", float),
        ("kl_coef", float),
        ("seed", int),
        ("max_prompts", int),
        ("per_device_train_batch_size", int),
        ("gradient_accumulation_steps", int),
        ("num_mini_batches", int),
        ("local_rollout_forward_batch_size", int),
    ]:
        ap.add_argument(f"--{name}", type=kind, required=True)
    ap.add_argument("--count_flops", action="store_true")
    a = ap.parse_args()
    sft, reward = os.path.join(a.run_dir, "sft"), os.path.join(a.run_dir, "reward")

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    with open(os.path.join(a.run_dir, "world", "ppo_prompts.jsonl"), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: a.max_prompts]
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for p in prompts
    ]
    dataset = Dataset.from_dict({"input_ids": ids})

    torch.manual_seed(a.seed)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    ref = AutoModelForCausalLM.from_pretrained(sft)
    value = AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1)

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.per_device_train_batch_size,
            gradient_accumulation_steps=a.gradient_accumulation_steps,
            num_mini_batches=a.num_mini_batches,
            num_ppo_epochs=a.ppo_epochs,
            total_episodes=a.updates * a.rollout_batch_size,
            local_rollout_forward_batch_size=a.local_rollout_forward_batch_size,
            response_length=a.max_new_tokens,
            temperature=a.temperature,
            stop_token="eos",
            missing_eos_penalty=1.0,
            kl_coef=a.kl_coef,
            learning_rate=a.lr,
            seed=a.seed,
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            # PPOConfig defaults to bf16, but PPOTrainer builds its Accelerator without it (fp32 either way,
            # checked): said here so both sides' precision is stated, not assumed. Ours: the tiny profile's fp32.
            bf16=False,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward_model,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=dataset,
        )
        if trainer.args.batch_size != a.rollout_batch_size:
            raise SystemExit(
                f"TRL's rollout is {trainer.args.batch_size} episodes, the benchmark's {a.rollout_batch_size}"
            )
        # Count the steps the optimizer really takes: accelerate's wrapper skips the inner step while it
        # accumulates, so a hook on the inner optimizer sees exactly the updates of the weights.
        steps = [0]
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        inner.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        phases = time_phases(trainer.reward_model)
        counter = FlopCounterMode(display=False) if a.count_flops else contextlib.nullcontext()
        start = time.time()
        with counter:
            trainer.train()
        seconds = time.time() - start
    episodes = a.updates * a.rollout_batch_size
    print(
        json.dumps(
            {
                "episodes": episodes,
                "train_seconds": seconds,
                "episodes_per_s": episodes / seconds,
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "optimizer_steps": steps[0],
                "optimizer_steps_per_update": steps[0] / a.updates,
                "phase_seconds": {**phases, "update": seconds - sum(phases.values())},
                "trl": trl.__version__,
                **({"flops": counter.get_total_flops()} if a.count_flops else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
