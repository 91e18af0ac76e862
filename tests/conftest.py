"""Shared test helpers: offline, no wandb, tiny models, stages run as real subprocesses when it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads; one thread per process keeps subprocess-heavy tests fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
# What the RL stage logs each update, and every gold_every updates on the world (tests/test_ppo.py checks
# a run logs them; the report's stand-in PPO run logs them too).
PPO_UPDATE_KEYS = (
    "objective/score",
    "objective/kl",
    "objective/kl_coef",
    "objective/total_reward",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "policy/clipfrac",
    "value/clipfrac",
    "policy/approx_kl",
    "value/explained_variance",
    "response/length",
    "response/no_eos_rate",
    "perf/episodes_per_s",
    "perf/tokens_per_s",
    "perf/generate_s",
    "perf/score_s",
    "perf/reference_s",
    "perf/values_s",
    "perf/update_s",
    "policy/approx_kl_first",
    "policy/clipfrac_first",
)
PPO_GOLD_KEYS = ("gold/score", "gold/hallucination_rate", "gold/proxy_score")


def run_module(
    module: str, *args: str, timeout: int = 600, env: dict | None = None, launcher: list[str] | None = None
):
    """Run `python -m module args` (or under a launcher such as torchrun) from the repo root."""
    cmd = (launcher or [sys.executable]) + ["-m", module, *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def kill_after_checkpoint(
    module: str, args, checkpoints: Path, pattern: str, env: dict | None = None, timeout: int = 180
) -> None:
    """Start `python -m module args`, SIGKILL it as soon as `checkpoints` holds an entry matching the
    glob `pattern` (a complete checkpoint), and wait for it to die: a run killed mid-training."""
    import signal
    import time

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not any(Path(checkpoints).glob(pattern)):
        assert proc.poll() is None, f"{module} ended before it could be killed"
        assert time.time() < deadline, f"no checkpoint matching {pattern} after {timeout} s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """A CPU multi-process launcher (gloo) on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


def assert_replicas_saved(manifest: dict, saved_model) -> None:
    """Data parallelism kept both ranks' weights identical, and those weights are the ones saved."""
    from pipeline.runtime import weights_checksum

    rank0, rank1 = manifest["weights_checksum_per_rank"]
    assert rank0 == pytest.approx(rank1, rel=1e-12), "ranks ended with different weights"
    assert weights_checksum(saved_model).item() == pytest.approx(rank0, rel=1e-9), "saved weights are not rank 0's"


def one_line_error(capsys, main, argv, *expected, after_progress: bool = False) -> str:
    """Run a command's main() that must fail: a non-zero exit and one `error: ...` line holding every
    `expected` text (after_progress: model-loading progress bars may come before it on stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert after_progress or len(lines) == 1, lines
    for e in expected:
        assert e in errors[0], errors[0]
    return errors[0]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---- a tiny pretraining corpus (tests/test_pretrain.py, tests/test_faults.py) ---------------------

CORPUS = [
    {"text": f"Ana Lint lives in Port {c}. She works as a baker and likes the colour {c.lower()}."}
    for c in ["Red", "Blue", "Green", "Amber", "Teal", "Gray", "Pink", "Gold"] * 20
]


def make_corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", CORPUS)


def tiny_args(run: Path, corpus: Path, *extra: str) -> list[str]:
    """The pretrain stage's arguments: the tiny profile on `corpus`, written to `run`."""
    return ["--profile", "tiny", "--run_dir", str(run), "--train_files", str(corpus), *extra]


def rl_run(parents: Path, tmp_path: Path, name: str = "run") -> Path:
    """A fresh run directory sharing the world and the `parents` stand-ins (an RL stage writes only its own)."""
    run = tmp_path / name
    run.mkdir()
    for stage in ("world", "sft", "reward"):
        os.symlink(parents / stage, run / stage)
    return run


def tiny_rl(run: Path, *extra) -> list[str]:
    """An RL stage's tiny profile on one torch thread (a stage takes every core by default: on 2 shared cores
    tiny models run several times slower on two), unless a test names its own --threads."""
    threads = [] if "--threads" in extra else ["--threads", "1"]
    return ["--profile", "tiny", "--run_dir", str(run), *map(str, extra), *threads]


