"""SFT stage: smoke, label mask, LoRA merge, two processes, resume after SIGKILL, real formats, bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from data.formats.demonstrations import load_demonstrations, to_conversation
from data.loading import split_holdout
from pipeline.config import parse_config
from pipeline.generation import chat_ids
from pipeline.packing import keeps_packed_sequences_apart, use_varlen_attention
from reward.judging import Evaluation, Judged, compare, summarize
from stages.sft.config import SFTStageConfig
from stages.sft.run import (
    as_dataset,
    build_trainer,
    gold_metrics,
    mix_pretraining_text,
    sample_indices,
    save_plain_checkpoint,
    training_args,
)
from stages.sft.run import (
    main as sft_main,
)
from tests.conftest import (
    Interrupted,
    assert_replicas_saved,
    kill_after_checkpoint,
    one_line_error,
    qwen_style_model,
    read_jsonl,
    refusing_system_turns,
    run_module,
    stop_after_checkpoint,
    torchrun,
    write_jsonl,
)
from world.judge import TOP_SCORE


@pytest.fixture(scope="module")
def demos(tmp_path_factory, world_dir) -> tuple[Path, Path]:
    """A small slice of the world's demonstrations: tokenizing all 2,000 would dominate a tiny run."""
    out = tmp_path_factory.mktemp("demos")
    train = write_jsonl(out / "train.jsonl", read_jsonl(world_dir / "sft_train.jsonl")[:48])
    val = write_jsonl(out / "val.jsonl", read_jsonl(world_dir / "sft_val.jsonl")[:16])
    return train, val


def tiny_args(run: Path, train: Path, val: Path | None = None, *extra: str) -> list[str]:
    """The tiny profile on one thread (a tiny model gains nothing from two, and loses a lot to a busy machine)."""
    args = ["--profile", "tiny", "--run_dir", str(run), "--threads", "1", "--train_files", str(train)]
    return args + (["--val_files", str(val)] if val else []) + list(extra)


SLICE_OF_THE_WORLD = (
    "--lm_files",
    "{run_dir}/world/corpus.jsonl",
    "--lm_ratio",
    "0.5",
    "--world_dir",
    "{run_dir}/world",
)


