"""GPU check (`python -m bench.gpu`): every stage on its `gpu` profile for a bounded number of steps
on one GPU, printing throughput and peak GPU memory, then the pretraining again with `--compile`.
Sized for under 8 minutes on one GPU.

It runs offline: the data is the embedded world (scaled up) instead of the profiles' Hub corpora.
`--profile tiny` runs the same harness on a CPU in a minute, to check the harness itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.pretrain import flops_per_token

# H200 / H100 SXM dense bf16 peak (NVIDIA data sheet), used for MFU when no other figure is given.
DEFAULT_PEAK_TFLOPS = 989.0

STEPS = {  # bounded work per stage: (profile -> overrides)
    "gpu": {
        "pretrain": [
            "--max_steps",
            "60",
            "--eval_every",
            "60",
            "--save_every",
            "1000",
            "--log_every",
            "10",
            "--vocab_size",
            "8192",
            "--train_files",
            "{run}/world/corpus.jsonl",
            "--val_fraction",
            "0.02",
        ],
        "sft": ["--max_steps", "40", "--save_every", "1000", "--eval_prompts", "64"],
        "reward": ["--max_steps", "40", "--save_every", "1000"],
        "ppo": ["--num_updates", "6", "--save_every", "1000", "--gold_every", "3", "--eval_size", "64"],
    },
    "tiny": {
        "pretrain": ["--max_steps", "10", "--train_files", "{run}/world/corpus.jsonl"],
        "sft": ["--max_steps", "5"],
        "reward": ["--max_steps", "5"],
        "ppo": ["--num_updates", "2"],
    },
}


def run_stage(stage: str, profile: str, run: Path, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        f"stages.{stage}",
        "--profile",
        profile,
        "--run_dir",
        str(run),
        *[a.replace("{run}", str(run)) for a in extra],
    ]
    t = time.time()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t


def last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def stage_row(stage: str, run: Path, seconds: float, peak_tflops: float) -> dict:
    """A finished stage's table row: wall time, throughput (MFU for pretraining), peak memory."""
    manifest = json.loads((run / stage / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    m = manifest["metrics"]
    row = {"stage": stage, "seconds": round(seconds, 1), "peak_memory_mb": m.get("peak_memory_mb")}
    if stage == "pretrain":
        tps = last(metrics, "perf/tokens_per_s")
        cfg = manifest["config"]
        flops = flops_per_token(m["params"], cfg["n_layers"], cfg["hidden_size"], cfg["context"])
        row.update(throughput=f"{tps:,.0f} tokens/s", mfu=f"{tps * flops / (peak_tflops * 1e12):.1%}")
    elif stage == "ppo":
        row.update(throughput=f"{last(metrics, 'perf/episodes_per_s'):.2f} episodes/s")
    else:
        sps = last(metrics, "train_samples_per_second")
        row.update(throughput=f"{sps:,.1f} samples/s" if sps else "-")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--run_dir", default="runs/gpu-check")
    ap.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    args = ap.parse_args()
    run = Path(args.run_dir)
    world_flags = ["--num_people", "200"] if args.profile == "gpu" else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "world",
            "--seed",
            "0",
            "--out",
            str(run / "world"),
            "--if_missing",
            "true",
            *world_flags,
        ],
        check=True,
    )

    rows = []
    for stage in ("pretrain", "sft", "reward", "ppo"):
        seconds = run_stage(stage, args.profile, run, STEPS[args.profile][stage])
        rows.append(stage_row(stage, run, seconds, args.peak_tflops))
    # The same pretraining with --compile (regional torch.compile), in a run of its own: what
    # compiling buys on this machine once its compile time is paid.
    compiled = run.with_name(run.name + "-compile")
    extra = [a.replace("{run}", str(run)) for a in STEPS[args.profile]["pretrain"]] + ["--compile", "true"]
    seconds = run_stage("pretrain", args.profile, compiled, extra)
    rows.append({**stage_row("pretrain", compiled, seconds, args.peak_tflops), "stage": "pretrain --compile"})

    print("| stage | wall s | throughput | MFU | peak memory MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['throughput']} | {r.get('mfu', '-')} | {r['peak_memory_mb']} |")


if __name__ == "__main__":
    main()
