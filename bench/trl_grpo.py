"""TRL's GRPOTrainer on the benchmark's models and prompts; run by bench/grpo.py as a process of its own
(its peak memory is then its own), from the project's environment (TRL 1.16 is a dependency there).

Self-contained on purpose (torch, transformers, datasets, trl only), like bench/trl_ppo.py.
Prints one JSON line: {"episodes", "train_seconds", "episodes_per_s", "peak_memory_mb", "optimizer_steps",
"optimizer_steps_per_update", "episodes_per_generation", "generations", "mean_answer_tokens", "threads", "trl"}.
The batch settings come from bench/grpo.py's `trl_settings`; the counts are measured here so the caller can check
them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def main() -> None:
    # Over 80 lines: the options it takes from bench/grpo.py and one TRL run set up from them, top to bottom.
    ap = argparse.ArgumentParser()
    for name, kind in [
        ("run_dir", str),
        ("updates", int),
        ("rollout_batch_size", int),
        ("num_generations", int),
        ("max_new_tokens", int),
        ("temperature", float),
        ("lr", float),
        ("beta", float),
        ("seed", int),
        ("threads", int),
        ("per_device_train_batch_size", int),
        ("gradient_accumulation_steps", int),
        ("steps_per_generation", int),
        ("num_iterations", int),
    ]:
        ap.add_argument(f"--{name}", type=kind, required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sft, reward = os.path.join(a.run_dir, "sft"), os.path.join(a.run_dir, "reward")

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    with open(os.path.join(a.run_dir, "world", "ppo_prompts.jsonl"), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    # Conversational prompts: TRL applies the tokenizer's chat template with the generation prompt, as our
    # stage does (pipeline.generation.chat_ids), and again when the reward model reads prompt + answer.
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})

    torch.manual_seed(a.seed)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1)
    steps_per_update = a.steps_per_generation * a.num_iterations // a.gradient_accumulation_steps

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.per_device_train_batch_size,
            gradient_accumulation_steps=a.gradient_accumulation_steps,
            steps_per_generation=a.steps_per_generation,
            num_iterations=a.num_iterations,
            num_generations=a.num_generations,
            max_completion_length=a.max_new_tokens,
            temperature=a.temperature,
            top_p=1.0,
            top_k=0,
            beta=a.beta,
            epsilon=0.2,
            loss_type="grpo",  # each answer's token mean, then the mean over answers: our grpo's `sequence`
            scale_rewards="group",  # (r - group mean) / group std: our grpo advantage
            learning_rate=a.lr,
            lr_scheduler_type="constant",  # ours: constant AdamW
            adam_epsilon=1e-5,  # ours (N+)
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=a.updates * steps_per_update,
            bf16=False,  # GRPOConfig's default is bf16 and gradient checkpointing; ours runs fp32 without
            gradient_checkpointing=False,
            disable_dropout=True,
            seed=a.seed,
            logging_steps=steps_per_update,  # once per update, as our stage logs
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward_model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
        )
        # Count what TRL really does: episodes per generation (the rollout) and optimizer steps (a hook on the
        # torch optimizer sees exactly the updates of the weights; accelerate's wrapper skips accumulating calls).
        generated: list[int] = []
        generate = trainer._generate_and_score_completions

        def counted(inputs):
            generated.append(len(inputs))
            return generate(inputs)

        trainer._generate_and_score_completions = counted
        # The optimizer train() would build (Trainer.create_optimizer keeps one made before), made now to be hooked.
        steps = [0]
        trainer.create_optimizer().register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        start = time.time()
        trainer.train()
        seconds = time.time() - start
    episodes = sum(generated)
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    print(
        json.dumps(
            {
                "episodes": episodes,
                "train_seconds": seconds,
                "episodes_per_s": episodes / seconds,
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "optimizer_steps": steps[0],
                "optimizer_steps_per_update": steps[0] / a.updates,
                "episodes_per_generation": sorted(set(generated)),
                "generations": len(generated),
                "mean_answer_tokens": sum(lengths) / max(len(lengths), 1),
                "threads": torch.get_num_threads(),
                "trl": trl.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