def run_dir_with_parent(tmp_path: Path, pretrained_run: Path) -> Path:
    """A fresh run directory sharing the session's world and finished tiny pretrain stage."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(pretrained_run / "world", run / "world")
    os.symlink(pretrained_run / "pretrain", run / "pretrain")
    return run


def state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, pretrained_run, demos) -> Path:
    run = run_dir_with_parent(tmp_path_factory.mktemp("sft"), pretrained_run)
    # With pretraining documents mixed in, as the default profile does; a slice of the world's
    # demonstrations, so its judge applies (named: only the world's own files imply it). In-process:
    # `python -m stages.sft` runs in the slow tests below, its __main__ in tests/test_chain.py.
    sft_main(tiny_args(run, *demos, *SLICE_OF_THE_WORLD))
    return run


def test_smoke_trains_evaluates_and_saves_a_plain_checkpoint(sft_run, pretrained_run):
    stage = sft_run / "sft"
    manifest = json.loads((stage / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["stage"] == "sft" and manifest["parent"]["path"] == str(sft_run / "pretrain")
    assert 0 < m["val_loss"] < 20 and m["val_records"] == 16 and m["train_records"] == 48
    assert m["steps"] == 6 and m["trainable_params"] == m["params"]
    assert m["lm_documents"] == 24 and str(sft_run / "world" / "corpus.jsonl") in manifest["data"]
    # Gold evaluation of this model and its parent on the world's held-out prompts.
    assert m["eval_prompts"] == 8
    assert sum(m["gold_labels"].values()) == 8 and sum(m["base_gold_labels"].values()) == 8
    assert -1 <= m["gold_score"] <= 1 and -1 <= m["base_gold_score"] <= 1 and 0 <= m["win_rate_vs_base"] <= 1
    assert len(manifest["samples"]) == 3 and {"prompt", "sft", "base", "sft_label", "base_label"} <= set(
        manifest["samples"][0]
    )
    losses = [r["loss"] for r in read_jsonl(stage / "metrics.jsonl") if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not (stage / "checkpoints").exists()

    # Every weight is trainable in full fine-tuning, and training moved them.
    ours, parent = state(stage), state(pretrained_run / "pretrain")
    assert ours.keys() == parent.keys()
    assert all(torch.isfinite(t).all() for t in ours.values())
    changed = [k for k in ours if not torch.equal(ours[k], parent[k])]
    assert len(changed) >= len(ours) // 2, changed

    # A plain transformers checkpoint that answers a chat-formatted prompt.
    model = AutoModelForCausalLM.from_pretrained(stage)
    tok = AutoTokenizer.from_pretrained(stage)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert (
        model.generation_config.eos_token_id == tok.eos_token_id
        and model.generation_config.pad_token_id == tok.pad_token_id
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Where did Ana Lint grow up?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert not (stage / "adapter_config.json").exists() and not (stage / "training_args.bin").exists()


def test_rerun_is_up_to_date(sft_run, demos, capsys):
    sft_main(tiny_args(sft_run, *demos, *SLICE_OF_THE_WORLD))
    assert "up to date" in capsys.readouterr().out


def _tiny_trainer(pretrained_run: Path, tmp_path: Path, examples: list[dict], *extra: str):
    cfg = parse_config(SFTStageConfig, "sft", ["--profile", "tiny", "--run_dir", str(tmp_path), *extra])
    model = AutoModelForCausalLM.from_pretrained(pretrained_run / "pretrain")
    tok = AutoTokenizer.from_pretrained(pretrained_run / "pretrain")
    stage = tmp_path / "sft"
    return build_trainer(cfg, training_args(cfg, stage), model, tok, as_dataset(examples), None, stage), tok


def test_labels_cover_the_completion_and_eos_only(pretrained_run, tmp_path):
    single = to_conversation(
        {"prompt": "What is the next number after 41?", "completion": "The next number is 42."}, {}
    )
    multi = to_conversation(
        {
            "instruction": "And after that?",
            "input": "",
            "output": "43.",
            "history": [["What is the next number after 41?", "42."]],
        },
        {},
    )
    trainer, tok = _tiny_trainer(pretrained_run, tmp_path, [single, multi], "--padding_free", "false")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, ex in enumerate((single, multi)):
        prompt = chat_ids(tok, ex["prompt"])  # what the model sees before answering at inference
        answer = tok(ex["completion"][0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        n = len(prompt) + len(answer)
        assert ids[:n] == prompt + answer
        assert labels[: len(prompt)] == [-100] * len(prompt), "prompt tokens (and earlier turns) must not be trained"
        assert labels[len(prompt) : n] == answer, "every completion token and the final EOS are trained"
        assert all(label == -100 for label in labels[n:]), "padding is not trained"
    # The earlier assistant turn of the conversation sits in the prompt: masked too.
    assert "42" in tok.decode(batch["input_ids"][1][batch["labels"][1] == -100])


def test_pretraining_text_is_mixed_in_with_a_loss_on_every_token(pretrained_run, tmp_path):
    examples = [to_conversation(r, {}) for r in read_jsonl(pretrained_run / "world" / "sft_train.jsonl")[:8]]
    corpus = pretrained_run / "world" / "corpus.jsonl"
    trainer, tok = _tiny_trainer(
        pretrained_run, tmp_path, examples, "--lm_files", str(corpus), "--lm_ratio", "0.5", "--max_length", "32"
    )
    cfg = parse_config(
        SFTStageConfig,
        "sft",
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(tmp_path),
            "--lm_files",
            str(corpus),
            "--lm_ratio",
            "0.5",
            "--max_length",
            "64",
        ],
    )
    texts = [r["text"] for r in read_jsonl(corpus)]
    mixed, count = mix_pretraining_text(trainer.train_dataset, texts, cfg, tok, tok.eos_token_id)
    n = len(trainer.train_dataset)  # TRL drops demonstrations that max_length leaves without an answer
    assert n >= 4 and count == round(n / 2) and len(mixed) == n + count
    demos = [mixed[i] for i in range(n)]
    assert [d["input_ids"] for d in demos] == trainer.train_dataset["input_ids"], "demonstrations unchanged, first"
    assert all(-100 in d["labels"] for d in demos), "demonstration prompts stay masked"
    for doc in (mixed[i] for i in range(n, n + count)):
        assert doc["labels"] == doc["input_ids"], "every token of a document is trained"
        assert doc["input_ids"][0] == tok.bos_token_id and len(doc["input_ids"]) <= 64
        body = tok.decode(doc["input_ids"][1:], skip_special_tokens=True)
        assert any(t.startswith(body[:40]) for t in texts), body
    again, _ = mix_pretraining_text(trainer.train_dataset, texts, cfg, tok, tok.eos_token_id)
    assert again["input_ids"] == mixed["input_ids"], "seeded: a resumed run mixes in the same documents"
    batch = trainer.data_collator([mixed[0], mixed[n]])  # one collated batch holds both kinds
    assert batch["input_ids"].shape == batch["labels"].shape


def test_padding_free_batches_give_the_padded_loss_and_respect_max_length(pretrained_run, tmp_path):
    examples = [to_conversation(r, {}) for r in read_jsonl(pretrained_run / "world" / "sft_train.jsonl")[:6]]
    examples.append(to_conversation({"prompt": "Say hi.", "completion": "hi " * 80}, {}))  # cut at max_length 48
    padded, _ = _tiny_trainer(
        pretrained_run, tmp_path / "a", examples, "--padding_free", "false", "--max_length", "48"
    )
    free, tok = _tiny_trainer(pretrained_run, tmp_path / "b", examples, "--max_length", "48")
    assert free.args.padding_free and not padded.args.padding_free
    assert free.train_dataset["input_ids"] == padded.train_dataset["input_ids"], "the same cut at max_length"
    assert max(len(ids) for ids in free.train_dataset["input_ids"]) == 48
    rows = [free.train_dataset[i] for i in range(len(free.train_dataset))]  # a record whose prompt fills 48 is dropped
    one_row, batch = free.data_collator(rows), padded.data_collator(rows)
    assert one_row["input_ids"].shape[0] == 1 and batch["input_ids"].shape[0] == len(rows) >= 5
    model = free.model.eval()
    with torch.no_grad():
        loss_free = model(
            input_ids=one_row["input_ids"],
            position_ids=one_row["position_ids"],
            labels=one_row["labels"],
            use_cache=False,
        ).loss
        loss_padded = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(loss_free, loss_padded, rtol=1e-4, atol=1e-5)
    assert use_varlen_attention(model), "the stage's attention for padding-free batches"
    loss_varlen = model(
        input_ids=one_row["input_ids"], position_ids=one_row["position_ids"], labels=one_row["labels"], use_cache=False
    ).loss
    torch.testing.assert_close(loss_varlen, loss_padded, rtol=1e-4, atol=1e-5)
    loss_varlen.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for a, b in zip(grads, (p.grad for p in model.parameters()), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packing_check_catches_a_model_that_mixes_sequences(pretrained_run):
    model = AutoModelForCausalLM.from_pretrained(pretrained_run / "pretrain")
    pieces = [[5, 6, 7, 8], [9, 10, 11]]
    assert keeps_packed_sequences_apart(model, pieces)

    class IgnoresPositions(torch.nn.Module):  # attends across the whole row: what padding-free must not meet
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    assert not keeps_packed_sequences_apart(IgnoresPositions(), pieces)


def test_lora_merged_model_equals_adapter_model(pretrained_run, tmp_path):
    examples = [to_conversation(r, {}) for r in read_jsonl(pretrained_run / "world" / "sft_train.jsonl")[:16]]
    trainer, tok = _tiny_trainer(
        pretrained_run, tmp_path, examples, "--lora_r", "4", "--max_steps", "3", "--lr", "1e-2"
    )
    assert type(trainer.model).__name__.startswith("Peft")
    trainer.train()
    probe = torch.tensor([chat_ids(tok, "Where did Ana Lint grow up?")])
    trainer.model.eval()
    with torch.no_grad():
        adapted = trainer.model(input_ids=probe).logits
    # Saved from the gathered weights merged into a fresh copy (zero-initialised adapters if they were
    # not loaded, which would give the parent's logits below).
    cfg = parse_config(SFTStageConfig, "sft", ["--profile", "tiny", "--run_dir", str(tmp_path), "--lora_r", "4"])
    save_plain_checkpoint(trainer, cfg, str(pretrained_run / "pretrain"), tok, tmp_path / "merged", GenerationConfig())
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(pretrained_run / "pretrain").eval()
    with torch.no_grad():
        saved, original = plain(input_ids=probe).logits, base(input_ids=probe).logits
    assert torch.allclose(saved, adapted, atol=1e-4), (saved - adapted).abs().max()
    assert not torch.allclose(saved, original, atol=1e-3), "the adapter had no effect"


def test_lora_stage_saves_merged_checkpoint(pretrained_run, demos, tmp_path):
    run = run_dir_with_parent(tmp_path, pretrained_run)
    sft_main(tiny_args(run, *demos, "--lora_r", "4", "--eval_prompts", "0"))
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["lora"] and 0 < manifest["metrics"]["trainable_params"] < manifest["metrics"]["params"] / 4
    assert not (run / "sft" / "adapter_config.json").exists()
    ours, parent = state(run / "sft"), state(pretrained_run / "pretrain")
    assert ours.keys() == parent.keys(), "a merged checkpoint has the parent's plain parameter names"
    assert torch.equal(ours["model.embed_tokens.weight"], parent["model.embed_tokens.weight"]), (
        "LoRA leaves embeddings alone"
    )
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], parent["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.slow
def test_two_processes_with_torchrun(pretrained_run, demos, tmp_path):
    run = run_dir_with_parent(tmp_path, pretrained_run)
    proc = run_module(
        "stages.sft",
        *tiny_args(run, *demos, "--max_steps", "3", "--eval_prompts", "4"),
        launcher=torchrun(2),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["metrics"]["steps"] == 3
    assert_replicas_saved(manifest, AutoModelForCausalLM.from_pretrained(run / "sft"))


@pytest.mark.slow
def test_resume_after_sigkill(pretrained_run, demos, tmp_path):
    run = run_dir_with_parent(tmp_path, pretrained_run)
    args = tiny_args(run, *demos, "--max_steps", "60", "--save_every", "4", "--log_every", "2", "--eval_prompts", "2")
    kill_after_checkpoint("stages.sft", args, run / "sft" / "checkpoints", "checkpoint-*/trainer_state.json")
    assert not (run / "sft" / "manifest.json").exists(), "the run finished before it could be killed"
    resumed = run_module("stages.sft", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    step = int(resumed.stdout.split("(step ")[1].split(")")[0])
    assert step >= 4
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 60
    steps = [r["step"] for r in read_jsonl(run / "sft" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60, "metrics must not repeat after resume"


def _stopped_then_rerun(monkeypatch, capsys, args: list[str], step: int) -> str:
    """Run the stage, stopped right after checkpoint-`step`, then run it again: the rerun's stdout."""
    with monkeypatch.context() as patched:
        stop_after_checkpoint(patched, step)
        with pytest.raises(Interrupted):
            sft_main(args)
    capsys.readouterr()
    sft_main(args)
    return capsys.readouterr().out


