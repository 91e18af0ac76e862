"""PPO throughput: our stage against TRL 1.12's PPOTrainer (`trl.experimental.ppo`, the last TRL
release with PPO) on identical configs at three shapes, same machine, rounds alternating.

    python -m bench.ppo [--shapes tiny,64x32,4x256] [--updates 10] [--repeats 3] [--threads 1]
    (= make bench-ppo)

Both sides get the same models (a random Llama policy and a reward model of the same shape,
built here over a tokenizer trained here), the same prompts (the embedded world's PPO prompts),
rollout batch, response length, temperature, PPO epochs and minibatches, and so the same optimizer
steps per update: PPO epochs x minibatches (`trl_settings`; TRL's own count is measured and checked).
Measured: episodes per second of the PPO loop (model loading and saving excluded on both sides), peak
resident memory, and the seconds per update of each phase (generate, score, reference, values, gc,
update; ours from the stage's manifest, TRL's by timing the functions its loop calls), and the work each
side's loop does: one more, untimed run per side under torch's FLOP counter (bench/ppo_flops.py for ours),
its FLOPs per update against the one-thread fp32 matmul peak measured here. Rounds alternate
(ours, TRL, ours, TRL, ...) and each side's median run is reported, so a burst of load from elsewhere on
a shared machine does not decide the ratio. Both sides run fp32.

TRL runs in its own virtual environment, bench/.trl-venv, created on first use with trl==1.12.0 and
the same torch, transformers and accelerate versions as the project's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bench.pretrain import matmul_peak_flops

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "bench" / ".trl-venv"
OUT = ROOT / "bench" / "out"
TRL_VERSION = "1.12.0"


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def ensure_trl_venv() -> Path:
    """bench/.trl-venv with trl==1.12.0 and our torch/transformers/accelerate versions."""
    python = TRL_VENV / "bin" / "python"
    want = versions()
    check = (
        "import trl, torch, transformers; "
        "print(trl.__version__, torch.__version__.split('+')[0], transformers.__version__)"
    )
    if python.exists():
        out = subprocess.run([python, "-c", check], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split() == [TRL_VERSION, want["torch"], want["transformers"]]:
            return python
    print(f"[bench] installing trl=={TRL_VERSION} into {TRL_VENV} (once)", flush=True)
    shutil.rmtree(TRL_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", TRL_VENV], check=True)
    subprocess.run([python, "-m", "ensurepip"], check=True, stdout=subprocess.DEVNULL)  # it has no -q
    pip = [python, "-m", "pip", "install", "-q"]
    # torch first, pinned: the CPU wheel the project uses (a plain `pip install torch` may pick CUDA).
    subprocess.run(pip + [f"torch=={want['torch']}"], check=True)
    subprocess.run(
        pip + [f"trl=={TRL_VERSION}", f"transformers=={want['transformers']}", f"accelerate=={want['accelerate']}"],
        check=True,
    )
    return python


def trl_settings(rollout_batch_size: int, num_minibatches: int, gradient_accumulation: int = 1) -> dict[str, int]:
    """TRL 1.12 PPOConfig batch settings that replay our stage's update on one process: the rollout of
    rollout_batch_size episodes, num_minibatches shuffled minibatches per PPO epoch, one optimizer step each.

    TRL 1.12 (`experimental/ppo/ppo_trainer.py`): rollout = per_device_train_batch_size *
    gradient_accumulation_steps (num_mini_batches divides it, it does not multiply it); a minibatch is
    cut into micro-batches of per_device_train_batch_size, and accelerate steps the optimizer once every
    gradient_accumulation_steps micro-batches, counted across minibatches. So only accumulation 1 steps
    once per minibatch: per-device batch = the whole rollout, of which each micro-batch takes one whole
    minibatch. (The earlier per-device batch = rollout / minibatches with accumulation = minibatches
    stepped once per PPO epoch: 4 steps per update where ours took 4 x 2.)"""
    if gradient_accumulation != 1:
        raise ValueError(
            "TRL 1.12's PPOTrainer cannot accumulate micro-batches within a minibatch: its accumulation "
            "counter spans minibatches, so any accumulation > 1 merges several into one step"
        )
    if rollout_batch_size % num_minibatches:
        raise ValueError(
            f"rollout_batch_size {rollout_batch_size} is not divisible by num_minibatches {num_minibatches}"
        )
    return {
        "per_device_train_batch_size": rollout_batch_size,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": num_minibatches,
        "local_rollout_forward_batch_size": rollout_batch_size,
    }


def trl_optimizer_steps_per_update(settings: dict[str, int], ppo_epochs: int) -> int:
    """Optimizer steps TRL 1.12's PPOTrainer takes per update with these settings, by replaying its
    loop (one process): epochs -> minibatches -> micro-batches in `accelerator.accumulate`, which steps
    on every gradient_accumulation_steps-th micro-batch."""
    local_batch = settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"]
    minibatch = local_batch // settings["num_mini_batches"]
    micro_batches, steps = 0, 0
    for _epoch in range(ppo_epochs):
        for _start in range(0, local_batch, minibatch):
            for _micro in range(0, minibatch, settings["per_device_train_batch_size"]):
                micro_batches += 1
                steps += micro_batches % settings["gradient_accumulation_steps"] == 0
    return steps


def build_run(run: Path, n_layers: int, hidden: int, context: int, seed: int) -> None:
    """RUN/world (prompts), RUN/sft (random tiny Llama) and RUN/reward (same shape, 1 label), with
    manifests so our stage accepts them; TRL reads the same directories."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from data.formats.text import load_texts
    from data.tokenizer import train_tokenizer
    from pipeline.stage import write_json_atomic

    if (run / "reward" / "manifest.json").is_file():
        return
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "world", "--seed", str(seed), "--out", run / "world"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    tokenizer = train_tokenizer(load_texts(run / "world" / "corpus.jsonl")[:2000], vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(seed)
    for stage, cls in (("sft", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        cls(config).save_pretrained(run / stage)
        tokenizer.save_pretrained(run / stage)
        write_json_atomic(run / stage / "manifest.json", {"stage": stage, "bench_stand_in": True})


def bench_env(threads: int) -> dict:
    """Both sides' environment: offline, no wandb, and `threads` torch threads each (0: the machine's)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def ours_options(run: Path, a) -> list[str]:
    """Our stage's command-line options for the benchmark's settings `a`."""
    options = [
        "--profile",
        "tiny",
        "--run_dir",
        run,
        "--force",
        "true",
        "--num_updates",
        a.updates,
        "--rollout_batch_size",
        a.rollout_batch_size,
        "--num_minibatches",
        a.num_minibatches,
        "--gradient_accumulation",
        1,
        "--ppo_epochs",
        a.ppo_epochs,
        "--max_new_tokens",
        a.max_new_tokens,
        "--max_prompt_length",
        a.context - a.max_new_tokens,
        "--temperature",
        a.temperature,
        "--lr",
        a.lr,
        "--kl_coef",
        a.kl_coef,
        "--seed",
        a.seed,
        "--gold_every",
        0,
        "--eval_size",
        8,
        "--save_every",
        a.updates + 1,
        "--no_eos_penalty",
        -1.0,
        "--max_kl",
        0,
        # The stage takes every core unless told (set_threads ignores OMP_NUM_THREADS): one count for both sides.
        "--threads",
        a.threads,
    ]
    return [str(o) for o in options]


def run_ours(run: Path, a, env: dict) -> dict:
    cmd = [sys.executable, "-m", "stages.ppo", *ours_options(run, a)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"our PPO failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    m = manifest["metrics"]
    return {
        "threads": manifest["threads"],
        "phase_seconds": m.get("phase_seconds"),
        "episodes": m["episodes"],
        "train_seconds": m["train_seconds"],
        "episodes_per_s": m["episodes_per_s"],
        "peak_memory_mb": m["peak_memory_mb"],
        # by construction (stages.ppo: one step per minibatch); TRL's side is counted
        "optimizer_steps_per_update": a.ppo_epochs * a.num_minibatches,
    }


def trl_command(python: Path, run: Path, a) -> list[str]:
    settings = trl_settings(a.rollout_batch_size, a.num_minibatches)
    cmd = [
        python,
        ROOT / "bench" / "trl_ppo.py",
        "--run_dir",
        run,
        "--updates",
        a.updates,
        "--rollout_batch_size",
        a.rollout_batch_size,
        "--ppo_epochs",
        a.ppo_epochs,
        "--max_new_tokens",
        a.max_new_tokens,
        "--temperature",
        a.temperature,
        "--lr",
        a.lr,
        "--kl_coef",
        a.kl_coef,
        "--seed",
        a.seed,
        "--max_prompts",
        1000,
    ]
    for name, value in settings.items():
        cmd += [f"--{name}", value]
    return [str(c) for c in cmd]


def run_trl(python: Path, run: Path, a, env: dict, *extra: str) -> dict:
    proc = subprocess.run(
        trl_command(python, run, a) + list(extra),
        cwd=ROOT,
        env={**env, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"TRL PPO failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # A throughput ratio means nothing if one side does more optimizer steps: stop rather than report it.
    if r["optimizer_steps_per_update"] != a.ppo_epochs * a.num_minibatches:
        raise SystemExit(
            f"TRL took {r['optimizer_steps_per_update']} optimizer steps per update, ours "
            f"{a.ppo_epochs * a.num_minibatches}: the sides do not compare"
        )
    return r


def count_ours(run: Path, a, env: dict) -> float:
    """FLOPs per update of our stage's loop (rollout and PPO update), from an untimed counting run."""
    cmd = [sys.executable, "-m", "bench.ppo_flops", *ours_options(run, a)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"counting our PPO's FLOPs failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return (r["rollout"] + r["update"]) / r["updates"]


def count_trl(python: Path, run: Path, a, env: dict) -> float:
    """FLOPs per update of TRL's `train()`, from an untimed counting run."""
    return run_trl(python, run, a, env, "--count_flops")["flops"] / a.updates


# The shapes the benchmark runs (each overrides the options): the tiny default; more and longer episodes;
# a model with real width (4 x 256) on a small rollout with more minibatches, where the training passes dominate.
SHAPES = {
    "tiny": {},
    "64x32": {"rollout_batch_size": 64, "max_new_tokens": 32},
    "4x256": {
        "n_layers": 4,
        "hidden_size": 256,
        "rollout_batch_size": 16,
        "max_new_tokens": 32,
        "ppo_epochs": 2,
        "num_minibatches": 4,
    },
}
PHASES = ("generate", "score", "reference", "values", "gc", "update")


def describe(a) -> str:
    return (
        f"Llama {a.n_layers} x {a.hidden_size}, vocab 512, context {a.context}; {a.updates} updates x "
        f"{a.rollout_batch_size} episodes, {a.max_new_tokens} new tokens at temperature {a.temperature}, "
        f"{a.ppo_epochs} PPO epochs x {a.num_minibatches} minibatches (one optimizer step each)"
    )


def split(r: dict) -> str:
    """A run's phase seconds per update, in PHASES order (- where the side has no such phase)."""
    phases, updates = r.get("phase_seconds") or {}, r["episodes"] / r["rollout_batch_size"]
    return " / ".join(f"{phases[p] / updates:.3f}" if p in phases else "-" for p in PHASES)


def main(argv: list[str] | None = None) -> None:
    # Over 80 lines: its options, the alternating rounds per shape and the table, each read once, top to bottom.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--rollout_batch_size", type=int, default=32)
    ap.add_argument("--num_minibatches", type=int, default=2)
    ap.add_argument("--ppo_epochs", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--kl_coef", type=float, default=0.05)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per shape; medians are reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (both sides); 0 leaves the default")
    base = ap.parse_args(argv)
    shapes = [s.strip() for s in base.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape {unknown[0]!r} (have: {', '.join(SHAPES)})")
    runs_of = {name: argparse.Namespace(**{**vars(base), **SHAPES[name]}) for name in shapes}
    for a in runs_of.values():  # a shape TRL cannot replay step for step fails here, before any install
        if (
            trl_optimizer_steps_per_update(trl_settings(a.rollout_batch_size, a.num_minibatches), a.ppo_epochs)
            != a.ppo_epochs * a.num_minibatches
        ):
            raise SystemExit(f"TRL's settings would not take one optimizer step per minibatch ({describe(a)})")

    python = ensure_trl_venv()
    env = bench_env(base.threads)
    if base.threads:
        torch.set_num_threads(base.threads)
    peak = matmul_peak_flops()  # at the sides' thread count, for their share of it
    results, flops = {}, {}
    for name, a in runs_of.items():
        run = OUT / f"ppo_l{a.n_layers}_h{a.hidden_size}_c{a.context}_s{a.seed}"
        build_run(run, a.n_layers, a.hidden_size, a.context, a.seed)
        results[name] = {"ours": [], "trl": []}
        for i in range(a.repeats):
            for side in ("ours", "trl"):
                r = run_ours(run, a, env) if side == "ours" else run_trl(python, run, a, env)
                r["rollout_batch_size"] = a.rollout_batch_size
                results[name][side].append(r)
                print(
                    f"[bench] {name} round {i + 1}/{a.repeats} {side}: {r['episodes_per_s']:.2f} episodes/s, "
                    f"peak {r['peak_memory_mb']:.0f} MB, {r['optimizer_steps_per_update']:g} optimizer steps/update",
                    flush=True,
                )
        flops[name] = {"ours": count_ours(run, a, env), "trl": count_trl(python, run, a, env)}
        print(
            f"[bench] {name} GFLOP per update: ours {flops[name]['ours'] / 1e9:.1f}, "
            f"TRL {flops[name]['trl'] / 1e9:.1f}",
            flush=True,
        )

    def median_run(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda r: r["episodes_per_s"])[len(rs) // 2]

    lines = [
        f"PPO throughput, ours (stages.ppo) against TRL {TRL_VERSION} PPOTrainer: fp32 on both sides, "
        f"{base.threads or 'default'} thread(s) each, median of {base.repeats} alternating rounds",
        "",
        "| shape | ours episodes/s | TRL episodes/s | ours / TRL | ours s per update: "
        + " / ".join(PHASES)
        + " | TRL | GFLOP per update: ours / TRL | share of the matmul peak: ours / TRL |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    summary = {}
    for name, sides in results.items():
        ours, trl = median_run(sides["ours"]), median_run(sides["trl"])
        ratio = ours["episodes_per_s"] / trl["episodes_per_s"]
        work = {side: flops[name][side] / runs_of[name].rollout_batch_size for side in ("ours", "trl")}
        # FLOPs per episode x episodes per second: the rate each side's loop ran at, against the peak.
        share = {side: work[side] * r["episodes_per_s"] / peak for side, r in (("ours", ours), ("trl", trl))}
        summary[name] = {
            **{"config": vars(runs_of[name]), "ours": ours, "trl": trl, "ratio": ratio},
            **{"flops_per_update": flops[name], "peak_share": share},
        }
        lines.append(
            f"| {name} | {ours['episodes_per_s']:.2f} | {trl['episodes_per_s']:.2f} | **{ratio:.2f}x** | "
            f"{split(ours)} | {split(trl)} | {flops[name]['ours'] / 1e9:.1f} / {flops[name]['trl'] / 1e9:.1f} | "
            f"{share['ours']:.0%} / {share['trl']:.0%} |"
        )
    lines += ["", *(f"- {name}: {describe(a)}" for name, a in runs_of.items())]
    lines.append(
        f"- fp32 matmul peak at {base.threads or 'the default'} thread(s), measured here: {peak / 1e9:.1f} GFLOP/s"
    )
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ppo.json").write_text(
        json.dumps({"shapes": summary, "runs": results, "peak_flops": peak, "versions": versions()}, indent=2)
    )
    (OUT / "ppo.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
