"""Report: Markdown + PNGs from a fully evaluated run, and a run with stages and evaluation missing."""

from __future__ import annotations

import json
import os
import re

from evaluation.evaluate import EvalOptions, evaluate_run, markdown_table
from evaluation.report import build_report, sample_rows, series
from evaluation.report import main as report_main
from pipeline.stage import write_json_atomic
from tests.conftest import MY_PROMPTS, write_jsonl
from world.judge import FAMILIES, GoldJudge

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_IMAGES = {
    "eval.png",
    "pretrain.png",
    "sft.png",
    "reward.png",
    "ppo_reward_vs_gold.png",
    "ppo_length.png",
    "ppo_training.png",
}


def linked_images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_series_keeps_only_finite_numbers():
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "eval_loss": 1.0},
        {"step": 3, "loss": "nan"},
        {"step": 4, "loss": float("inf")},
        {"step": 5, "loss": 1.5},
    ]
    assert series(rows, "loss") == ([1, 5], [2.0, 1.5])
    assert series(rows, "missing") == ([], [])


def test_report_of_a_full_run(evaluated_run):
    report_main(["--run_dir", str(evaluated_run)])  # the CLI entry, in-process (matplotlib import is slow)
    report = (evaluated_run / "report.md").read_text()
    for stage in ("Pretraining", "Supervised fine-tuning", "Reward model", "PPO"):
        assert f"## {stage}" in report
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert f"| {stage} | finished |" in report
    assert "not finished" not in report and "make eval" not in report
    assert "| metric | base | sft | ppo |" in report  # the evaluation table
    # with the floor: constant answers' gold scores and win rates against SFT
    floor = "| constant answer (floor) | gold score | win rate vs sft [95% CI] |\n|---|---|---|\n| (empty) | -1.000 |"
    assert floor in report
    assert "test/pairwise_accuracy **0.640**" in report  # the reward model's held-out accuracy
    assert (
        "| fact: over_refused > wrong | 41 | 95 | 0.432 |\n| fact: correct > verbose | 47 | 94 | 0.500 |\n"
        "| fact: correct > wrong | 83 | 92 | 0.902 |"
    ) in report  # the reward model's worst pairs first

    links = linked_images(report)
    assert {os.path.basename(link) for link in links} == EXPECTED_IMAGES
    for link in links:
        data = (evaluated_run / link).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, link

    # Sample answers: 2 prompts per family, each answered by every stage with its gold label.
    result = json.loads((evaluated_run / "eval.json").read_text())
    chosen = sample_rows(result)
    assert [a["family"] for a in chosen] == [f for f in FAMILIES for _ in range(2)]
    table = report[report.index("## Sample answers") :]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    assert len(rows) == len(chosen)
    for row, a in zip(rows, chosen, strict=False):
        assert a["prompt"] in row
        assert row.count("**(") == 3 and all(
            f"**({a['responses'][n]['label']})**" in row for n in ("base", "sft", "ppo")
        )
        assert all(a["responses"][n]["label"] in GoldJudge.LABELS for n in ("base", "sft", "ppo"))


def test_report_with_missing_stages_and_no_evaluation(staged_run, tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    os.symlink(staged_run / "pretrain", run / "pretrain")
    (run / "sft").mkdir()  # started, not finished
    report = build_report(run).read_text()
    assert f"this run has no world and its gold judge; run `make eval RUN={run} EVAL_ARGS='--prompts FILE'`" in report
    os.symlink(staged_run / "world", run / "world")
    report = build_report(run).read_text()
    assert f"run `make eval RUN={run}` (writes" in report and "--prompts" not in report
    for stage in ("sft", "reward", "ppo"):
        assert f"run `make {stage} RUN={run}`" in report
    assert linked_images(report) == ["report/pretrain.png"]
    assert (run / "report" / "pretrain.png").read_bytes().startswith(PNG_MAGIC)


def test_report_of_a_run_evaluated_on_your_prompts(staged_run, tmp_path):
    run = tmp_path / "real"
    run.mkdir()
    for name in ("pretrain", "sft", "reward", "ppo"):
        os.symlink(staged_run / name, run / name)
    prompts = [write_jsonl(tmp_path / f"set{i}.jsonl", MY_PROMPTS * 3) for i in (1, 2)]
    options = EvalOptions(max_new_tokens=6, bootstrap=20, kl_prompts=0, prompt_files=[str(p) for p in prompts])
    result = evaluate_run(run, options, log=lambda *_: None)
    write_json_atomic(run / "eval.json", result)
    report = build_report(run).read_text()
    assert markdown_table(result) in report and "| judge score: set1.jsonl |" in report
    assert "higher reward-model score (ties half)" in report and "reward-model score of the judge in bold" in report
    assert "report/eval.png" in linked_images(report)
    assert (run / "report" / "eval.png").read_bytes().startswith(PNG_MAGIC)
    # Sample answers: the first 8 prompts of each file, every stage's answer with the judge's score.
    table = report[report.index("## Sample answers") :]
    rows = [line for line in table.splitlines() if line.startswith("| set")]
    assert [r.split(" | ")[0] for r in rows] == ["| set1.jsonl"] * 8 + ["| set2.jsonl"] * 8
    first = result["answers"][0]["responses"]
    assert all(f"**({first[n]['score']:+.2f})**" in rows[0] for n in ("base", "sft", "ppo"))