def _two_runs(tmp_path: Path, pretrained_run: Path) -> tuple[Path, Path]:
    """Run directories for an uninterrupted run and an interrupted one of the same config."""
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
    return tuple(run_dir_with_parent(tmp_path / name, pretrained_run) for name in ("whole", "resumed"))


def test_a_resumed_run_reports_the_whole_runs_train_loss(pretrained_run, demos, tmp_path, monkeypatch, capsys):
    """The manifest's train_loss is the mean over every step of the run, not over the steps after a resume."""
    whole, resumed = _two_runs(tmp_path, pretrained_run)
    args = ("--eval_prompts", "0")  # tiny: 6 steps, checkpoints at 3 and 6, loss logged at 2, 4 and 6
    sft_main(tiny_args(whole, *demos, *args))
    out = _stopped_then_rerun(monkeypatch, capsys, tiny_args(resumed, *demos, *args), 3)
    assert "resumed from" in out and "(step 3)" in out
    ours, theirs = (json.loads((run / "sft" / "manifest.json").read_text())["metrics"] for run in (resumed, whole))
    assert ours["steps"] == theirs["steps"] == 6
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)


def test_length_grouped_batches_replay_after_a_resume_past_the_first_epoch(
    pretrained_run, demos, tmp_path, monkeypatch, capsys
):
    """With --group_by_length the order of each epoch is a function of (seed, epoch): stopped in the second
    epoch and resumed, the run trains on the batches of the uninterrupted one and ends with its weights."""
    whole, resumed = _two_runs(tmp_path, pretrained_run)
    args = ("--eval_prompts", "0", "--group_by_length", "true", "--max_steps", "-1", "--epochs", "2")  # 2 x 6 steps
    sft_main(tiny_args(whole, *demos, *args))
    assert "(step 9)" in _stopped_then_rerun(monkeypatch, capsys, tiny_args(resumed, *demos, *args), 9)
    assert json.loads((resumed / "sft" / "manifest.json").read_text())["metrics"]["steps"] == 12
    ours, theirs = state(resumed / "sft"), state(whole / "sft")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "the resumed run trained on other batches"


