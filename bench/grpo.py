"""GRPO throughput: our RL stage's GRPO (`python -m stages.grpo`) against TRL's GRPOTrainer on an identical
tiny config, same machine, back to back; and against our own PPO at the same rollout shape (the critic's cost).

    python -m bench.grpo [--updates 10] [--repeats 3] [--threads 1] [--out runs/bench/grpo]   (= make bench-grpo)

Both sides get the same models (bench/ppo.py's `build_run`: a tiny random Llama policy and a reward model of
the same shape over a tokenizer trained here), the same prompts (the embedded world's PPO prompts, chat-formatted
by the same template), the same reward (that reward model's score of each answer; no rule, no penalty for an
answer without EOS, which TRL's GRPO has not), the same group size G, rollout (episodes per update), answer
length, temperature, learning rate, KL beta (GRPO's k3 term in the loss), clip range, loss aggregation (each
answer's token mean, then the mean over answers: TRL's loss_type grpo) and advantages ((r - group mean) / group
std), and the same optimizer steps per update: epochs x minibatches (`trl_settings`; TRL's own count is
measured and checked). Both run fp32 without gradient checkpointing (GRPOConfig defaults to bf16 and
checkpointing) on the same number of torch threads.

Measured: episodes per second of the training loop (model loading excluded on both sides; ours: the stage's
update loop, TRL: `trainer.train()`) and peak resident memory of each process. Runs alternate (ours, TRL, our
PPO, ours, TRL, ...); each side's best and median episodes/s and its highest peak memory are reported, with the
load average around each run.
TRL runs from the project's environment (TRL 1.16 is a dependency), as a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.ppo import ROOT, bench_env, build_run, versions

DEFAULT_OUT = ROOT / "runs" / "bench" / "grpo"


def trl_settings(rollout_batch_size: int, num_minibatches: int, epochs: int, group: int) -> dict[str, int]:
    """GRPOConfig batch settings that replay our stage's update on one process: a rollout of
    rollout_batch_size episodes (G answers to each of rollout_batch_size / G prompts), `epochs` passes over it,
    num_minibatches minibatches per pass, one optimizer step each.

    TRL (`grpo_trainer.py`, `_prepare_inputs`): one generation of per_device_train_batch_size x
    steps_per_generation episodes, shuffled once and cut into steps_per_generation slices of
    per_device_train_batch_size; each slice is one forward/backward, the optimizer steps every
    gradient_accumulation_steps of them, and the slices are gone through num_iterations times before the next
    generation. So: slice = our minibatch, steps_per_generation = minibatches, num_iterations = epochs,
    accumulation 1. (TRL keeps one shuffle for all its iterations; ours reshuffles each epoch.)"""
    if rollout_batch_size % group:
        raise ValueError(f"rollout_batch_size {rollout_batch_size} is not divisible by num_generations {group}")
    if rollout_batch_size % num_minibatches:
        raise ValueError(
            f"rollout_batch_size {rollout_batch_size} is not divisible by num_minibatches {num_minibatches}"
        )
    return {
        "per_device_train_batch_size": rollout_batch_size // num_minibatches,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": num_minibatches,
        "num_iterations": epochs,
    }


def trl_shape(settings: dict[str, int]) -> tuple[int, int]:
    """(episodes per generation, optimizer steps per generation) of TRL with these settings on one process."""
    episodes = settings["per_device_train_batch_size"] * settings["steps_per_generation"]
    micro_batches = settings["steps_per_generation"] * settings["num_iterations"]
    return episodes, micro_batches // settings["gradient_accumulation_steps"]


def our_command(stage: str, run: Path, a) -> list[str]:
    """Our RL stage with the benchmark's shape: `grpo` (stages.grpo: group advantages, k3 KL in the loss) or
    `ppo` (stages.ppo: a critic, GAE, KL in the reward; one answer per prompt, the same episodes per update)."""
    cmd = [sys.executable, "-m", f"stages.{stage}", "--profile", "tiny", "--run_dir", run, "--force", "true"]
    grpo = {
        "advantage": "grpo",
        "samples_per_prompt": a.num_generations,
        "kl_penalty": "loss",
        "loss_aggregation": "sequence",
    }
    ppo = {"advantage": "gae", "samples_per_prompt": 1, "kl_penalty": "reward"}
    method = grpo if stage == "grpo" else ppo
    options = method | {
        "num_updates": a.updates,
        "rollout_batch_size": a.rollout_batch_size,
        "num_minibatches": a.num_minibatches,
        "gradient_accumulation": 1,
        "ppo_epochs": a.ppo_epochs,
        "max_new_tokens": a.max_new_tokens,
        "max_prompt_length": a.context - a.max_new_tokens,
        "temperature": a.temperature,
        "lr": a.lr,
        "kl_coef": a.kl_coef,
        "cliprange": 0.2,
        "penalize_no_eos": "false",
        "seed": a.seed,
        "threads": a.threads,
        "gold_every": 0,
        "eval_size": 8,
        "save_every": a.updates + 1,
        "max_kl": 0,
    }
    for name, value in options.items():
        cmd += [f"--{name}", value]
    return [str(c) for c in cmd]


def run_ours(stage: str, run: Path, a, env: dict) -> dict:
    proc = subprocess.run(our_command(stage, run, a), cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"our {stage} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((run / stage / "manifest.json").read_text())
    m = manifest["metrics"]
    logged = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lengths = [row["response/length"] for row in logged if "response/length" in row]
    return {
        "episodes": m["episodes"],
        "train_seconds": m["train_seconds"],
        "episodes_per_s": m["episodes_per_s"],
        "peak_memory_mb": m["peak_memory_mb"],
        # by construction (stages.ppo: one step per minibatch); TRL's side is counted
        "optimizer_steps_per_update": a.ppo_epochs * a.num_minibatches,
        "threads": manifest["threads"],
        "mean_answer_tokens": sum(lengths) / max(len(lengths), 1),
    }


def trl_command(run: Path, a) -> list[str]:
    cmd = [sys.executable, ROOT / "bench" / "trl_grpo.py", "--run_dir", run]
    options = {
        "updates": a.updates,
        "rollout_batch_size": a.rollout_batch_size,
        "num_generations": a.num_generations,
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "lr": a.lr,
        "beta": a.kl_coef,
        "seed": a.seed,
        "threads": a.threads,
    } | trl_settings(a.rollout_batch_size, a.num_minibatches, a.ppo_epochs, a.num_generations)
    for name, value in options.items():
        cmd += [f"--{name}", value]
    return [str(c) for c in cmd]


def run_trl(run: Path, a, env: dict) -> dict:
    proc = subprocess.run(trl_command(run, a), cwd=ROOT, env={**env, "PYTHONPATH": ""}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"TRL GRPO failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # A throughput ratio means nothing if one side does more work per update: stop rather than report it.
    steps = a.ppo_epochs * a.num_minibatches
    if r["optimizer_steps_per_update"] != steps or r["episodes_per_generation"] != [a.rollout_batch_size]:
        raise SystemExit(
            f"TRL took {r['optimizer_steps_per_update']} optimizer steps per generation of "
            f"{r['episodes_per_generation']} episodes, ours {steps} per {a.rollout_batch_size}: "
            "the sides do not compare"
        )
    return r


def summary(runs: list[dict]) -> dict:
    """One side's best run (by episodes/s), median episodes/s and highest peak memory over its runs."""
    rates = sorted(r["episodes_per_s"] for r in runs)
    return {
        "best": max(runs, key=lambda r: r["episodes_per_s"]),
        "median_episodes_per_s": rates[len(rates) // 2],
        "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
    }


def main(argv: list[str] | None = None) -> None:
    # Over 80 lines: its options, the alternating rounds and the table, each a few lines read once, top to bottom.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--rollout_batch_size", type=int, default=32, help="episodes per update")
    ap.add_argument("--num_generations", type=int, default=4, help="answers per prompt (G)")
    ap.add_argument("--num_minibatches", type=int, default=2)
    ap.add_argument("--ppo_epochs", type=int, default=4, help="passes over each rollout (TRL's num_iterations)")
    ap.add_argument("--max_new_tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--kl_coef", type=float, default=0.05, help="KL beta (k3 term in the loss)")
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (every side); 0: all cores")
    ap.add_argument("--ppo", type=int, default=1, help="1: also our PPO at the same rollout shape; 0: not")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results (grpo.json, grpo.md) and the models")
    a = ap.parse_args(argv)
    settings = trl_settings(a.rollout_batch_size, a.num_minibatches, a.ppo_epochs, a.num_generations)
    if trl_shape(settings) != (a.rollout_batch_size, a.ppo_epochs * a.num_minibatches):
        raise SystemExit("TRL's settings would not replay our update")

    out = a.out.resolve()
    run = out / f"run_l{a.n_layers}_h{a.hidden_size}_c{a.context}_s{a.seed}"
    build_run(run, a.n_layers, a.hidden_size, a.context, a.seed)
    env = bench_env(a.threads)

    sides = {"ours": lambda: run_ours("grpo", run, a, env), "trl": lambda: run_trl(run, a, env)}
    if a.ppo:
        sides["ours_ppo"] = lambda: run_ours("ppo", run, a, env)
    results = {side: [] for side in sides}
    for i in range(a.repeats):
        for side, fn in sides.items():
            before = os.getloadavg()[0]
            r = fn() | {"loadavg_1min_before": before, "loadavg_1min_after": os.getloadavg()[0]}
            results[side].append(r)
            print(
                f"[bench] run {i + 1}/{a.repeats} {side}: {r['episodes_per_s']:.2f} episodes/s, "
                f"peak {r['peak_memory_mb']:.0f} MB, {r['optimizer_steps_per_update']:g} optimizer steps/update, "
                f"{r['mean_answer_tokens']:.1f} tokens/answer, {r['threads']} thread(s), "
                f"load {before:.2f} -> {r['loadavg_1min_after']:.2f}",
                flush=True,
            )
    stats = {side: summary(rs) for side, rs in results.items()}
    best = {side: s["best"]["episodes_per_s"] for side, s in stats.items()}
    median = {side: s["median_episodes_per_s"] for side, s in stats.items()}
    memory = {side: s["peak_memory_mb"] for side, s in stats.items()}
    ratio = {"best": best["ours"] / best["trl"], "median": median["ours"] / median["trl"]}
    ratio["memory"] = memory["ours"] / memory["trl"]
    # Each round's runs are back to back: their ratio is the least disturbed by load that comes and goes.
    rounds = [o["episodes_per_s"] / t["episodes_per_s"] for o, t in zip(results["ours"], results["trl"], strict=True)]
    ratio["per_round"] = rounds
    if a.ppo:
        ratio |= {
            "grpo_vs_ppo_best": best["ours"] / best["ours_ppo"],
            "grpo_vs_ppo_median": median["ours"] / median["ours_ppo"],
            "grpo_vs_ppo_memory": memory["ours"] / memory["ours_ppo"],
        }
    trl_version = stats["trl"]["best"]["trl"]
    loads = [v for rs in results.values() for r in rs for v in (r["loadavg_1min_before"], r["loadavg_1min_after"])]

    config = (
        f"policy and reward model: Llama {a.n_layers} layers, width {a.hidden_size}, vocab 512, context {a.context}; "
        f"{a.updates} updates x {a.rollout_batch_size} episodes (G = {a.num_generations} answers to each of "
        f"{a.rollout_batch_size // a.num_generations} prompts), {a.max_new_tokens} new tokens at temperature "
        f"{a.temperature}, {a.ppo_epochs} epochs x {a.num_minibatches} minibatches (one optimizer step each), "
        f"lr {a.lr:g}, KL beta {a.kl_coef:g}; {a.threads or 'all'} thread(s); fp32 on every side; "
        f"{a.repeats} alternating rounds"
    )
    names = {
        "ours": "ours (stages.grpo)",
        "trl": f"TRL {trl_version} GRPOTrainer",
        "ours_ppo": "ours (stages.ppo, PPO)",
    }
    lines = [
        f"GRPO throughput ({config})",
        "",
        "| implementation | episodes/s (best) | episodes/s (median) | loop seconds (best) | peak memory (MB, max) "
        "| optimizer steps / update | tokens / answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {names[side]} | {best[side]:.2f} | {median[side]:.2f} | {s['best']['train_seconds']:.1f} | "
            f"{memory[side]:.0f} | {s['best']['optimizer_steps_per_update']:g} | "
            f"{s['best']['mean_answer_tokens']:.1f} |"
            for side, s in stats.items()
        ),
        "",
        f"**ours / TRL: {ratio['best']:.2f}x** (best of each side; target >= 1.5x), "
        f"median runs {ratio['median']:.2f}x; per round {min(rounds):.2f}x to {max(rounds):.2f}x "
        f"(median {sorted(rounds)[len(rounds) // 2]:.2f}x); peak memory ours / TRL {ratio['memory']:.2f}",
    ]
    if a.ppo:
        lines.append(
            f"GRPO / our PPO: {ratio['grpo_vs_ppo_best']:.2f}x (best), {ratio['grpo_vs_ppo_median']:.2f}x (median); "
            f"peak memory GRPO / PPO {ratio['grpo_vs_ppo_memory']:.2f}"
        )
    lines.append(f"1-minute load average around the runs: {min(loads):.2f} to {max(loads):.2f}")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo.json").write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                "trl_settings": settings,
                "runs": results,
                "best": {side: s["best"] for side, s in stats.items()},
                "median_episodes_per_s": median,
                "peak_memory_mb": memory,
                "ratio": ratio,
                "versions": versions() | {"trl": trl_version},
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )
    (out / "grpo.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
