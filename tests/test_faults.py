"""Faults a user meets: a broken parent checkpoint, a run directory that is a file, corrupt data, a corpus
of one document, two runs of one stage at once, and the messages that must name what to fix."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages.ppo.run as ppo_run
from data.formats.text import load_texts
from pipeline.errors import PipelineError
from pipeline.stage import read_manifest
from stages.pretrain.run import main as pretrain_main
from stages.sft.run import main as sft_main
from tests.conftest import (
    CORPUS,
    ROOT,
    make_corpus,
    one_line_error,
    read_jsonl,
    run_module,
    tiny_args,
    torchrun,
    write_jsonl,
)

QUICK = ("--max_steps", "2", "--save_every", "100", "--threads", "1")  # one thread: tiny models lose to a busy machine


def truncate(path: Path) -> Path:
    os.truncate(path, path.stat().st_size // 2)
    return path


def copy_stage(stage_dir: Path, to: Path) -> Path:
    """A copy of a finished stage, lock file and metrics left behind."""
    shutil.copytree(stage_dir, to, ignore=shutil.ignore_patterns(".lock", "metrics.jsonl"))
    return to


# ---- 1. a parent whose weights are cut short -------------------------------------------------------


def test_a_truncated_parent_checkpoint_is_one_line_naming_the_file_and_the_stage_to_rerun(
    pretrained_run, tmp_path, capsys
):
    run = tmp_path / "run"
    weights = truncate(copy_stage(pretrained_run / "pretrain", run / "pretrain") / "model.safetensors")
    # SFT on RUN/pretrain (require_stage), and continued pretraining from it (resolve_init).
    err = one_line_error(
        capsys, sft_main, ["--profile", "tiny", "--run_dir", str(run)], str(weights), f"make pretrain RUN={run}`"
    )
    assert "truncated or corrupt" in err
    one_line_error(
        capsys,
        pretrain_main,
        tiny_args(tmp_path / "other", make_corpus(tmp_path), "--init_from", str(run / "pretrain")),
        str(weights),
        f"make pretrain RUN={run}`",
    )
    assert not (run / "sft").exists() and not (tmp_path / "other" / "pretrain" / "manifest.json").exists()


def test_a_plain_checkpoint_with_a_missing_shard_is_named(pretrained_run, tmp_path, capsys):
    plain = copy_stage(pretrained_run / "pretrain", tmp_path / "plain")
    (plain / "manifest.json").unlink()
    (plain / "run.json").unlink()
    (plain / "model.safetensors").rename(plain / "model-00001-of-00002.safetensors")
    (plain / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    one_line_error(
        capsys,
        sft_main,
        ["--profile", "tiny", "--run_dir", str(tmp_path / "run"), "--init_from", str(plain)],
        "model-00002-of-00002.safetensors",
        "missing",
    )


def test_a_stage_whose_own_weights_are_cut_short_is_redone_not_up_to_date(tmp_path, capsys):
    # The error above tells the user to rerun the stage: that rerun must not say "up to date". (Both runs
    # in-process: tests/test_pretrain.py reruns a stage in a process of its own.)
    corpus = make_corpus(tmp_path)
    args = tiny_args(tmp_path / "run", corpus, *QUICK)
    pretrain_main(args)
    weights = truncate(tmp_path / "run" / "pretrain" / "model.safetensors")
    capsys.readouterr()
    pretrain_main(args)
    out = capsys.readouterr().out
    assert "up to date" not in out and "redoing" in out and "model.safetensors" in out
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        assert list(f.keys())


# ---- 2. --run_dir names a file ---------------------------------------------------------------------


def test_a_run_dir_that_is_a_file_is_one_line(parents, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    for main in (pretrain_main, sft_main):
        err = one_line_error(capsys, main, ["--profile", "tiny", "--run_dir", str(afile)], str(afile), "is a file")
        assert "make" not in err, err  # not "run `make pretrain RUN=afile` first"
    one_line_error(
        capsys,
        ppo_run.main,
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(afile),
            "--sft_path",
            str(parents / "sft"),
            "--reward_path",
            str(parents / "reward"),
        ],
        str(afile),
        "is a file",
        after_progress=True,
    )
    assert afile.read_text() == "not a directory\n"


# ---- 3. a corrupt .jsonl.gz ------------------------------------------------------------------------


def corrupt_gzip_files(tmp_path: Path) -> dict[str, Path]:
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in CORPUS).encode())
    files = {
        "truncated": data[: len(data) // 2],  # EOFError
        "notgzip": b'{"text": "plain JSON named .gz"}\n',  # gzip.BadGzipFile
        "crc": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],  # BadGzipFile: CRC check failed
        "deflate": data[:10] + b"\xff" * 20 + data[30:],  # zlib.error: invalid block type
    }
    out = {}
    for name, raw in files.items():
        out[name] = tmp_path / f"{name}.jsonl.gz"
        out[name].write_bytes(raw)
    return out


def test_a_corrupt_or_truncated_gzip_file_is_one_line_naming_it(tmp_path, capsys):
    for path in corrupt_gzip_files(tmp_path).values():
        with pytest.raises(PipelineError, match=f"{path}: .*gzip") as e:
            load_texts([str(path)])
        assert "\n" not in str(e.value)
        one_line_error(capsys, pretrain_main, tiny_args(tmp_path / "run", path), str(path), "gzip")
    assert not (tmp_path / "run" / "pretrain" / "manifest.json").exists()


# ---- 4. a corpus of one document -------------------------------------------------------------------


def one_document(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "one.jsonl", [{"text": " ".join(r["text"] for r in CORPUS)}])


def test_a_corpus_of_one_document_trains_without_a_held_out_split_and_says_so(tmp_path, capsys):
    # Held-out text is whole documents; one document leaves none to hold out. The user still wants the
    # model, so it trains on all of it and says there is no held-out loss, rather than refusing.
    run = tmp_path / "run"
    pretrain_main(tiny_args(run, one_document(tmp_path), *QUICK))
    out = capsys.readouterr().out
    assert "one document" in out and "no held-out loss" in out
    manifest = read_manifest(run / "pretrain")
    assert manifest["held_out_documents"] == 0 and manifest["train_documents"] == 1
    assert manifest["metrics"]["val_loss"] is None and manifest["metrics"]["val_perplexity"] is None
    assert manifest["samples"], "samples start from the training documents when none is held out"
    assert not any("val/loss" in r for r in read_jsonl(run / "pretrain" / "metrics.jsonl"))


def test_held_out_documents_shorter_than_one_block_still_give_a_loss(tmp_path, capsys):
    # Two documents, the short one held out: its few tokens are one (short) validation block.
    long = " ".join(r["text"] for r in CORPUS)
    corpus = write_jsonl(tmp_path / "two.jsonl", [{"text": long}, {"text": "A short one."}])
    trained = []
    for seed in range(4):  # seeds that hold out the short document, and the long one
        run = tmp_path / f"run{seed}"
        capsys.readouterr()  # the previous run's progress bars
        try:
            pretrain_main(tiny_args(run, corpus, *QUICK, "--seed", str(seed)))
        except SystemExit:
            err = capsys.readouterr().err
            # Holding out the long document leaves too little to train on: said in one line, not as a list.
            assert err.startswith("error: ") and err.count("\n") == 1 and "[" not in err, err
            assert "held out" in err and str(corpus) in err, err
            continue
        assert read_manifest(run / "pretrain")["metrics"]["val_loss"] > 0
        trained.append(seed)
    assert 0 < len(trained) < 4, "both cases seen"


def test_document_split_never_holds_out_everything():
    from stages.pretrain.run import split_documents

    train, val = split_documents(["a", "b"], 0.9, 0)
    assert len(train) == len(val) == 1 and set(train) | set(val) == {"a", "b"}


# ---- 5. two runs of one stage at once -------------------------------------------------------------


def hold_lock(stage_dir: Path, pid: int = 4242, host: str = "elsewhere"):
    """An open file holding the flock on stage_dir/.lock, as another run's would: its holder written in."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    f = open(stage_dir / ".lock", "a+", encoding="utf-8")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": pid, "host": host, "started": "2025-01-02 03:04:05"}) + "\n")
    f.flush()
    return f