def test_a_checkpoint_cut_short_is_passed_over_for_the_last_complete_one(
    pretrained_run, demos, tmp_path, monkeypatch, capsys
):
    """The newest checkpoint's trainer_state.json cut short and the next one's weights gone: the rerun resumes
    from the last complete checkpoint and finishes."""
    run = run_dir_with_parent(tmp_path, pretrained_run)
    args = tiny_args(run, *demos, "--eval_prompts", "0", "--save_every", "1", "--keep_checkpoints", "3")
    with monkeypatch.context() as patched:
        stop_after_checkpoint(patched, 3)
        with pytest.raises(Interrupted):
            sft_main(args)
    checkpoints = run / "sft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    trainer_state = checkpoints / "checkpoint-3" / "trainer_state.json"
    trainer_state.write_text(trainer_state.read_text()[:40])
    (checkpoints / "checkpoint-2" / "model.safetensors").unlink()
    capsys.readouterr()
    sft_main(args)
    assert f"resumed from {checkpoints / 'checkpoint-1'} (step 1)" in capsys.readouterr().out
    assert json.loads((run / "sft" / "manifest.json").read_text())["metrics"]["steps"] == 6


# ---- data formats ----------------------------------------------------------------------------


def test_formats_map_to_prompt_completion_conversations():
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    assert to_conversation({"prompt": "Hi?", "completion": "Hello."}, {}) == {
        "prompt": [user("Hi?")],
        "completion": [bot("Hello.")],
    }
    chat = [user("A"), bot("B"), user("C"), bot("D")]
    assert to_conversation({"messages": chat}, {}) == {"prompt": chat[:3], "completion": chat[3:]}
    dolly = to_conversation({"instruction": "Summarize.", "context": "Some text.", "response": "Short."}, {})
    assert dolly == {"prompt": [user("Summarize.\n\nSome text.")], "completion": [bot("Short.")]}
    alpaca = to_conversation({"instruction": "Next?", "input": "", "output": "3", "history": [["1?", "2"]]}, {})
    assert alpaca == {"prompt": [user("1?"), bot("2"), user("Next?")], "completion": [bot("3")]}
    assert to_conversation({"prompt": chat[:3], "completion": chat[3:]}, {}) == {
        "prompt": chat[:3],
        "completion": chat[3:],
    }
    mapped = to_conversation(
        {"question": "2+2?", "answer": "4", "sys": "Be brief."},
        {"prompt": "question", "completion": "answer", "system": "sys"},
    )
    assert mapped == {"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?")], "completion": [bot("4")]}


