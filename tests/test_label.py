"""The labeling page (`make label`): the rank arithmetic, the app over HTTP on localhost, a person ranking a
group in a real browser (headless Chromium through Playwright), and a reward model trained on the result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from data.formats.comparisons import load_groups
from evaluation.label import (
    BadRanking,
    Session,
    merge_answers,
    pair_agreement,
    plot_path,
    ranking_from_ranks,
    read_human,
)
from pipeline.config import parse_config
from pipeline.stage import append_jsonl_line, read_manifest
from tests.conftest import ROOT, free_port, read_jsonl, write_jsonl

# ---- pure helpers -----------------------------------------------------------------------------------


def test_ranks_become_the_reward_stages_ranking_best_first():
    # Answer 2 got rank 1, answer 0 rank 2, answer 1 rank 3: best first is 2, 0, 1.
    assert ranking_from_ranks([2, 3, 1], 3) == [2, 0, 1]
    assert ranking_from_ranks(["1", "2"], 2) == [0, 1]  # a select's value arrives as text


@pytest.mark.parametrize(
    "ranks, message",
    [
        ([1, None, 2], "1 of 3 have no rank"),
        ([1, "", None], "2 of 3 have no rank"),
        ([1, 1, 2], "rank 1 is given to more than one answer"),
        ([1, 2, 4], "ranks go from 1 (best) to 3"),
        ([1, 2], "a rank for each of the 3 answers"),
        ([1, "x", 2], "whole numbers"),
    ],
)
def test_incomplete_duplicate_or_out_of_range_ranks_are_refused(ranks, message):
    with pytest.raises(BadRanking, match=message.replace("(", r"\(").replace(")", r"\)")):
        ranking_from_ranks(ranks, 3)


def test_agreement_counts_the_pairs_the_gold_scores_order():
    scores = [0.5, -1.0, 1.0, 0.5]  # gold: 2 > 0 = 3 > 1; the pair (0, 3) is a tie and no evidence
    assert pair_agreement([2, 0, 3, 1], scores) == (5, 5)
    assert pair_agreement([1, 3, 0, 2], scores) == (0, 5)
    # 0 above 2 is against the gold order; the other four pairs agree.
    assert pair_agreement([0, 2, 3, 1], scores) == (4, 5)
    assert pair_agreement([0, 1], [1.0, 1.0]) == (0, 0)


def test_identical_answers_are_shown_once_and_empty_ones_left_out():
    texts, writers, empty = merge_answers(
        [("sft", "Paris."), ("ppo", " Paris. "), ("base", ""), ("dpo", "Rome."), ("grpo", "  ")]
    )
    assert texts == ["Paris.", "Rome."]
    assert writers == [["sft", "ppo"], ["dpo"]]
    assert empty == ["base", "grpo"]


def test_plot_names_cannot_leave_the_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "eval.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (run / "report" / "out.png").symlink_to(tmp_path / "secret.png")
    assert plot_path(run, "eval.png") == (run / "report" / "eval.png").resolve()
    for name in ("../secret.png", "..", "/etc/passwd", "out.png", "missing.png", "eval.md", ".hidden.png"):
        assert plot_path(run, name) is None, name


def test_an_append_is_one_whole_line_and_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "c" / "human.jsonl"
    append_jsonl_line(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "tor')  # a writer that died mid-line
    assert len(read_human(path)) == 1  # the torn line is not a record
    append_jsonl_line(path, {"a": 3, "text": "ü"})
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"a": 3, "text": "ü"}\n'


def test_a_list_option_starting_with_plus_adds_to_the_profiles_list():
    from stages.reward.config import RewardStageConfig

    cfg = parse_config(RewardStageConfig, "reward", ["--run_dir", "R", "--train_files", "+", "{run_dir}/h.jsonl"])
    assert cfg.train_files == [
        "R/world/comparisons_train.jsonl",
        "R/comparisons/policy_comparisons.jsonl",
        "R/h.jsonl",
    ]
    cfg = parse_config(RewardStageConfig, "reward", ["--run_dir", "R", "--train_files", "R/h.jsonl"])
    assert cfg.train_files == ["R/h.jsonl"]


# ---- the app on localhost ---------------------------------------------------------------------------


def linked_run(tmp: Path, source: Path, stages=("world", "pretrain", "sft", "ppo", "reward")) -> Path:
    """A run directory of its own whose stages are links to `source`'s (the page writes only here)."""
    run = tmp / "run"
    run.mkdir()
    for name in stages:
        (run / name).symlink_to((source / name).resolve())
    return run


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, evaluated_run) -> Path:
    from evaluation.report import build_report

    run = linked_run(tmp_path_factory.mktemp("label"), evaluated_run)
    shutil.copy(evaluated_run / "eval.json", run / "eval.json")
    build_report(run)
    return run


