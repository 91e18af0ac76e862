"""DPO stage: K-wise rankings as pairs, the tokens TRL trains on, a smoke run on tiny (parameters moved,
reference not), a toy where the margin grows, loss types, the reference without a second model, resume,
two processes, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.formats.comparisons import Group, pair_indices, preference_pairs
from pipeline.errors import PipelineError
from stages.dpo import run as dpo_run
from stages.dpo.run import main as dpo_main
from tests.conftest import (
    Interrupted,
    assert_replicas_saved,
    kill_after_checkpoint,
    new_run,
    one_line_error,
    read_jsonl,
    run_module,
    stop_after_checkpoint,
    torchrun,
    write_jsonl,
)

# ---- K-wise rankings as pairs -------------------------------------------------------------------------


def test_kwise_rankings_become_the_pairs_written_by_hand():
    group = Group(
        "Where is Ana from?",
        ["Ana is from Oslo.", "Ana is from Oslo!!!", "I don't know.", "Ana is a cat."],
        "f: line 1",
    )
    assert preference_pairs(group, "all") == [
        ("Ana is from Oslo.", "Ana is from Oslo!!!"),
        ("Ana is from Oslo.", "I don't know."),
        ("Ana is from Oslo.", "Ana is a cat."),
        ("Ana is from Oslo!!!", "I don't know."),
        ("Ana is from Oslo!!!", "Ana is a cat."),
        ("I don't know.", "Ana is a cat."),
    ]
    assert preference_pairs(group, "top") == [
        ("Ana is from Oslo.", "Ana is from Oslo!!!"),
        ("Ana is from Oslo.", "I don't know."),
        ("Ana is from Oslo.", "Ana is a cat."),
    ]
    assert pair_indices(2, "all") == pair_indices(2, "top") == [(0, 1)]  # a chosen/rejected pair either way
    assert len(pair_indices(9, "all")) == 36 and len(pair_indices(9, "top")) == 8
    with pytest.raises(PipelineError, match="top, all"):
        pair_indices(3, "adjacent")


def _toy_groups(start: int, n: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: do you agree?", "responses": ["no no", "yes yes", "maybe so"], "ranking": [1, 2, 0]}
        for i in range(start, start + n)
    ]


def test_pair_rows_are_the_tokens_trl_trains_on(sft_run):
    """Our rows are what TRL's own preparation makes of the same conversations (prompt with the generation
    prompt, the answer through the token that closes the turn), and the held-out scoring sums TRL's log-probs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_run / "sft")
    group = Group("Question 1: do you agree?", ["yes yes", "maybe so", "no no"], "toy: line 1")
    tokenized = dpo_run.tokenize_group(group, tokenizer)
    ours = dpo_run.pair_dataset([tokenized], "all")
    assert [tokenizer.decode(r, skip_special_tokens=True) for r in ours["chosen_ids"]] == [
        "yes yes",
        "yes yes",
        "maybe so",
    ]
    assert ours["chosen_ids"][0][-1] == tokenizer.eos_token_id

    conversations = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": group.prompt}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for c, r in preference_pairs(group, "all")
        ]
    )
    args = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", max_length=64)
    model = AutoModelForCausalLM.from_pretrained(sft_run / "sft")
    trainer = DPOTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
    theirs = trainer.train_dataset
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key], key

    batch = trainer.data_collator(
        [{k: theirs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(3)]
    )
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    logps = dpo_run.answer_logps(trainer.ref_model, [tokenized], tokenizer.pad_token_id, 8, 64)  # best first
    assert chosen.tolist() == pytest.approx([logps[0], logps[0], logps[1]], abs=1e-4)
    assert rejected.tolist() == pytest.approx([logps[1], logps[2], logps[2]], abs=1e-4)


def test_held_out_accuracy_against_labels_and_the_noise_free_ranking():
    groups = [Group("p", ["a", "b", "c"], "x"), Group("q", ["d", "e"], "y")]
    rewards = torch.tensor([3.0, 1.0, 2.0, -1.0, 0.0])  # pairs right: (a,b) (a,c), not (b,c); not (d,e)
    m = dpo_run.preference_accuracy(rewards, groups, judge=None)
    assert m["val_pairs"] == 4 and m["val_pair_accuracy"] == pytest.approx(0.5)
    assert m["val_top_vs_rest_accuracy"] == pytest.approx(2 / 3)
    assert m["val_margin_mean"] == pytest.approx((2 + 1 - 1 - 1) / 4)
    assert "val_gold_pair_accuracy" not in m


# ---- runs of the stage on tiny models -----------------------------------------------------------------


def tiny_args(run: Path, *extra) -> list[str]:
    return ["--profile", "tiny", "--run_dir", str(run), "--threads", "1", *map(str, extra)]


def toy_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "toy_train.jsonl", _toy_groups(0, 48)), write_jsonl(
        tmp_path / "toy_val.jsonl", _toy_groups(100, 16)
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def trainers(monkeypatch) -> list:
    """The DPO trainers the stage makes in this test (to look at its reference model after training)."""
    made = []
    make = dpo_run.make_trainer

    def keep(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(dpo_run, "make_trainer", keep)
    return made


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_smoke_on_the_world_moves_the_policy_not_the_reference(sft_run, tmp_path, trainers):
    run = new_run(tmp_path, sft_run)
    parent_weights = sha256(run / "sft" / "model.safetensors")
    dpo_main(tiny_args(run))

    stage = run / "dpo"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["parent"]["path"] == str(run / "sft")
    metrics = manifest["metrics"]
    assert metrics["train_steps"] == 6 and metrics["train_groups"] == 16 and metrics["train_pairs"] > 16
    for key in ("val_pair_accuracy", "val_gold_pair_accuracy", "val_top_vs_rest_accuracy", "gold_win_rate"):
        assert 0 <= metrics[key] <= 1, key
    low, high = metrics["gold_win_rate_ci"]
    assert low <= metrics["gold_win_rate"] <= high
    assert metrics["kl_prompts"] == 8 and metrics["kl_to_sft"] is not None and metrics["eval_prompts"] == 8
    assert {"gold_score", "sft_gold_score", "gold_win_rate_ceiling", "hallucination_rate"} <= metrics.keys()
    assert not (stage / "checkpoints").exists() and not (stage / "training_args.bin").exists()
    assert [r["step"] for r in read_jsonl(stage / "metrics.jsonl") if "loss" in r] == [2, 3, 4, 6]

    # A plain checkpoint whose weights moved; the parent on disk and the reference in memory did not.
    trained = AutoModelForCausalLM.from_pretrained(stage)
    parent = AutoModelForCausalLM.from_pretrained(run / "sft")
    assert sha256(run / "sft" / "model.safetensors") == parent_weights
    before, after, reference = _params(parent), _params(trained), _params(trainers[0].ref_model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert all(torch.equal(before[k], reference[k]) for k in before), "the reference model changed"
    assert AutoTokenizer.from_pretrained(stage).chat_template


def test_dpo_raises_the_chosen_minus_rejected_margin_on_a_toy_set(sft_run, tmp_path):
    run = new_run(tmp_path, sft_run)
    train, val = toy_files(tmp_path)
    dpo_main(
        tiny_args(run, "--train_files", train, "--val_files", val, "--max_steps", 16, "--lr", 3e-3, "--pairs", "all")
    )
    metrics = json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]
    # Before training the policy is the reference: every implicit reward, so every margin, is 0.
    assert metrics["val_margin_mean"] > 0.5 and metrics["val_pair_accuracy"] >= 0.95
    assert "val_gold_pair_accuracy" not in metrics and "gold_win_rate" not in metrics  # toy prompts: no world
    margins = [r["rewards/margins"] for r in read_jsonl(run / "dpo" / "metrics.jsonl") if "rewards/margins" in r]
    assert margins[-1] > margins[0]
    assert metrics["kl_to_sft"] > 0  # the held-out toy prompts' sampled answers


@pytest.mark.parametrize(
    "options, trl_losses, weights, smoothing",
    [
        (("--loss_type", "ipo"), ["ipo"], [1.0], 0.0),
        (("--loss_type", "robust", "--label_smoothing", 0.2), ["robust"], [1.0], 0.2),
        (("--loss_type", "hinge"), ["hinge"], [1.0], 0.0),
        (("--sft_weight", 0.5), ["sigmoid", "sft"], [1.0, 0.5], 0.0),  # RPO: DPO + NLL of the chosen
    ],
)
def test_every_loss_type_trains(sft_run, tmp_path, trainers, options, trl_losses, weights, smoothing):
    run = new_run(tmp_path, sft_run)
    train, val = toy_files(tmp_path)
    dpo_main(tiny_args(run, "--train_files", train, "--val_files", val, "--max_steps", 8, "--lr", 3e-3, *options))
    assert trainers[0].loss_types == trl_losses and trainers[0].loss_weights == weights
    assert trainers[0].label_smoothing == smoothing
    assert json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]["val_margin_mean"] > 0


def test_precomputed_reference_keeps_one_model_in_memory(sft_run, tmp_path, trainers):
    run = new_run(tmp_path, sft_run)
    train, val = toy_files(tmp_path)
    args = ("--train_files", train, "--val_files", val, "--max_steps", 8, "--lr", 3e-3)
    dpo_main(tiny_args(run, *args, "--precompute_ref_log_probs", "true", "--eval_every", 4))
    assert trainers[0].ref_model is None and "ref_chosen_logps" in trainers[0].train_dataset.column_names
    precomputed = json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]

    (tmp_path / "other").mkdir()
    other = new_run(tmp_path / "other", sft_run)
    dpo_main(tiny_args(other, *args, "--eval_every", 4))
    alongside = json.loads((other / "dpo" / "manifest.json").read_text())["metrics"]
    # the same reference either way: the same training
    assert precomputed["train_loss"] == pytest.approx(alongside["train_loss"], rel=1e-4)
    assert precomputed["val_margin_mean"] == pytest.approx(alongside["val_margin_mean"], rel=1e-3)