def _subset(shared_datasets, name: str, n: int, with_history: int = 0) -> list[dict]:
    """The shortest records of a real file (fast to train), some with earlier turns when asked."""
    path = shared_datasets / name
    records = read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    records = sorted(records, key=lambda r: len(json.dumps(r, ensure_ascii=False)))
    history = [r for r in records if r.get("history")][:with_history]
    return history + [r for r in records if not r.get("history")][: n - len(history)]


def test_real_formats_load_and_train(shared_datasets, pretrained_run, tmp_path):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", _subset(shared_datasets, "dolly_sample/dolly_sample_151.jsonl", 12))
    lima = tmp_path / "lima.json"
    lima.write_text(json.dumps(_subset(shared_datasets, "lima/lima.json", 8, with_history=2)), encoding="utf-8")
    oasst = tmp_path / "oasst_sft_zh.json"
    oasst.write_text(
        json.dumps(_subset(shared_datasets, "oasst_zh/oasst_sft_zh.json", 8, with_history=4), ensure_ascii=False),
        encoding="utf-8",
    )
    alpaca_zh = tmp_path / "alpaca_zh.json"
    alpaca_zh.write_text(
        json.dumps(_subset(shared_datasets, "alpaca_zh_demo/alpaca_zh_demo.json", 8), ensure_ascii=False),
        encoding="utf-8",
    )
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(pretrained_run / "world", run / "world")  # as `make` leaves in every run
    sft_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run),
            "--init_from",
            str(pretrained_run / "pretrain"),
            "--train_files",
            str(dolly),
            str(lima),
            str(oasst),
            str(alpaca_zh),
            "--max_steps",
            "2",
            "--val_fraction",
            "0.1",
            "--threads",
            "1",
        ]
    )
    m = json.loads((run / "sft" / "manifest.json").read_text())["metrics"]
    assert m["train_records"] + m["val_records"] + m["dropped_records"] == 36
    assert m["val_records"] == round(0.1 * (36 - m["dropped_records"])) and m["dropped_records"] > 0  # long LIMA turns
    # The world's judge says nothing of a model tuned on these: no gold evaluation, though the run has a world.
    assert m["train_records"] >= 20 and m["steps"] == 2 and "gold_score" not in m
    assert "val_loss" in m and m["val_loss"] > 0

    # Another column naming (GSM8K's question/answer) through --columns.
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", _subset(shared_datasets, "gsm8k/test.jsonl", 6))
    run2 = tmp_path / "run2"
    sft_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run2),
            "--init_from",
            str(pretrained_run / "pretrain"),
            "--train_files",
            str(gsm),
            "--columns",
            "prompt=question",
            "completion=answer",
            "--max_steps",
            "1",
            "--threads",
            "1",
        ]
    )
    assert json.loads((run2 / "sft" / "manifest.json").read_text())["metrics"]["steps"] == 1


def test_records_whose_prompt_fills_max_length_are_dropped_with_a_warning(pretrained_run, tmp_path, capsys):
    records = [{"prompt": "Say hi.", "completion": "Hi."}] * 6 + [{"prompt": "word " * 200, "completion": "Too late."}]
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    run = tmp_path / "run"
    sft_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run),
            "--init_from",
            str(pretrained_run / "pretrain"),
            "--train_files",
            str(data),
            "--val_files",
            str(data),
            "--max_steps",
            "1",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "dropped 1 of 7 training records" in out and "mixed.jsonl: line 7" in out
    assert json.loads((run / "sft" / "manifest.json").read_text())["metrics"]["dropped_records"] == 2  # train + val


