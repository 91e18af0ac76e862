"""`make methods`: the plan it runs, the statistics of its tables, and the bench end to end on tiny."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import evaluation.methods as methods
from evaluation.methods import METHODS, MethodsOptions, plan
from evaluation.methods_table import matched_kl, over_worlds
from pipeline.stats import interpolate, t_interval
from tests.conftest import ROOT


def test_t_interval_by_hand():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    # s = 1, t(2) = 4.303: 2 -+ 4.303 / sqrt(3)
    assert mean == 2.0 and math.isclose(high - mean, 4.303 / math.sqrt(3)) and math.isclose(mean - low, high - mean)
    assert t_interval([0.5]) == (0.5, None, None)
    assert t_interval([]) == (None, None, None)
    assert t_interval([0.2, None, 0.4])[0] == pytest.approx(0.3)


def test_interpolate_reads_a_frontier_between_its_points_only():
    points = [(2.0, 0.6), (0.5, 0.3), (1.0, 0.5)]
    assert interpolate(points, 0.75) == pytest.approx(0.4)
    assert interpolate(points, 1.5) == pytest.approx(0.55)
    assert interpolate(points, 2.0) == pytest.approx(0.6)
    assert interpolate(points, 0.4) is None and interpolate(points, 2.1) is None
    assert interpolate([(1.0, 0.7)], 1.0) == 0.7 and interpolate([(1.0, 0.7)], 0.9) is None


def test_matched_kl_reads_every_worlds_frontier_and_names_a_lead_within_the_intervals():
    def row(seed, method, setting, kl, gold):
        row = {"seed": seed, "method": method, "setting": setting, "default": setting == "b", "kl": kl, "gold": gold}
        return row | {"gain": gold - 0.1}

    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.02)):
        rows += [row(seed, "ppo", "a", 0.5, 0.50 + shift), row(seed, "ppo", "b", 1.5, 0.70 + shift)]
        rows += [row(seed, "grpo", "a", 0.8, 0.40 + shift), row(seed, "grpo", "b", 1.2, 0.44 + shift)]
        rows += [row(seed, "dpo", "a", 1.0 + seed, 0.3)]  # reaches KL 1 in world 0 only
    by_kl = {x["kl"]: x for x in matched_kl(rows)}
    assert set(by_kl) == {0.5, 1.0}  # 0.25 and 2+ lie outside every method's settings
    mean, low, high = by_kl[1.0]["scores"]["ppo"]
    assert mean == pytest.approx(0.50) and low < mean < high
    assert by_kl[1.0]["scores"]["grpo"][0] == pytest.approx(0.32)
    assert "dpo" not in by_kl[1.0]["scores"]  # not reached in worlds 1 and 2
    assert by_kl[1.0]["leader"] == "ppo" and by_kl[1.0]["close"] == []  # gains 0.50 +- 0.05 against 0.32 +- 0.05
    assert by_kl[0.5]["leader"] == "ppo" and list(by_kl[0.5]["scores"]) == ["ppo"]
    entry = next(e for e in over_worlds(rows) if e["method"] == "ppo" and e["setting"] == "b")
    assert entry["worlds"] == 3 and entry["gold"][0] == pytest.approx(0.70) and entry["kl"][1:] == (1.5, 1.5)


def test_the_full_plan_runs_every_method_at_three_kl_settings_on_three_worlds(tmp_path):
    jobs = plan(MethodsOptions(run_dir=str(tmp_path / "run")), threads=1)
    chains = [j for j in jobs if j.kind == "chain"]
    # With no world yet, RUN becomes the first seed's chain; the others live under RUN/methods.
    assert [(j.seed, j.chain) for j in chains] == [
        (0, tmp_path / "run"),
        (1, tmp_path / "run" / "methods" / "seed1"),
        (2, tmp_path / "run" / "methods" / "seed2"),
    ]
    assert jobs[:3] == chains  # a job never waits on a chain queued after it
    stages = [j for j in jobs if j.kind == "stage"]
    assert len(stages) == 3 * 5 * 3 and len([j for j in jobs if j.kind == "best_of_n"]) == 3
    grpo = sorted(j.value for j in stages if j.method == "grpo" and j.seed == 1)
    assert grpo == [0.0667, 0.2, 0.6]  # the default profile's kl_coef 0.2 times 1/3, 1, 3
    dpo = sorted(j.value for j in stages if j.method == "dpo" and j.seed == 0)
    assert dpo == [0.0333, 0.1, 0.3]  # beta
    job = next(j for j in stages if j.method == "rloo" and j.seed == 2 and j.factor == 3.0)
    assert job.out == tmp_path / "run" / "methods" / "seed2" / "rloo-kl_coef-0.6" / "rloo"
    assert job.argv[2:] == [
        "stages.rloo",
        *("--profile", "default", "--run_dir", str(job.run_dir), "--kl_coef", "0.6", "--threads", "1"),
    ]
    quick = plan(MethodsOptions(run_dir=str(tmp_path / "run"), quick=True), threads=2)
    assert {j.seed for j in quick} == {0} and {j.factor for j in quick if j.kind == "stage"} == {1.0}
    assert {j.method for j in quick if j.kind != "chain"} == set(METHODS)
    # Quick on a run whose world is another seed: that world, from RUN's own chain.
    (tmp_path / "run" / "world").mkdir(parents=True)
    (tmp_path / "run" / "world" / "summary.json").write_text(json.dumps({"config": {"seed": 7}}))
    quick = plan(MethodsOptions(run_dir=str(tmp_path / "run"), quick=True), threads=2)
    assert {(j.seed, j.chain) for j in quick} == {(7, tmp_path / "run")}


def test_best_of_n_jobs_sample_one_at_a_time_whatever_the_jobs(tmp_path, monkeypatch):
    """Best-of-n runs in the bench's own process on torch's global RNG: jobs side by side must not
    interleave their draws, or a world's figures would depend on what ran beside it."""
    active, most = [0], [0]
    count = threading.Lock()

    def fake_best_of_n(job, options):
        with count:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        job.out.mkdir(parents=True)
        (job.out / "manifest.json").write_text(json.dumps({"stage": "best_of_n"}))
        with count:
            active[0] -= 1

    monkeypatch.setattr(methods, "best_of_n", fake_best_of_n)
    monkeypatch.setattr(methods, "stamp", lambda job, options: {"job": job.key})
    options = MethodsOptions(run_dir=str(tmp_path), jobs=3)
    plan_ = [methods.Job(f"seed{s}-best_of_n", s, "best_of_n", tmp_path, tmp_path / f"s{s}") for s in range(3)]
    bench_ = methods.Bench(options, jobs=3, threads=1)
    bench_.run_all(plan_)
    assert bench_.failed == [] and most[0] == 1
    assert all((job.out / "manifest.json").is_file() for job in plan_)


