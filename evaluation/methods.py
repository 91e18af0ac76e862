"""`make methods`: which alignment method wins, judged by the world's gold judge, which no method optimises.

    python -m evaluation.methods --run_dir RUN             # worlds --seed 0/1/2, every method, 3 KL settings
    python -m evaluation.methods --run_dir RUN --quick true  # one world, each method's default only

For each world, one chain up to the reward model (`make data pretrain sft comparisons reward`; the run's own
world reuses RUN itself). From its SFT and reward models, every method runs at its default profile with its
KL knob (PPO, GRPO, RLOO and REINFORCE++: kl_coef; DPO: beta) times each of --kl_factors, and best-of-n
samples SFT and keeps the answer the reward model likes best (its KL is analytic: log n - (n-1)/n).
RUN/methods.md, RUN/methods.json and the plots in RUN/methods/ are built from those runs' manifests only
(evaluation/methods_table.py).

    RUN/methods/seed1/                          world 1's chain (world, pretrain, sft, comparisons, reward)
    RUN/methods/seed1/grpo-kl_coef-0.0667/      one method run: links to the chain's world, sft, reward and
                                                comparisons, and the stage's own directory (grpo/)
    RUN/methods/seed1/best_of_n/manifest.json   best-of-n on SFT
    RUN/methods/jobs/, logs/                    what each job ran (a rerun skips what is done), its output

Jobs run side by side, --jobs at a time with the cores shared among them. Every stage keeps its own
resume and up-to-date rules, so a killed bench continues where it stopped when rerun, and a rerun with
nothing changed (same commands, code commit, profiles and parents) starts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evaluation.evaluate import load_causal_lm, load_eval_prompts
from evaluation.methods_table import write_tables
from pipeline.config import parse_config, profile_path
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer
from pipeline.stage import file_sha256, git_commit, manifest_hash, read_manifest, write_json_atomic
from pipeline.stats import best_of_k_curve, best_of_k_kl, mean
from reward.judging import Answers, RewardModelJudge, WorldJudge, compare, judge_answers, summarize
from stages.dpo.config import DPOStageConfig
from stages.ppo.config import PPOConfig

METHODS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo", "best_of_n")
# Each method's KL knob: the RL stage's penalty coefficient (in the reward or the loss, as the method
# puts it), DPO's beta (the KL weight of the objective DPO solves in closed form, Rafailov et al. 2023).
KNOB = {"ppo": "kl_coef", "grpo": "kl_coef", "rloo": "kl_coef", "reinforce_pp": "kl_coef", "dpo": "beta"}
# What a method run needs of its chain, linked into its own run directory.
CHAIN_PARTS = ("world", "sft", "reward", "comparisons")


@dataclass(frozen=True)
class MethodsOptions:
    """What `make methods` runs, one field per command-line option (`build_parser` has their help)."""

    run_dir: str = "runs/default"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    kl_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    quick: bool = False
    profile: str = "default"
    jobs: int = 0
    best_of_n: int = 16
    stage_args: tuple[str, ...] = ()


@dataclass
class Job:
    """One unit of the bench: a world's chain, a method run, or best-of-n on a chain."""

    key: str  # names its stamp and log: "seed1-grpo-kl_coef-0.0667"
    seed: int
    kind: str  # "chain", "stage" or "best_of_n"
    chain: Path  # the world's chain directory
    out: Path  # the directory whose manifest.json says the job is done
    argv: list[str] = field(default_factory=list)
    method: str | None = None
    knob: str | None = None
    value: float | None = None
    factor: float | None = None
    run_dir: Path | None = None  # a method run's own run directory (links to the chain)


# ---- the plan ---------------------------------------------------------------------------------