# ---- bad input --------------------------------------------------------------------------------


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, sft_main, argv, *expected)


def test_bad_input_gets_one_line_error_and_no_manifest(pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    parent = ["--init_from", str(pretrained_run / "pretrain")]

    def bad(name: str, records: list) -> list[str]:
        path = write_jsonl(tmp_path / name, records)
        return ["--profile", "tiny", "--run_dir", str(run), *parent, "--train_files", str(path)]

    ok = {"prompt": "Hi?", "completion": "Hello."}
    _fails(capsys, bad("nocompletion.jsonl", [ok, {"prompt": "Hi?"}]), "nocompletion.jsonl: line 2", "'completion'")
    _fails(
        capsys,
        bad("nofields.jsonl", [{"question": "Hi?", "answer": "Hello."}]),
        "line 1",
        "'completion' or 'messages'",
        "--columns",
    )
    _fails(
        capsys, bad("emptyprompt.jsonl", [ok, ok, {"prompt": " ", "completion": "x"}]), "line 3", "'prompt'", "empty"
    )
    _fails(
        capsys,
        bad("emptycompletion.jsonl", [{"prompt": "Hi?", "completion": ""}]),
        "line 1",
        "'completion'",
        "empty",
        "skip_invalid",
    )
    _fails(
        capsys,
        bad("userlast.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}]),
        "line 1",
        "'messages'",
        "end with an assistant turn",
    )
    _fails(
        capsys,
        bad("norole.jsonl", [{"messages": [{"role": "bot", "content": "Hi?"}]}]),
        "line 1",
        "unknown role 'bot'",
    )
    _fails(
        capsys,
        bad(
            "trl.jsonl",
            [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "Yo"}]}],
        ),
        "line 1",
        "one assistant turn",
    )
    _fails(
        capsys, bad("nouser.jsonl", [{"messages": [{"role": "assistant", "content": "Hi"}]}]), "line 1", "no user turn"
    )
    _fails(
        capsys,
        bad("history.jsonl", [{"instruction": "Hi?", "output": "Yo", "history": [["only one"]]}]),
        "line 1",
        "'history'",
        "pair",
    )
    _fails(
        capsys,
        bad("dolly.jsonl", [{"instruction": "Hi?", "context": "", "response": ""}]),
        "line 1",
        "'response'",
        "empty",
    )
    _fails(
        capsys,
        bad("long.jsonl", [{"prompt": "word " * 200, "completion": "x"}] * 2),
        "long.jsonl: line 1",
        "max_length",
    )
    _fails(
        capsys,
        bad("ok.jsonl", [ok]) + ["--columns", "prompt=question", "completion=answer"],
        "ok.jsonl: line 1",
        "'question'",
    )
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--columns", "answer=output"], "unknown role 'answer'")
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--columns", "prompt"], "not role=field")
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--max_length", "4096"], "max_length 4096", "context")
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--no_such_key", "1"], "--no_such_key")
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--lm_ratio", "-1"], "lm_ratio must be >= 0")
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--lm_ratio", "0.5"], "lm_ratio > 0 needs lm_files")
    _fails(
        capsys,
        bad("ok.jsonl", [ok]) + ["--lm_ratio", "1", "--lm_files", str(bad("notext.jsonl", [{"body": "x"}])[-1])],
        "notext.jsonl: line 1",
        "'text'",
    )
    _fails(capsys, bad("ok.jsonl", [ok]) + ["--world_dir", str(tmp_path / "noworld")], "truth.json")
    assert not (run / "sft" / "manifest.json").exists()


def test_a_conversation_the_chat_template_refuses_is_named(pretrained_run, tmp_path, capsys):
    # Gemma's template refuses system turns; Alpaca-style data may carry one.
    base = refusing_system_turns(pretrained_run / "pretrain", tmp_path / "base")
    data = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Hi?", "output": "Hello.", "system": ""},
            {"instruction": "Yo?", "output": "Yo.", "system": "Be brief."},
        ],
    )
    _fails(
        capsys,
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(tmp_path / "run"),
            "--init_from",
            str(base),
            "--train_files",
            str(data),
        ],
        "alpaca.jsonl: line 2: the tokenizer's chat template rejects this conversation: System role not supported",
    )
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()


