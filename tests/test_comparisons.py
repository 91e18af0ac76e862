"""Comparison collection (`python -m reward.comparisons`): sampling from the SFT policy and ranking with
the gold labeler, and the human-ranking round trip (export -> rank -> import) with its validation."""

from __future__ import annotations

import json

from data.formats.comparisons import load_groups
from reward.comparisons import main as comparisons_main
from stages.reward.run import main as reward_main
from tests.conftest import new_run, one_line_error, read_jsonl, write_jsonl
from world.judge import GoldJudge


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, comparisons_main, argv, *expected)


def test_sample_ranks_policy_answers_and_reward_trains_on_both(sft_run, tmp_path, capsys):
    run = new_run(tmp_path, sft_run)
    argv = ["sample", "--run_dir", str(run), "--k", "3", "--prompts", "6", "--max_new_tokens", "8", "--seed", "1"]
    comparisons_main(argv)
    out = run / "comparisons" / "policy_comparisons.jsonl"
    records = read_jsonl(out)
    judge = GoldJudge.load(run / "world")
    assert 1 <= len(records) <= 6
    for r in records:
        k = len(r["responses"])
        assert 2 <= k <= 3 and len({x.strip() for x in r["responses"]}) == k and all(x.strip() for x in r["responses"])
        assert sorted(r["ranking"]) == list(range(k)) and sorted(r["gold_ranking"]) == list(range(k))
        scores = [judge.score(r["prompt"], x) for x in r["responses"]]
        assert [scores[i] for i in r["gold_ranking"]] == sorted(scores, reverse=True)  # noise-free = by gold score
        assert r["family"] == judge.spec(r["prompt"])["family"]
    first = out.read_text()
    assert "groups" in capsys.readouterr().out
    comparisons_main(argv)
    assert "up to date" in capsys.readouterr().out and out.read_text() == first
    comparisons_main(argv + ["--force"])
    assert "groups" in capsys.readouterr().out
    assert out.read_text() == first, "same seed, same comparisons"
    comparisons_main(argv[:-1] + ["2"])  # another seed: sampled anew
    assert "groups" in capsys.readouterr().out
    comparisons_main(argv)

    # The reward stage trains on the static comparisons and the new ones together.
    # (groups are taken in file order, so max_train_groups keeps all new ones and the first 20 static ones)
    reward_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run),
            "--train_files",
            str(out),
            str(run / "world" / "comparisons_train.jsonl"),
            "--max_train_groups",
            str(len(records) + 20),
            "--max_steps",
            "2",
            "--max_val_groups",
            "8",
            "--norm_samples",
            "8",
            "--threads",
            "1",
        ]
    )
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["metrics"]["train_groups"] == len(records) + 20
    assert str(out) in manifest["data"]


def test_sample_refuses_without_sft_or_outside_the_world(sft_run, tmp_path, capsys):
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    _fails(capsys, ["sample", "--run_dir", str(orphan)], "sft", "make sft")
    run = new_run(tmp_path, sft_run)
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"prompt": "What is the capital of France?"}])
    _fails(
        capsys,
        ["sample", "--run_dir", str(run), "--prompts_file", str(foreign)],
        "foreign.jsonl",
        "line 1",
        "not part of the world",
    )
    assert not (run / "comparisons").exists()


def test_export_then_import_round_trip(tmp_path, capsys):
    source = write_jsonl(
        tmp_path / "policy.jsonl",
        [
            {
                "prompt": "Q1?",
                "responses": ["a1", "b1", "c1"],
                "ranking": [0, 1, 2],
                "gold_ranking": [0, 1, 2],
                "family": "fact",
            },
            {
                "prompt": [
                    {"role": "user", "content": "Q2?"},
                    {"role": "assistant", "content": "Eh?"},
                    {"role": "user", "content": "Q2 again?"},
                ],
                "responses": ["a2", "b2"],
                "ranking": [1, 0],
            },
        ],
    )
    to_rank = tmp_path / "to_rank.jsonl"
    comparisons_main(["export", "--run_dir", str(tmp_path), "--file", str(source), "--out", str(to_rank)])
    exported = read_jsonl(to_rank)
    assert [r["ranking"] for r in exported] == [[], []]
    assert all(set(r) == {"prompt", "responses", "ranking"} for r in exported)  # no labels or gold leak to the labeler
    assert exported[1]["prompt"][-1]["content"] == "Q2 again?"

    exported[0]["ranking"] = [2, 0, 1]  # a human ranks: c1 best, then a1, then b1
    exported[1]["ranking"] = [0, 1]
    ranked = write_jsonl(tmp_path / "ranked.jsonl", exported)
    final = tmp_path / "human.jsonl"
    comparisons_main(["import", "--file", str(ranked), "--out", str(final)])
    groups = load_groups([str(final)])
    assert groups[0].responses == ["c1", "a1", "b1"] and groups[1].responses == ["a2", "b2"]
    assert "2 ranked groups" in capsys.readouterr().out


def test_import_rejects_malformed_rankings_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    good = {"prompt": "Q?", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]}
    cases = {
        "unranked.jsonl": ([good, {**good, "ranking": []}], ["line 2", "'ranking'", "is empty"]),
        "perm.jsonl": ([{**good, "ranking": [1, 1, 2]}], ["line 1", "'ranking'", "permutation"]),
        "range.jsonl": ([{**good, "ranking": [0, 1, 3]}], ["line 1", "'ranking'", "permutation"]),
        "k1.jsonl": ([{"prompt": "Q?", "responses": ["a"], "ranking": [0]}], ["line 1", "'responses'", "K >= 2"]),
        "dup.jsonl": ([{**good, "responses": ["a", "b", "a "]}], ["line 1", "same response twice"]),
        "noresp.jsonl": ([{"prompt": "Q?", "ranking": [0, 1]}], ["line 1", "'responses'"]),
    }
    for name, (records, expected) in cases.items():
        path = write_jsonl(tmp_path / name, records)
        _fails(capsys, ["import", "--file", str(path), "--out", str(out)], name, *expected)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{oops\n")
    _fails(capsys, ["import", "--file", str(bad_json), "--out", str(out)], "bad.jsonl", "line 2", "not valid JSON")
    _fails(capsys, ["import", "--file", str(tmp_path / "perm.jsonl")], "--out")
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*")), "nothing may be written for bad input"