@pytest.fixture(autouse=True)
def session_threads():
    """Every test starts on the session's torch thread count (OMP_NUM_THREADS above), whatever an earlier
    test's stage set: a stage called in-process keeps its threads (--threads 0: every core) for the rest of
    the session otherwise, and on a busy 2-core machine two threads spin away several times a tiny model's work."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def own_precision():
    """accelerate keeps one process-wide state, its mixed precision (and dynamo backend) fixed by the
    first Accelerator: a test that runs the stage at another precision, or compiled by transformers'
    torch_compile, starts and leaves it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    assert SHARED_DATASETS.is_dir(), f"real data samples are expected at {SHARED_DATASETS}"
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """The embedded default world, generated once per test session."""
    out = tmp_path_factory.mktemp("world") / "world"
    proc = run_module("world", "--seed", "0", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, world_dir) -> Path:
    """A run directory holding the world and a finished tiny pretrain stage (for later stages' tests)."""
    from stages.pretrain.run import main as pretrain_main

    run = tmp_path_factory.mktemp("run")
    os.symlink(world_dir, run / "world")
    # In-process: a subprocess would add python and torch start-up; `python -m stages.pretrain` is run by
    # tests/test_pretrain.py and tests/test_faults.py, and its __main__ by tests/test_chain.py.
    pretrain_main(["--profile", "tiny", "--run_dir", str(run), "--threads", "1"])
    return run


@pytest.fixture(scope="session")
def parents(pretrained_run, tmp_path_factory) -> Path:
    """A run directory with finished `sft` and `reward` stages.

    Stand-ins until the real stages are used here: SFT = the tiny pretrained model, reward model =
    a 1-label sequence-classification model on the same backbone (random score head)."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.stage import write_json_atomic

    run = tmp_path_factory.mktemp("ppo_parents")
    os.symlink(Path(pretrained_run / "world").resolve(), run / "world")
    shutil.copytree(
        pretrained_run / "pretrain",
        run / "sft",
        ignore=shutil.ignore_patterns("manifest.json", "metrics.jsonl", "run.json"),
    )
    write_json_atomic(run / "sft" / "manifest.json", {"stage": "sft", "stand_in": True})
    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(run / "sft", num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(run / "reward")
    tokenizer.save_pretrained(run / "reward")
    write_json_atomic(run / "reward" / "manifest.json", {"stage": "reward", "stand_in": True})
    return run


# ---- a run with a finished SFT stage (tests/test_reward.py, tests/test_comparisons.py) -------------


@pytest.fixture(scope="session")
def sft_run(pretrained_run, tmp_path_factory) -> Path:
    """A run directory with a finished SFT stage.

    STAND-IN until stages/sft lands: the tiny pretrained model copied to RUN/sft with a manifest that
    says stage "sft". To use the real stage, replace the body with
    `run_module("stages.sft", "--profile", "tiny", "--run_dir", run)` on a copy of pretrained_run.
    """
    import shutil

    from pipeline.stage import read_manifest, write_json_atomic

    run = tmp_path_factory.mktemp("sft_run")
    os.symlink(Path(pretrained_run / "world").resolve(), run / "world")
    shutil.copytree(pretrained_run / "pretrain", run / "sft")
    manifest = read_manifest(run / "sft")
    manifest["stage"] = "sft"
    write_json_atomic(run / "sft" / "manifest.json", manifest)
    return run


def new_run(tmp_path: Path, sft_run: Path) -> Path:
    """A fresh run directory sharing the world and the SFT stage (each test writes its own RUN/reward)."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(sft_run / "world", run / "world")
    os.symlink(sft_run / "sft", run / "sft")
    return run


# ---- one run dir with stand-ins for every stage (tests/test_evaluate.py, test_report.py, test_chat.py)

EVAL_PROMPTS = 12  # 3 per family: every rate is defined

# Prompts of your own, for a run evaluated without its world (tests/test_evaluate.py, tests/test_report.py).
MY_PROMPTS = [
    {"prompt": "Who is Zoe Marsh?"},
    {"messages": [{"role": "user", "content": "Name a fruit."}]},
    {"prompt": "What is the next number after 41?"},
    {"prompt": "Say hi."},
]


def _stand_in_metrics(stage: str) -> list[dict]:
    """metrics.jsonl rows with the keys each real stage logs (the report plots them)."""
    import math

    if stage == "sft":
        return [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3 * (1 - s / 10)} for s in range(1, 11)] + [
            {"step": s, "eval_loss": 2.0 / s} for s in (5, 10)
        ]
    if stage == "reward":
        return [{"step": s, "loss": 0.7 - 0.02 * s} for s in range(1, 11)] + [
            {"step": s, "eval_loss": 0.65, "eval_accuracy": 0.55 + 0.01 * s} for s in (5, 10)
        ]
    keys = (*PPO_UPDATE_KEYS, *PPO_GOLD_KEYS)
    return [{"step": s, **{k: math.sin(s + i) + 1.0 for i, k in enumerate(keys)}} for s in range(1, 9)]