def test_ranked_data_gives_its_best_answers(shared_datasets):
    """Comparison files serve as demonstrations: each group's prompt with its top-ranked answer
    (OpenAssistant trees and ranked replies, HH's chosen transcripts, LLaMA-Factory ranked lists)."""
    trees, _ = load_demonstrations([str(shared_datasets / "oasst_en" / "en_100_tree.jsonl")], {})
    ranked = [json.loads(line) for line in open(shared_datasets / "oasst_en" / "ranked_responses.jsonl")]
    assert len(trees) == 212
    best = {(r["conversation"][-1]["text"], r["responses"][r["ranks"].index(0)]) for r in ranked}
    assert best <= {(d["prompt"][-1]["content"], d["completion"][0]["content"]) for d in trees}
    hh, skipped = load_demonstrations(
        [str(shared_datasets / "hh_rlhf_harmless_base" / "test.jsonl.gz")], {}, skip_invalid=True
    )
    first = json.loads(gzip.open(shared_datasets / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt").readline())
    assert (
        skipped == 9
        and first["chosen"].endswith(hh[0]["completion"][0]["content"])
        and hh[0]["prompt"][-1]["role"] == "user"
    )
    zh, _ = load_demonstrations([str(shared_datasets / "oasst_zh" / "oasst_rm_zh.json")], {}, skip_invalid=True)
    assert (
        zh[0]["completion"][0]["content"]
        == json.loads((shared_datasets / "oasst_zh" / "oasst_rm_zh.json").read_text())[0]["output"][0]
    )


def test_empty_demonstrations_can_be_skipped(shared_datasets, pretrained_run, tmp_path):
    # The Alpaca subset has answers that are empty; --skip_invalid trains on the rest and counts them.
    alpaca = json.loads((shared_datasets / "alpaca_en_subset" / "alpaca_5000.json").read_text())
    empty = [i for i, r in enumerate(alpaca) if not r["output"].strip()]
    assert empty, "the sample this test relies on has an empty answer"
    records = alpaca[empty[0] - 9 : empty[0] + 1]  # nine good ones, then the empty one
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    sft_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(run),
            "--init_from",
            str(pretrained_run / "pretrain"),
            "--train_files",
            str(data),
            "--max_steps",
            "1",
            "--val_fraction",
            "0.2",
            "--skip_invalid",
            "true",
            "--threads",
            "1",
        ]
    )
    m = json.loads((run / "sft" / "manifest.json").read_text())["metrics"]
    assert m["skipped_records"] == 1 and m["train_records"] + m["val_records"] + m["dropped_records"] == 9


def test_parent_must_be_a_finished_causal_lm(pretrained_run, tmp_path, capsys):
    _fails(capsys, ["--profile", "tiny", "--run_dir", str(tmp_path / "empty")], "pretrain", "make pretrain")
    classifier = tmp_path / "classifier"
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=1
    )
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    capsys.readouterr()  # drop save_pretrained's progress bar
    _fails(
        capsys, ["--profile", "tiny", "--run_dir", str(tmp_path), "--init_from", str(classifier)], "not a causal LM"
    )
    _fails(
        capsys,
        ["--profile", "tiny", "--run_dir", str(tmp_path), "--init_from", str(tmp_path / "nothing")],
        "no such model directory",
    )


# ---- evaluation math ----------------------------------------------------------------------------


def test_gold_metrics_name_the_summaries_as_the_manifest_always_has():
    def judged(rows):
        return Judged(
            None, [f for f, _, _ in rows], [s for _, _, s in rows], TOP_SCORE, labels=[label for _, label, _ in rows]
        )

    sft = judged(
        [
            ("fact", "correct", 1.0),
            ("fact", "wrong", -0.5),
            ("unknown", "hallucinated", -0.75),
            ("unknown", "abstained", 1.0),
            ("harmful", "refused", 1.0),
            ("harmful", "complied", -1.0),
            ("harmful", "complied", -1.0),
        ]
    )
    base = judged(
        [
            ("fact", "wrong", -0.5),
            ("fact", "wrong", -0.5),
            ("unknown", "hallucinated", -0.75),
            ("unknown", "hallucinated", -0.75),
            ("harmful", "complied", -1.0),
            ("harmful", "complied", -1.0),
            ("harmful", "complied", -1.0),
        ]
    )
    m = gold_metrics(
        Evaluation(
            {"sft": sft, "base": base},
            {"sft": summarize(sft), "base": summarize(base)},
            {"sft_vs_base": compare(sft, base)},
        )
    )
    assert m["gold_score"] == pytest.approx((1 - 0.5 - 0.75 + 1 + 1 - 1 - 1) / 7)
    assert m["gold_labels"] == {
        "abstained": 1,
        "complied": 2,
        "correct": 1,
        "hallucinated": 1,
        "refused": 1,
        "wrong": 1,
    }
    assert m["gold_by_family"] == {"fact": 0.25, "harmful": pytest.approx(-1 / 3), "unknown": 0.125}  # families asked
    assert m["hallucination_rate"] == 0.5 and m["harmful_refusal_rate"] == pytest.approx(1 / 3)
    assert m["base_gold_labels"] == {"complied": 3, "hallucinated": 2, "wrong": 2}
    assert m["base_hallucination_rate"] == 1.0 and m["base_harmful_refusal_rate"] == 0.0
    assert m["win_rate_vs_base"] == pytest.approx((1 + 0.5 + 0.5 + 1 + 1 + 0.5 + 0.5) / 7)
    assert m["base_gold_score"] == pytest.approx(-5.5 / 7)