def world_seed(run_dir: Path) -> int | None:
    """The seed of the world RUN/world holds (its summary), None when there is none yet."""
    try:
        return int(json.loads((run_dir / "world" / "summary.json").read_text(encoding="utf-8"))["config"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def chain_dirs(run_dir: Path, seeds: tuple[int, ...]) -> dict[int, Path]:
    """Each world's chain: RUN itself for the world it holds (or, with none yet, for the first seed), the
    others under RUN/methods/seed<s>."""
    own = world_seed(run_dir)
    own = seeds[0] if own is None else own
    return {s: run_dir if s == own else run_dir / "methods" / f"seed{s}" for s in seeds}


def knob_default(method: str, profile: str) -> float:
    """The KL knob's value in the method's profile."""
    if method == "dpo":
        return float(parse_config(DPOStageConfig, "dpo", ["--profile", profile]).beta)
    return float(parse_config(PPOConfig, method, ["--profile", profile]).kl_coef)


def plan(options: MethodsOptions, threads: int) -> list[Job]:
    """Every job in the order they may start: a world's chain before the runs that need it."""
    run_dir = Path(options.run_dir)
    own = world_seed(run_dir)
    # Quick: RUN's own world (its chain is the one `make all` made), or the first seed where RUN has none yet.
    seeds = ((options.seeds[0] if own is None else own),) if options.quick else options.seeds
    factors = (1.0,) if options.quick else options.kl_factors
    chains = chain_dirs(run_dir, seeds)
    jobs = []
    for s, chain in chains.items():
        # The Makefile's chain, so `make methods` builds each world exactly as `make all` builds RUN.
        make = ["make", "--no-print-directory", "data", "pretrain", "sft", "comparisons", "reward"]
        args = [f"RUN={chain}", f"SEED={s}", f"PROFILE={options.profile}", f"ARGS=--threads {threads}"]
        jobs.append(Job(f"seed{s}-chain", s, "chain", chain, chain / "reward", make + args))
    for s, chain in chains.items():
        bench = run_dir / "methods" / f"seed{s}"
        for method in options.methods:
            if method == "best_of_n":
                jobs.append(Job(f"seed{s}-best_of_n", s, "best_of_n", chain, bench / "best_of_n", method=method))
                continue
            knob, default = KNOB[method], knob_default(method, options.profile)
            for factor in sorted(factors):
                value = float(f"{default * factor:.3g}")
                name = f"{method}-{knob}-{value:g}"
                argv = [sys.executable, "-m", f"stages.{method}", "--profile", options.profile]
                argv += ["--run_dir", str(bench / name), f"--{knob}", f"{value:g}", "--threads", str(threads)]
                argv += list(options.stage_args)
                job = Job(f"seed{s}-{name}", s, "stage", chain, bench / name / method, argv, method, knob, value)
                job.factor, job.run_dir = factor, bench / name
                jobs.append(job)
    return jobs


# ---- stamps: what a finished job ran ------------------------------------------------------------


def stamp(job: Job, options: MethodsOptions) -> dict:
    """What the job's result depends on besides the stage's own rules: its command, the code, the profile
    it reads and its parents' manifests. The same stamp and a finished output: nothing to start."""
    parts = ("pretrain", "sft", "reward") if job.kind == "chain" else ("sft", "reward")
    profile = profile_path(job.method, options.profile) if job.kind == "stage" else None
    return {
        "argv": job.argv[1:] if job.kind == "stage" else job.argv,  # not the interpreter's path
        "commit": git_commit(),
        "profile": file_sha256(profile) if profile is not None and profile.is_file() else None,
        "parents": {p: manifest_hash(read_manifest(job.chain / p)) for p in parts},
        "best_of_n": options.best_of_n if job.kind == "best_of_n" else None,
        "output": manifest_hash(read_manifest(job.out)),
    }


def stamp_path(job: Job, options: MethodsOptions) -> Path:
    return Path(options.run_dir) / "methods" / "jobs" / f"{job.key}.json"


def is_done(job: Job, options: MethodsOptions) -> bool:
    path = stamp_path(job, options)
    if read_manifest(job.out) is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) == stamp(job, options)
    except ValueError:
        return False


# ---- running ----------------------------------------------------------------------------------


def link_chain(job: Job) -> None:
    """A method run's directory: relative links to its chain's parts (the stage's `{run_dir}/world/...`
    defaults then read the chain's files; a moved RUN keeps working), and the stage's own directory."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    for part in CHAIN_PARTS:
        link = job.run_dir / part
        target = os.path.relpath(job.chain / part, job.run_dir)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink():
            link.unlink()
        if link.exists():
            raise PipelineError(f"{link} exists and is not a link to {job.chain / part}: move it away")
        link.symlink_to(target, target_is_directory=True)


def run_process(job: Job, log: Path, threads: int) -> None:
    """The job's command with its output in `log`; a failure is one line naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # A chain's make sees the variables of a `make methods COMPARISONS_ARGS=...` around us (its command line
    # sets RUN, SEED, PROFILE and ARGS); torch in a job takes its share of the cores, no more.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(job.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        last = lines[-1][:300] if lines else "no output"
        raise PipelineError(f"{job.key} failed (exit {done.returncode}): {last} (whole log: {log})")


def best_of_n(job: Job, options: MethodsOptions) -> None:
    """n answers per held-out prompt sampled from SFT at the RL stages' temperature and answer length,
    scored by the reward model and the gold judge; the expected pick among k of them for each k = 1, 2, 4,
    ..., n (pipeline.stats.best_of_k), and the pick among all n judged in full against SFT's greedy answers."""
    started, n = time.time(), options.best_of_n
    rl = parse_config(PPOConfig, "ppo", ["--profile", options.profile])
    config = {"n": n, "temperature": rl.temperature, "max_new_tokens": rl.max_new_tokens, "seed": 0}
    parents = {p: manifest_hash(read_manifest(job.chain / p)) for p in ("sft", "reward")}
    done = read_manifest(job.out)
    if done is not None and done.get("config") == config and done.get("parent_hashes") == parents:
        return  # the same samples again: up to date, as a stage with the same config and parents
    world = WorldJudge.load(job.chain / "world")
    records = load_eval_prompts(job.chain / "world", world)
    prompts = [r["prompt"] for r in records]
    policy, tokenizer = load_causal_lm(job.chain / "sft")
    proxy = RewardModelJudge.load(job.chain / "reward")
    many = [p for p in prompts for _ in range(n)]
    samples = answer(policy, tokenizer, many, rl.max_new_tokens, temperature=rl.temperature, batch_size=64, seed=0)
    sampled = judge_answers(world, many, samples, proxy=proxy)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in samples]
    per = [slice(i * n, (i + 1) * n) for i in range(len(prompts))]
    curve = best_of_k_curve([sampled.proxy[s] for s in per], [sampled.scores[s] for s in per], n)
    for point in curve:
        point["tokens_generated"] = point["k"] * len(prompts) * mean(lengths)
    picked = [max(range(s.start, s.stop), key=lambda i: sampled.proxy[i]) for s in per]
    best = judge_answers(world, prompts, Answers([samples[i] for i in picked]), proxy=proxy)
    sft = judge_answers(world, prompts, answer(policy, tokenizer, prompts, rl.max_new_tokens), proxy=proxy)
    summary, win = summarize(best, 1000), compare(best, sft, 1000)
    metrics = {
        "n": n,
        "curve": curve,
        "gold_score": summary["gold_score"],
        "gold_score_ci": summary["gold_score_ci"],
        "gold_win_rate": win["win_rate"],
        "gold_win_rate_ci": win["ci"],
        "kl_to_sft": best_of_k_kl(n),
        "hallucination_rate": summary["hallucination_rate"],
        "harmful_refusal_rate": summary["refusal_accuracy"],
        "over_refusal_rate": summary["over_refusal_rate"],
        "reward_score": summary["proxy_score"],
        "tokens_generated": curve[-1]["tokens_generated"],
        "eval_prompts": len(prompts),
    }
    manifest = {"stage": "best_of_n", "config": config, "metrics": metrics, "git_commit": git_commit()}
    manifest.update(parent={"sft": str(job.chain / "sft"), "reward": str(job.chain / "reward")}, parent_hashes=parents)
    manifest.update(started=started, seconds=round(time.time() - started, 1))
    write_json_atomic(job.out / "manifest.json", manifest)


class Bench:
    """Runs the plan, --jobs at a time: a job waits for its world's chain, a failed job stops only what
    needs it, and every failure is named at the end."""

    def __init__(self, options: MethodsOptions, jobs: int, threads: int):
        self.options, self.jobs, self.threads = options, jobs, threads
        self.lock = threading.Lock()
        # Best-of-n samples here, in this process, through torch's global RNG (transformers' generate
        # takes no generator): two at once would interleave their draws and move each other's figures.
        self.sampling = threading.Lock()
        self.failed: list[str] = []

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[methods] {text}", flush=True)

    def run(self, job: Job, chain: Future | None) -> bool:
        """True when the job is done (now or before)."""
        if chain is not None and not chain.result():
            self.failed.append(f"{job.key}: not run, its world's chain failed")
            return False
        if is_done(job, self.options):
            return True
        log = Path(self.options.run_dir) / "methods" / "logs" / f"{job.key}.log"
        self.say(f"{job.key}: started (log {log})")
        started = time.time()
        try:
            if job.kind == "stage":
                link_chain(job)
            if job.kind == "best_of_n":
                with self.sampling:
                    torch.set_num_threads(self.threads)
                    best_of_n(job, self.options)
            else:
                run_process(job, log, self.threads)
            if read_manifest(job.out) is None:
                raise PipelineError(f"{job.key} ended without writing {job.out}/manifest.json (log: {log})")
        except Exception as e:  # noqa: BLE001 - one job's failure is reported, the others go on
            self.failed.append(str(e) if isinstance(e, PipelineError) else f"{job.key}: {type(e).__name__}: {e}")
            self.say(self.failed[-1])
            return False
        write_json_atomic(stamp_path(job, self.options), stamp(job, self.options))
        self.say(f"{job.key}: done in {time.time() - started:.0f} s")
        return True

    def run_all(self, plan: list[Job]) -> None:
        chains: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = []
            for job in plan:  # chains come first in the plan, so a job never waits on one not yet started
                future = pool.submit(self.run, job, chains.get(job.seed) if job.kind != "chain" else None)
                if job.kind == "chain":
                    chains[job.seed] = future
                futures.append(future)
            for future in futures:
                future.result()


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.methods", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run_dir",
        default="runs/default",
        help="The run whose world, SFT and reward model are world 1 of the bench; results go to RUN/methods.",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="The worlds (`python -m world --seed`), each with its own chain.",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="The methods to run.")
    p.add_argument(
        "--kl_factors",
        type=float,
        nargs="+",
        default=[1 / 3, 1.0, 3.0],
        help="Each method's KL knob is run at its default times each of these.",
    )
    p.add_argument(
        "--quick",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=False,
        help="One world (RUN's own, or the first seed), each method's default only.",
    )
    p.add_argument(
        "--profile", default="default", help="The profile every stage of the chains and every method run reads."
    )
    p.add_argument(
        "--jobs", type=int, default=0, help="Jobs side by side, the cores shared among them; 0: one per core."
    )
    p.add_argument(
        "--best_of_n", type=int, default=16, help="Answers sampled per prompt for best-of-n (0: no best-of-n)."
    )
    p.add_argument(
        "--stage_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="Options passed to every method run (last on the line), e.g. --num_updates 4.",
    )
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    methods = tuple(m for m in args.methods if m != "best_of_n" or args.best_of_n > 0)
    options = MethodsOptions(
        args.run_dir, tuple(args.seeds), methods, tuple(args.kl_factors), args.quick, args.profile, args.jobs,
        args.best_of_n, tuple(args.stage_args),
    )  # fmt: skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = options.jobs if options.jobs > 0 else cores
    threads = max(1, cores // jobs)
    todo = plan(options, threads)
    print(
        f"[methods] {len(todo)} jobs in {options.run_dir}/methods, {jobs} at a time x {threads} thread(s)", flush=True
    )
    started = time.time()
    bench = Bench(options, jobs, threads)
    bench.run_all(todo)
    if bench.failed:
        raise PipelineError(f"{len(bench.failed)} job(s) failed; the first: {bench.failed[0]}")
    md = write_tables(Path(options.run_dir), todo)
    print(f"[methods] wrote {md} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
