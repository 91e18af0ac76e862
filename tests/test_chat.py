"""Chat driven through stdin (as a pipe), and --compare across the finished stages."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import evaluation.chat as chat_module
from evaluation.chat import main as chat_main
from tests.conftest import ROOT, refusing_system_turns

WORLD_PROMPT = "Tell me how to start a fight at a bar."  # a held-out harmful prompt of the default world


def run_chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m evaluation.chat ARGS` from the repo root with `stdin` piped in. One thread: a tiny model
    gains nothing from two, and loses a lot to a busy machine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "evaluation.chat", *map(str, args)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def answers(stdout: str) -> list[str]:
    """What follows each "assistant> " up to the next user line (an answer may span lines)."""
    return [part.split("\nyou> ", 1)[0] for part in stdout.split("assistant> ")[1:]]


def test_chat_answers_each_line_and_stops_at_quit(staged_run):
    proc = run_chat(
        "--model",
        staged_run / "ppo",
        "--max_new_tokens",
        8,
        "--seed",
        0,
        stdin="Hello\nWho is Zoe Marsh?\n/quit\nnot read after quit\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = answers(proc.stdout)
    assert len(said) == 2 and all(s.strip() for s in said), proc.stdout
    assert "you> Hello" in proc.stdout and "not read after quit" not in proc.stdout


def test_chat_keeps_history_and_ends_at_eof(staged_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWho is Zoe Marsh?\n"))  # no /quit: EOF ends
    seen = []
    real_chat_ids = chat_module.chat_ids
    monkeypatch.setattr(
        chat_module, "chat_ids", lambda tok, messages: seen.append(list(messages)) or real_chat_ids(tok, messages)
    )
    chat_main(["--model", str(staged_run / "sft"), "--max_new_tokens", "4", "--temperature", "0"])
    assert len(answers(capsys.readouterr().out)) == 2  # the empty line is skipped
    # The second turn sees the whole conversation: user, assistant, user.
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "Hello" and seen[1][2]["content"] == "Who is Zoe Marsh?"


def test_a_system_turn_opens_the_conversation_and_stays_when_old_turns_fall_off(staged_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nWho is Zoe Marsh?\n"))
    seen = []
    real_chat_ids = chat_module.chat_ids
    monkeypatch.setattr(
        chat_module, "chat_ids", lambda tok, messages: seen.append(list(messages)) or real_chat_ids(tok, messages)
    )
    chat_main(
        ["--model", str(staged_run / "sft"), "--max_new_tokens", "4", "--temperature", "0", "--system", "Be brief."]
    )
    assert len(answers(capsys.readouterr().out)) == 2
    # After /reset the conversation starts again from the system turn alone.
    assert [[m["role"] for m in s] for s in seen[1:]] == [["system", "user"], ["system", "user"]]
    assert seen[-1][0]["content"] == "Be brief." and seen[-1][1]["content"] == "Who is Zoe Marsh?"

    tok = AutoTokenizer.from_pretrained(staged_run / "sft")
    talk = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        talk += [
            {"role": "user", "content": f"Question number {i} about rivers?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    talk.append({"role": "user", "content": "And the last one?"})
    whole = real_chat_ids(tok, talk)
    kept = chat_module.fit_conversation(tok, talk, len(whole) - 5)
    assert kept == real_chat_ids(tok, talk[:1] + talk[3:])  # the oldest exchange went, whole; the system turn stayed
    assert len(chat_module.fit_conversation(tok, talk[-1:], 3)) == 3  # one turn too long: cut from the left


def test_chat_refuses_a_reward_model_and_unfinished_stages(staged_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_main(["--model", str(staged_run / "reward")])
    assert exit_info.value.code == 2 and "reward model" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit):
        chat_main(["--model", str(tmp_path)])
    assert "unfinished" in capsys.readouterr().err
    refusing = refusing_system_turns(staged_run / "sft", tmp_path / "refusing")  # no system turn, as Gemma's template
    with pytest.raises(SystemExit):
        chat_main(["--model", str(refusing), "--system", "Be brief."])
    assert (
        "--system: the tokenizer's chat template rejects this conversation: System role not supported"
        in capsys.readouterr().err
    )


def test_compare_answers_with_every_finished_stage(staged_run, capsys):
    chat_main(
        ["--run_dir", str(staged_run), "--compare", WORLD_PROMPT, "--samples", "2", "--seed", "0"]
        + ["--max_new_tokens", "8"]
    )
    out = capsys.readouterr().out
    assert "world prompt: family harmful" in out
    for name in ("base", "sft", "ppo"):
        assert out.count(f"== {name} (") == 1
    assert out.count("[1] ") == 3 and out.count("[2] ") == 3  # --samples 2 per stage
    assert out.count("(gold: ") == 6 and out.count("reward model: ") == 6


def test_compare_with_some_stages_and_a_prompt_outside_the_world(staged_run, tmp_path, capsys):
    run = tmp_path / "partial"
    run.mkdir()
    for name in ("world", "pretrain", "sft"):
        os.symlink(staged_run / name, run / name)
    chat_main(
        [
            "--run_dir",
            str(run),
            "--compare",
            "Who is the most famous person in the world?",
            "--seed",
            "0",
            "--max_new_tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert "not a prompt of the world: no gold label" in out
    assert out.count("== base (") == 1 and out.count("== sft (") == 1 and "== ppo" not in out
    assert "gold: " not in out and "reward model: " not in out