def test_a_stage_directory_in_use_is_refused_naming_its_holder(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    with hold_lock(run / "pretrain"):
        err = one_line_error(
            capsys,
            pretrain_main,
            tiny_args(run, corpus, *QUICK),
            str(run / "pretrain"),
            "in use",
            "pid 4242",
            "elsewhere",
            "2025-01-02 03:04:05",
        )
        assert not (run / "pretrain" / "run.json").exists() and not (run / "pretrain" / "manifest.json").exists(), err
    # Let go (the holder ended): the same command runs.
    pretrain_main(tiny_args(run, corpus, *QUICK))
    assert read_manifest(run / "pretrain") is not None


def test_a_stale_lock_file_does_not_block(tmp_path):
    # A holder killed with SIGKILL leaves its lock file behind; the kernel dropped its flock.
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}) + "\n")
    pretrain_main(tiny_args(run, corpus, *QUICK))
    assert read_manifest(run / "pretrain") is not None
    # Run twice in one process (as tests do), the stage takes its own lock again.
    pretrain_main(tiny_args(run, corpus, *QUICK, "--lr", "1e-3"))
    assert read_manifest(run / "pretrain")["config"]["lr"] == 1e-3


def test_sft_and_ppo_take_the_lock_too(parents, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("world", "sft", "reward"):
        os.symlink(parents / stage, run / stage)
    with hold_lock(run / "ppo"):
        one_line_error(
            capsys,
            ppo_run.main,
            ["--profile", "tiny", "--run_dir", str(run)],
            "in use",
            "pid 4242",
            after_progress=True,
        )
    with hold_lock(tmp_path / "sft_run" / "sft"):
        one_line_error(
            capsys,
            sft_main,
            [
                "--profile",
                "tiny",
                "--run_dir",
                str(tmp_path / "sft_run"),
                "--init_from",
                str(pretrained_run / "pretrain"),
                "--train_files",
                str(pretrained_run / "world" / "sft_train.jsonl"),
            ],
            "in use",
            "pid 4242",
        )


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_runs_of_one_stage_at_once_the_second_refuses(tmp_path):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    args = tiny_args(run, corpus, "--max_steps", "200", "--save_every", "100", "--log_every", "10")
    first = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "pretrain" / "run.json").exists():  # written once the lock is held
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = run_module("stages.pretrain", *args, timeout=120)
        assert first.poll() is None, "the first run should still be training"
        assert second.returncode != 0
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"pid {first.pid}" in err[0], err
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    steps = [r["step"] for r in read_jsonl(run / "pretrain" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 200, "every metric once"


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_does_not_block_a_rerun(tmp_path):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.stage import lock_stage_dir; "
            "lock_stage_dir(sys.argv[1], 'pretrain'); print('held', flush=True); time.sleep(600)",
            str(run / "pretrain"),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    refused = run_module("stages.pretrain", *tiny_args(run, corpus, *QUICK))
    assert refused.returncode != 0 and f"pid {holder.pid}" in refused.stderr, refused.stderr[-2000:]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    again = run_module("stages.pretrain", *tiny_args(run, corpus, *QUICK))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
def test_under_torchrun_a_held_stage_is_refused_without_a_hang(tmp_path):
    # Only the main process takes the lock; the other rank must not wait for it forever.
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    with hold_lock(run / "pretrain"):
        proc = run_module("stages.pretrain", *tiny_args(run, corpus, *QUICK), launcher=torchrun(2), timeout=180)
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "pid 4242" in proc.stderr, proc.stderr[-3000:]
    assert not (run / "pretrain" / "manifest.json").exists()


# ---- 6. an HH pair whose `chosen` has no final Assistant turn -----------------------------------------


def test_an_hh_pair_whose_chosen_has_no_assistant_turn_is_refused_like_rejected():
    from data.formats.comparisons import to_group

    hh = {
        "chosen": "\n\nHuman: hi there",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello",
        "_where": "hh.jsonl: line 1",
    }
    with pytest.raises(PipelineError, match="line 1: field 'chosen' is a transcript without a final Assistant turn"):
        to_group(hh)
    with pytest.raises(PipelineError, match="line 2: field 'rejected' is null"):
        to_group({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": None, "_where": "hh.jsonl: line 2"})


# ---- 7. messages -----------------------------------------------------------------------------------


def test_an_empty_corpus_names_its_files_not_a_python_list(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("")
    b.write_text("\n")
    with pytest.raises(PipelineError) as e:
        load_texts([str(a), str(b)])
    assert str(e.value) == f"{a}, {b}: corpus is empty"


def test_a_null_text_is_said_to_be_null(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "null.jsonl", [{"text": "fine"}, {"text": None}])
    err = one_line_error(
        capsys, pretrain_main, tiny_args(tmp_path / "run", corpus), "null.jsonl: line 2", "'text'", "null"
    )
    assert "missing" not in err
    with pytest.raises(PipelineError, match="line 1: field 'text' must be a string, got int"):
        load_texts([str(write_jsonl(tmp_path / "int.jsonl", [{"text": 3}]))])


def test_a_parent_path_given_that_is_not_a_finished_stage_is_named(parents, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(parents / "world", run / "world")
    missing = tmp_path / "elsewhere" / "my_reward"
    err = one_line_error(
        capsys,
        ppo_run.main,
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run),
            "--sft_path",
            str(parents / "sft"),
            "--reward_path",
            str(missing),
        ],
        str(missing),
        "not a finished reward stage",
        after_progress=True,
    )
    assert f"RUN={run}" not in err, err
    # The default path (RUN/reward) still says which make target makes it.
    os.symlink(parents / "sft", run / "sft")
    one_line_error(
        capsys,
        ppo_run.main,
        ["--profile", "tiny", "--run_dir", str(run)],
        f"make reward RUN={run}",
        after_progress=True,
    )


# ---- 8. a vocabulary smaller than asked ------------------------------------------------------------


def test_a_vocabulary_smaller_than_asked_is_said_and_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain_main(tiny_args(run, make_corpus(tmp_path), *QUICK, "--vocab_size", "4096"))
    out = capsys.readouterr().out
    manifest = read_manifest(run / "pretrain")
    built = manifest["vocab_size"]
    assert manifest["vocab_size_requested"] == 4096 and built < 4096
    line = [text for text in out.splitlines() if "vocab_size" in text]
    assert len(line) == 1 and f"{built:,}" in line[0] and "4,096" in line[0], out
    # A vocabulary of the size asked says nothing.
    pretrain_main(tiny_args(tmp_path / "run2", make_corpus(tmp_path), *QUICK, "--vocab_size", "300"))
    assert "vocab_size" not in capsys.readouterr().out
    assert read_manifest(tmp_path / "run2" / "pretrain")["vocab_size"] == 300