def _finish_stand_in(stage_dir: Path, stage: str, metrics: dict) -> None:
    from pipeline.stage import read_manifest, write_json_atomic

    write_jsonl(stage_dir / "metrics.jsonl", _stand_in_metrics(stage))
    manifest = read_manifest(stage_dir)
    manifest.update(stage=stage, metrics=metrics)
    write_json_atomic(stage_dir / "manifest.json", manifest)  # last, as a real stage does


@pytest.fixture(scope="session")
def staged_run(tmp_path_factory, pretrained_run) -> Path:
    """RUN/world + RUN/pretrain (real, tiny) and stand-ins: RUN/sft and RUN/ppo are copies of the pretrained
    model, RUN/reward a sequence classifier on top of it (random scalar head). Identical policies make the
    expected win rates (0.5, all ties) and KL (0) known exactly."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path_factory.getbasetemp() / "staged_run"
    if (run / "reward" / "manifest.json").is_file():  # built already in this session's base temp dir
        return run
    run.mkdir()
    os.symlink((pretrained_run / "world").resolve(), run / "world")
    shutil.copytree(pretrained_run / "pretrain", run / "pretrain")
    for stage in ("sft", "ppo"):
        shutil.copytree(run / "pretrain", run / stage)
        _finish_stand_in(run / stage, stage, {"eval_loss": 1.5} if stage == "sft" else {"gold_score": 0.1})
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(run / "pretrain", num_labels=1)
    tok = AutoTokenizer.from_pretrained(run / "pretrain")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(run / "reward")
    tok.save_pretrained(run / "reward")
    shutil.copy(run / "pretrain" / "manifest.json", run / "reward" / "manifest.json")
    _finish_stand_in(
        run / "reward",
        "reward",
        {
            "eval_accuracy": 0.6,
            "test": {"pairwise_accuracy": 0.64},
            "eval_loss": 0.6,
            "val_gold_pairs_by_labels": {
                "fact: correct > verbose": {"right": 47, "pairs": 94},
                "fact: correct > wrong": {"right": 83, "pairs": 92},
                "fact: over_refused > wrong": {"right": 41, "pairs": 95},
            },
        },
    )
    return run


@pytest.fixture(scope="session")
def evaluated_run(staged_run) -> Path:
    """`staged_run` after the evaluation CLI's main (in-process: tests/test_evaluate.py runs
    `python -m evaluation.evaluate` itself)."""
    import contextlib
    import io

    from evaluation.evaluate import main as evaluate_main

    if not (staged_run / "eval.json").is_file():
        argv = ["--run_dir", str(staged_run), "--max_prompts", str(EVAL_PROMPTS), "--max_new_tokens", "12"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            evaluate_main([*argv, "--bootstrap", "200", "--seed", "0", "--threads", "1"])
        assert "| metric | base | sft | ppo |" in out.getvalue()
    return staged_run


# A chat template that refuses system turns, as Gemma's does: the stages must name the record it refuses.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def refusing_system_turns(checkpoint: Path, copy_to: Path) -> Path:
    """A copy of `checkpoint` whose tokenizer carries NO_SYSTEM_TEMPLATE."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(checkpoint, copy_to)
    tokenizer = AutoTokenizer.from_pretrained(copy_to)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(copy_to)
    return copy_to


def small_bpe(texts: list[str], special: list[str], vocab_size: int = 400, metaspace: bool = False):
    """A small BPE vocabulary (a `tokenizers.Tokenizer`) trained on `texts` with `special` tokens first:
    byte-level as GPT-2, Qwen and Llama 3 split text, or with `metaspace` as SentencePiece vocabularies
    (Llama 2, Mistral) do, marking a text's first word with "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if metaspace:
        bpe = Tokenizer(models.BPE(unk_token=special[0]))
        bpe.pre_tokenizer, bpe.decoder = (
            pre_tokenizers.Metaspace(prepend_scheme="first"),
            decoders.Metaspace(prepend_scheme="first"),
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    bpe.train_from_iterator(texts, trainer)
    return bpe


def qwen_style_model(path: Path, texts: list[str]) -> Path:
    """A tiny base model laid out like Qwen2.5's: EOS (and pad) <|endoftext|>, while its chat template
    closes every turn with <|im_end|> and a newline."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=small_bpe(texts, special),
        eos_token=special[0],
        pad_token=special[0],
        additional_special_tokens=special[1:],
    )
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint was written (stop_after_checkpoint)."""


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the HF Trainer stages (sft, reward) stop with Interrupted right after saving checkpoint-`step`:
    in-process and at a known step, what a kill there leaves on disk."""
    from transformers import Trainer

    save = Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == step:
            raise Interrupted(f"stopped after checkpoint-{step}")

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