@pytest.fixture(scope="module")
def server(label_run):
    """`python -m evaluation.label` on a free localhost port, until the module's tests are done."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "evaluation.label", "--run_dir", str(label_run), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--max_new_tokens", "8"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(url + "/api/state", timeout=2)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_app_answers_on_localhost(server, label_run):
    state = httpx.get(server + "/api/state").json()
    assert state["stages"] == ["base", "sft", "ppo"]
    assert state["sources"] == ["world"] and state["world"] is True
    assert state["human_file"] == str(label_run / "comparisons" / "human.jsonl")
    page = httpx.get(server + "/")
    assert page.status_code == 200 and 'id="answers"' in page.text


def draw(server: str, **body) -> dict:
    reply = httpx.post(server + "/api/group", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_submitted_ranking_is_one_kwise_record_the_reward_stage_reads(server, label_run):
    human = label_run / "comparisons" / "human.jsonl"
    before = len(read_human(human))
    group = draw(server, source="world", extra_stage="sft", extra=2)
    k = len(group["answers"])
    assert k >= 2 and len(set(group["answers"])) == k
    # Incomplete: refused with a message, nothing written.
    bad = httpx.post(server + "/api/rank", json={"group_id": group["group_id"], "ranks": [1] + [None] * (k - 1)})
    assert bad.status_code == 400 and "have no rank" in bad.json()["error"]
    assert len(read_human(human)) == before
    ranks = list(range(k, 0, -1))  # the last answer shown is the best
    saved = httpx.post(server + "/api/rank", json={"group_id": group["group_id"], "ranks": ranks}).json()
    assert saved["saved"] and saved["ranked"] == before + 1
    record = read_jsonl(human)[-1]
    assert record["prompt"] == group["prompt"] and record["responses"] == group["answers"]
    assert record["ranking"] == list(range(k - 1, -1, -1))
    # Every stage wrote one answer, SFT two more: each shown (alone or merged with equal ones) or left out as empty.
    writers = [w for ws in record["stages"] for w in ws] + saved["empty"]
    assert Counter(w.split(" (")[0] for w in writers) == Counter({"base": 1, "sft": 3, "ppo": 1})
    assert [r["stages"] for r in saved["reveal"]] == record["stages"]
    # A world prompt carries the gold judge's view, and the reveal shows it.
    assert len(record["gold_scores"]) == k and sorted(record["gold_ranking"]) == list(range(k))
    assert [r["gold_label"] for r in saved["reveal"]] == record["gold_labels"]
    assert saved["agreement"][1] <= k * (k - 1) // 2
    (group_read,) = load_groups([str(human)])[before:]
    assert group_read.responses == [group["answers"][i] for i in record["ranking"]]
    # The same group again: refused, still one record.
    again = httpx.post(server + "/api/rank", json={"group_id": group["group_id"], "ranks": ranks})
    assert again.status_code == 400 and "already" in again.json()["error"]
    assert len(read_human(human)) == before + 1


def test_a_typed_prompt_outside_the_world_has_no_gold_label(server, label_run):
    group = draw(server, prompt="Tell me a story about a lighthouse.", extra_stage="ppo", extra=3)
    ranks = list(range(1, len(group["answers"]) + 1))
    saved = httpx.post(server + "/api/rank", json={"group_id": group["group_id"], "ranks": ranks}).json()
    assert saved["saved"] and saved["agreement"] is None
    record = read_jsonl(label_run / "comparisons" / "human.jsonl")[-1]
    assert record["prompt"] == "Tell me a story about a lighthouse." and "gold_scores" not in record
    empty = httpx.post(server + "/api/group", json={"prompt": "  "})
    assert empty.status_code == 400 and "type a prompt" in empty.json()["error"]
    unknown = httpx.post(server + "/api/group", json={"source": "nowhere"})
    assert unknown.status_code == 400 and "no prompt source" in unknown.json()["error"]


def test_the_report_view_shows_the_reports_tables_and_plots(server, label_run):
    page = httpx.get(server + "/report")
    assert page.status_code == 200 and "<table>" in page.text and 'src="report/eval.png"' in page.text
    plot = httpx.get(server + "/report/eval.png")
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    (label_run.parent / "outside.png").write_bytes(b"\x89PNG outside")
    for name in ("..%2Foutside.png", "%2E%2E%2F..%2Foutside.png", "eval.json", "missing.png"):
        assert httpx.get(server + "/report/" + name).status_code == 404, name


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:  # a browser Playwright installed itself (`playwright install chromium`), where one was
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            return p.chromium.executable_path if Path(p.chromium.executable_path).is_file() else None
    except Exception:
        return None


def test_a_person_ranks_a_group_in_the_browser(server, label_run, tmp_path):
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium on this machine and `make browser` could not install one (apt)")
    from playwright.sync_api import expect, sync_playwright

    human = label_run / "comparisons" / "human.jsonl"
    before = len(read_human(human))
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(server + "/")
        expect(page.locator("#counter")).to_have_text(f"{before} groups ranked" if before != 1 else "1 group ranked")
        page.fill("#extra", "2")
        page.click("#draw")
        cards = page.locator("#answers .answer")
        expect(cards.first).to_be_visible(timeout=60_000)
        k = cards.count()
        assert k >= 2
        expect(page.locator("#answers .who").first).to_be_hidden()  # no stage names before submitting
        selects = page.locator("#answers .rank")
        for i in range(k - 1):  # all but the last: the page must refuse
            selects.nth(i).select_option(str(i + 1))
        page.click("#submit")
        expect(page.locator("#message")).to_contain_text("1 of")
        assert len(read_human(human)) == before
        selects.nth(k - 1).select_option(str(k))
        page.click("#submit")
        expect(page.locator("#message")).to_have_text("Saved.")
        expect(page.locator("#answers .who").first).to_contain_text("written by")
        expect(page.locator("#answers .who").first).to_contain_text("gold judge:")
        expect(page.locator("#counter")).to_contain_text(f"{before + 1} group")
        page.screenshot(path=str(tmp_path / "rank_view.png"), full_page=True)
        texts = [cards.nth(i).locator(".text").inner_text() for i in range(k)]
        browser.close()
    record = read_jsonl(human)[-1]
    assert record["responses"] == texts and record["ranking"] == list(range(k))
    assert (tmp_path / "rank_view.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_stages_or_with_a_bad_prompt_file_says_what_to_do(tmp_path, evaluated_run, capsys):
    from evaluation.label import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["--run_dir", str(empty)])
    assert stop.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make pretrain sft RUN=" in err
    bad = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Hi"}, {"question": "no prompt field"}])
    with pytest.raises(SystemExit):
        main(["--run_dir", str(evaluated_run), "--prompts_file", str(bad)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mine.jsonl: line 2" in err and "'prompt'" in err
    with pytest.raises(SystemExit):
        main(["--run_dir", str(evaluated_run), "--stages", "sft,dpo"])
    assert "dpo not finished" in capsys.readouterr().err


# ---- the loop closed: a reward model trained on the person's rankings ------------------------------


def test_the_reward_stage_trains_on_human_rankings_alone_or_with_the_worlds(tmp_path, staged_run):
    from stages.reward.run import main as reward_main

    run = linked_run(tmp_path, staged_run, stages=("world", "pretrain", "sft"))
    session = Session(run_dir=run, stages={"sft": run / "sft"}, max_new_tokens=8)
    from world.judge import GoldJudge

    session.judge = GoldJudge.load(run / "world")
    for n, prompt in enumerate(session.prompts("world")[:24]):
        group_id, held = session.new_group(prompt, "sft", 3)
        k = len(held.responses)
        session.rank(group_id, [(i + n) % k + 1 for i in range(k)])
    human = run / "comparisons" / "human.jsonl"
    assert len(read_human(human)) == 24
    reward_main(["--profile", "tiny", "--run_dir", str(run), "--train_files", str(human), "--threads", "1"])
    manifest = read_manifest(run / "reward")
    assert manifest["config"]["train_files"] == [str(human)]
    assert manifest["metrics"]["val_groups"] >= 1  # held out of the person's own groups
    shutil.rmtree(run / "reward")
    reward_main(["--profile", "tiny", "--run_dir", str(run), "--train_files", "+", str(human), "--threads", "1"])
    manifest = read_manifest(run / "reward")
    assert manifest["config"]["train_files"][-1] == str(human) and len(manifest["config"]["train_files"]) == 2


def test_make_reward_and_round_take_the_human_file_on_request(tmp_path):
    run = tmp_path / "run"

    # A make of its own: not the variables of a `make test` this may run under (ARGS, passed down in MAKEFLAGS).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}

    def make(*args):
        return subprocess.run(
            ["make", "--no-print-directory", *args, f"RUN={run}"], cwd=ROOT, capture_output=True, text=True, env=env
        )

    human = f"{run}/comparisons/human.jsonl"
    plan = make("-n", "reward", "HUMAN=also").stdout
    assert f"-m stages.reward --profile default --run_dir {run}  --train_files + {human}" in plan
    assert f"--train_files {human}" in make("-n", "reward", "HUMAN=only").stdout
    assert "--train_files" not in make("-n", "reward").stdout.split("stages.reward")[1]
    only_round = make("-n", "round", "HUMAN=only").stdout
    assert f"--train_files {human}\n" in only_round and "reward.comparisons sample" not in only_round
    also_round = make("-n", "round", "HUMAN=also").stdout
    reward_line = also_round.split("-m stages.reward")[1].split("python -m stages.ppo")[0]
    assert "grep -v '/human\\.jsonl$'" in reward_line and reward_line.count(human) == 1
    # Nothing ranked yet, or a value it does not know: one line, before any stage starts.
    missing = make("check-human", "HUMAN=also")
    assert missing.returncode != 0 and f"no rankings in {human}: rank answers first with `make label" in missing.stdout
    wrong = make("check-human", "HUMAN=yes")
    assert wrong.returncode != 0 and "HUMAN must be also or only, got 'yes'" in wrong.stdout
    write_jsonl(run / "comparisons" / "human.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}])
    assert make("check-human", "HUMAN=only").returncode == 0