def bench(run, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # Not the variables of a `make test ARGS=...` around us (make exports them): they would reach the chain.
    outer = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARGS", "LAUNCH", "SEED", "STAGE", "PROMPT", "PROFILE")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", COMPARISONS_ARGS="--prompts 16 --k 3 --max_new_tokens 16")
    argv = [sys.executable, "-m", "evaluation.methods", "--run_dir", str(run), "--profile", "tiny", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_the_bench_end_to_end_on_tiny(tmp_path):
    run = tmp_path / "run"
    proc = bench(run, "--seeds", "3", "--quick", "true", "--best_of_n", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run / "methods"
    text = (run / "methods.md").read_text()
    for plot in ("frontier.png", "cost.png", "win_rates.png", "overoptimisation.png"):
        assert (out / plot).stat().st_size > 0 and f"](methods/{plot})" in text
    rows = json.loads((run / "methods.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(METHODS)
    # Every row's figures are its own run's manifest's, and the run read the chain of world 3.
    for r in rows:
        manifest = json.loads(open(r["manifest"]).read())
        m = manifest["metrics"]
        if r["method"] == "best_of_n":
            point = next(p for p in m["curve"] if f"n {p['k']}" == r["setting"])
            assert (r["gold"], r["kl"], r["proxy"]) == (point["gold"], point["kl"], point["proxy"])
            assert manifest["parent"]["sft"] == str(run / "sft")
            continue
        assert (r["gold"], r["win"], r["kl"]) == (m["gold_score"], m["gold_win_rate"], m["kl_to_sft"])
        assert (r["hallucination"], r["refusal"]) == (m["hallucination_rate"], m["harmful_refusal_rate"])
        assert r["over_refusal"] == m["over_refusal_rate"] and r["seconds"] == manifest["seconds"]
        assert r["win_ci"] == m["gold_win_rate_ci"] and r["prompts"] == m["eval_prompts"]
        assert os.path.realpath(manifest["parent"]["path"]) == os.path.realpath(run / "sft")
        assert r["gain"] == pytest.approx(m["gold_score"] - m["sft_gold_score"])
        gold = f"{r['gold']:.3f} [{r['gold_ci'][0]:.3f}, {r['gold_ci'][1]:.3f}]"
        row = f"| {gold} | {r['gain']:.3f} | {r['win']:.3f} ["
        assert row in text, (row, text)
    assert json.loads((run / "world" / "summary.json").read_text())["config"]["seed"] == 3

    # Nothing changed: a rerun starts no job. A bad option for the stages: one line, non-zero, and the
    # table of the runs that finished stays as it was.
    again = bench(run, "--seeds", "3", "--quick", "true", "--best_of_n", "4")
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout
    # Without the bench's records (another commit): every job asks its stage, which finds itself up to date.
    manifests = {r["manifest"]: open(r["manifest"]).read() for r in rows}
    shutil.rmtree(out / "jobs")
    again = bench(run, "--seeds", "3", "--quick", "true", "--best_of_n", "4")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {path: open(path).read() for path in manifests} == manifests
    bad = bench(run, "--seeds", "3", "--quick", "true", "--best_of_n", "4", "--stage_args", "--no_such_option", "1")
    assert bad.returncode == 2 and "failed" in bad.stderr and "no_such_option" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert (run / "methods.md").read_text() == text