def test_lora_uses_the_adapters_off_as_reference_and_saves_a_merged_plain_checkpoint(sft_run, tmp_path, trainers):
    run = new_run(tmp_path, sft_run)
    train, val = toy_files(tmp_path)
    dpo_main(tiny_args(run, "--train_files", train, "--val_files", val, "--max_steps", 8, "--lr", 3e-3, "--lora_r", 8))
    assert trainers[0].ref_model is None and hasattr(trainers[0].model, "disable_adapter")
    stage = run / "dpo"
    assert not list(stage.glob("adapter_*"))
    trained, parent = (AutoModelForCausalLM.from_pretrained(p) for p in (stage, run / "sft"))
    assert trained.state_dict().keys() == parent.state_dict().keys()
    before, after = _params(parent), _params(trained)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((stage / "manifest.json").read_text())["metrics"]["val_margin_mean"] > 0


@pytest.mark.parametrize("order", ["random", "by_length"])
def test_a_stopped_run_resumes_on_the_batches_of_an_uninterrupted_one(sft_run, tmp_path, monkeypatch, capsys, order):
    """Stopped right after checkpoint-9 (in the second epoch: 32 pairs, 8 steps of 4) and rerun, it resumes
    there and ends with the weights and the train loss of a run never stopped; a third run is up to date."""
    from safetensors.torch import load_file

    train, val = (
        write_jsonl(tmp_path / "train.jsonl", _toy_groups(0, 16)),
        write_jsonl(tmp_path / "val.jsonl", _toy_groups(100, 4)),
    )
    extra = ("--train_files", train, "--val_files", val, "--max_steps", 12, "--log_every", 1)
    extra += ("--group_by_length", str(order == "by_length"))
    whole, stopped = new_run(tmp_path, sft_run), tmp_path / "stopped"
    dpo_main(tiny_args(whole, *extra))
    stopped.mkdir()
    stopped = new_run(stopped, sft_run)
    args = tiny_args(stopped, *extra)
    with monkeypatch.context() as m:
        stop_after_checkpoint(m, 9)
        with pytest.raises(Interrupted):
            dpo_main(args)
    assert not (stopped / "dpo" / "manifest.json").exists()
    capsys.readouterr()
    dpo_main(args)
    assert "(step 9)" in capsys.readouterr().out
    ours, theirs = (load_file(r / "dpo" / "model.safetensors") for r in (stopped, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "the resumed run trained on other batches"
    metrics = [json.loads((r / "dpo" / "manifest.json").read_text())["metrics"] for r in (stopped, whole)]
    assert metrics[0]["train_steps"] == 12 and metrics[0]["train_loss"] == pytest.approx(metrics[1]["train_loss"])
    assert [r["step"] for r in read_jsonl(stopped / "dpo" / "metrics.jsonl") if "loss" in r] == list(range(1, 13))
    dpo_main(args)
    assert "up to date" in capsys.readouterr().out


# ---- bad input ------------------------------------------------------------------------------------------


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, dpo_main, argv, *expected, after_progress=True)


def test_bad_input_gets_the_reward_stages_one_line_errors_and_no_stage_dir(sft_run, tmp_path, capsys):
    run = new_run(tmp_path, sft_run)
    good = {"prompt": "Hi?", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
    cases = {
        "k1.jsonl": ([good, {"prompt": "Hi?", "responses": ["only one"], "ranking": [0]}], ["line 2", "K >= 2"]),
        "perm.jsonl": ([{**good, "ranking": [0, 0, 1]}], ["line 1", "'ranking'", "permutation"]),
        "dup.jsonl": ([good, {**good, "responses": ["a", "b", "a"]}], ["line 2", "same response twice"]),
        "same.jsonl": (
            [{"prompt": "Hi?", "chosen": "yes", "rejected": "yes"}],
            ["'chosen' is identical to 'rejected'"],
        ),
        "hh.jsonl": (
            [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi there"}],
            ["line 1", "'rejected'", "without a final Assistant turn"],
        ),
        "fields.jsonl": ([{"question": "Hi?", "answer": "a"}], ["line 1", "not a comparison record"]),
        "noprompt.jsonl": ([{"responses": ["a", "b"], "ranking": [0, 1]}], ["line 1", "'prompt'"]),
    }
    for name, (records, expected) in cases.items():
        path = write_jsonl(tmp_path / name, records)
        _fails(capsys, tiny_args(run, "--train_files", path), name, *expected)
    _fails(capsys, tiny_args(run, "--val_files", tmp_path / "dup.jsonl"), "dup.jsonl", "skip_invalid")
    _fails(capsys, tiny_args(run, "--train_files", tmp_path / "missing.jsonl"), "missing.jsonl")
    _fails(capsys, tiny_args(run, "--loss_type", "kto"), "loss_type", "sigmoid, ipo, robust, hinge", "'kto'")
    _fails(capsys, tiny_args(run, "--pairs", "adjacent"), "pairs", "top, all")
    _fails(capsys, tiny_args(run, "--label_smoothing", 0.1), "label_smoothing", "robust")
    _fails(capsys, tiny_args(run, "--loss_type", "robust", "--label_smoothing", 0.5), "label_smoothing", "[0, 0.5)")
    _fails(capsys, tiny_args(run, "--beta", 0), "beta must be > 0")
    assert not (run / "dpo").exists(), "nothing may be written for bad input"

    # parent problems: no SFT stage, a reward model, a tokenizer without a chat template
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    _fails(capsys, tiny_args(orphan), "sft", "make sft")
    no_template = tmp_path / "no_template"
    shutil.copytree(sft_run / "sft", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    _fails(capsys, tiny_args(run, "--init_from", no_template), "no_template", "no chat template")
    from transformers import AutoModelForSequenceClassification

    reward = tmp_path / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(sft_run / "sft", num_labels=1).save_pretrained(reward)
    AutoTokenizer.from_pretrained(sft_run / "sft").save_pretrained(reward)
    _fails(
        capsys, tiny_args(run, "--init_from", reward), "reward_model", "not a causal LM", "ForSequenceClassification"
    )
    assert not (run / "dpo").exists()


# ---- slow: a kill, two processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_world_comparisons_resume_after_sigkill(sft_run, tmp_path):
    """Default data (the world's K-wise comparisons) killed mid-run by SIGKILL: the rerun resumes and finishes."""
    run = new_run(tmp_path, sft_run)
    args = tiny_args(run, "--max_steps", 12, "--log_every", 1)
    kill_after_checkpoint("stages.dpo", args, run / "dpo" / "checkpoints", "checkpoint-*/trainer_state.json")
    assert not (run / "dpo" / "manifest.json").exists()
    resumed = run_module("stages.dpo", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    metrics = json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]
    assert metrics["train_steps"] == 12 and 0 <= metrics["val_gold_pair_accuracy"] <= 1
    steps = [r["step"] for r in read_jsonl(run / "dpo" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13)), "metrics must not repeat or skip after resume"


@pytest.mark.slow
def test_two_processes_with_torchrun(sft_run, tmp_path):
    run = new_run(tmp_path, sft_run)
    train, val = toy_files(tmp_path)
    proc = run_module(
        "stages.dpo",
        *tiny_args(run, "--train_files", train, "--val_files", val, "--max_steps", 4),
        launcher=torchrun(2),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "dpo" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["metrics"]["train_steps"] == 4
    assert_replicas_saved(manifest, AutoModelForCausalLM.from_pretrained(run / "dpo"))