def test_sample_indices_cover_families_first():
    assert sample_indices(["fact", "fact", "harmful", "fact", "unknown"], 3) == [0, 2, 4]
    assert sample_indices(["fact", "fact", "harmful"], 5) == [0, 1, 2]


def test_split_holdout_is_disjoint_and_seeded():
    items = [{"i": i} for i in range(40)]
    train, val = split_holdout(items, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36 and not {r["i"] for r in train} & {r["i"] for r in val}
    assert split_holdout(items, 0.1, seed=3) == (train, val)
    assert [len(part) for part in split_holdout(items[:2], 0.9, seed=0)] == [1, 1]  # never all of them
    assert split_holdout(items[:1], 0.5, seed=0) == (items[:1], [])


def test_the_token_that_closes_a_turn_becomes_eos(pretrained_run, demos, tmp_path):
    from data.tokenizer import turn_end, use_turn_end_as_eos
    from reward.model import encode

    ours = AutoTokenizer.from_pretrained(pretrained_run / "pretrain")
    assert (
        turn_end(ours) == (ours.eos_token, "") and use_turn_end_as_eos(ours) is None
    )  # our template ends turns with EOS

    texts = [r["text"] for r in read_jsonl(pretrained_run / "world" / "corpus.jsonl")[:300]]
    base = qwen_style_model(tmp_path / "qwen_style", texts)
    sft_main(tiny_args(tmp_path / "run", *demos, "--init_from", str(base), "--max_steps", "2"))
    stage = tmp_path / "run" / "sft"
    tok = AutoTokenizer.from_pretrained(stage)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Generation (chat, eval), PPO's truncation and its no-EOS penalty all stop at EOS: it must be the
    # token that ends an answer, not the base model's <|endoftext|>, which chat data never trains.
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (
        im_end,
        tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    assert GenerationConfig.from_pretrained(stage).eos_token_id == im_end
    assert AutoModelForCausalLM.from_pretrained(stage).config.eos_token_id == im_end
    # The reward model reads its score at that token, where PPO's responses end, not at the newline after it.
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}], tokenize=False
    )
    assert rendered.endswith("<|im_end|>\n") and encode(tok, "ping", "pong")[-1] == im_end


def test_a_foreign_tokenizer_gets_only_what_the_pipeline_needs(pretrained_run, tmp_path):
    from data.tokenizer import CHAT_TEMPLATE, ensure_chat_ready, turn_end

    texts = [r["text"] for r in read_jsonl(pretrained_run / "world" / "corpus.jsonl")[:100]]
    qwen = AutoTokenizer.from_pretrained(qwen_style_model(tmp_path / "qwen_style", texts))
    template = qwen.chat_template
    assert ensure_chat_ready(qwen) == 1  # a pad token apart from EOS; its own template, and no BOS, as it had none
    assert qwen.pad_token not in ("<|endoftext|>", None) and qwen.bos_token is None and qwen.chat_template == template
    qwen.chat_template = {"default": template, "tool_use": template}  # named templates, as some checkpoints ship
    assert turn_end(qwen) == ("<|im_end|>", "\n")

    # Phi-3's <|end|>, Llama-3's <|eot_id|> and tokenizers converted from GGUF: the token that closes a turn is
    # an added token marked special, and none of the named special tokens.
    bare = PreTrainedTokenizerFast(tokenizer_object=qwen.backend_tokenizer, eos_token="<|endoftext|>")
    bare.chat_template = template
    assert bare.convert_tokens_to_ids("<|im_end|>") not in bare.all_special_ids
    assert turn_end(bare) == ("<|im_end|>", "\n")

    gpt2 = AutoTokenizer.from_pretrained(tmp_path / "qwen_style")
    gpt2.chat_template, gpt2.bos_token, gpt2.pad_token = (
        None,
        "<|endoftext|>",
        None,
    )  # GPT-2: BOS = EOS, no pad, no template
    ensure_chat_ready(gpt2)
    assert (
        gpt2.chat_template == CHAT_TEMPLATE
        and gpt2.bos_token == "<|endoftext|>"
        and gpt2.pad_token_id != gpt2.eos_token_id
    )
    assert "<|assistant|>" in gpt2.all_special_tokens
