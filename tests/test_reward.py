"""Reward stage: the K-wise loss, training on toy/world/real data, normalisation, LoRA, resume, two
processes, and every bad input."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from data.formats.comparisons import Group, load_groups
from data.tokenizer import ensure_chat_ready
from pipeline.errors import PipelineError
from pipeline.packing import common_prefix_length, use_varlen_attention
from pipeline.stage import read_manifest
from reward.losses import pair_accuracy, pair_mean_loss, pairwise_loss, ranking_loss
from reward.model import encode, load_reward_model, score
from stages.reward.run import GroupCollator, HeadOutputs, tokenize_groups
from stages.reward.run import main as reward_main
from tests.conftest import (
    NO_SYSTEM_TEMPLATE,
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
from world.judge import GoldJudge

# ---- the loss -------------------------------------------------------------------------------------


def test_k2_is_bradley_terry():
    rewards = torch.tensor([1.3, -0.4, 0.2, 0.9])  # two groups of K=2: (1.3 > -0.4), (0.2 > 0.9)
    expected = (-F.logsigmoid(torch.tensor(1.3 + 0.4)) - F.logsigmoid(torch.tensor(0.2 - 0.9))) / 2
    assert torch.allclose(ranking_loss(rewards, [2, 2]), expected)
    assert torch.allclose(
        pairwise_loss(torch.tensor(2.0), torch.tensor(0.5)), -torch.log(torch.sigmoid(torch.tensor(1.5)))
    )


def test_kwise_is_the_mean_over_its_pairs_and_groups_weigh_equally():
    torch.manual_seed(0)
    sizes = [4, 2, 6]
    rewards = torch.randn(sum(sizes))
    per_group, start = [], 0
    for k in sizes:
        r = rewards[start : start + k].tolist()
        losses = [
            -torch.nn.functional.logsigmoid(torch.tensor(r[i] - r[j])).item()
            for i in range(k)
            for j in range(k)
            if i < j
        ]  # i is ranked above j
        assert len(losses) == k * (k - 1) // 2
        per_group.append(losses)
        start += k
    group_means = [sum(losses) / len(losses) for losses in per_group]
    assert ranking_loss(rewards, sizes).item() == pytest.approx(sum(group_means) / len(group_means), rel=1e-6)
    # --loss pairs: every pair weighs the same, so the 15 pairs of the K=6 group outweigh the K=2 one;
    # with one K for every group the two weightings agree
    every_pair = [loss for losses in per_group for loss in losses]
    assert pair_mean_loss(rewards, sizes).item() == pytest.approx(sum(every_pair) / len(every_pair), rel=1e-6)
    assert pair_mean_loss(rewards, sizes).item() != pytest.approx(ranking_loss(rewards, sizes).item(), rel=1e-3)
    same_k = torch.randn(12)
    assert torch.allclose(pair_mean_loss(same_k, [4, 4, 4]), ranking_loss(same_k, [4, 4, 4]))
    # a perfectly ordered group has every pair right; reversing it gets none
    assert pair_accuracy(torch.tensor([3.0, 2.0, 1.0]), [3]).item() == 1.0
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0]), [3]).item() == 0.0
    with pytest.raises(ValueError):
        ranking_loss(torch.tensor([1.0, 2.0, 3.0]), [1, 2])


def test_gradient_reaches_head_and_body():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_labels=1,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    ids = torch.randint(1, 50, (5, 7))
    rewards = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze(-1)
    ranking_loss(rewards, [3, 2]).backward()
    for name in (
        "score.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_evaluation_against_labels_and_gold(world_dir, monkeypatch):
    """The held-out metrics on world groups, with the reward model replaced by known scores."""
    from stages.reward import run as reward_run

    judge = GoldJudge.load(world_dir)
    groups = load_groups([str(world_dir / "comparisons_val.jsonl")], limit=20)
    gold = torch.tensor([judge.score(g.prompt, r) for g in groups for r in g.responses])
    for sign in (1.0, -1.0):  # the gold score itself, then its opposite
        monkeypatch.setattr(reward_run, "score", lambda *args, sign=sign, **kwargs: sign * gold)
        m = reward_run.evaluate(None, None, groups, judge, 8, 64)
        assert m["val_gold_pair_accuracy"] == (1.0 if sign > 0 else 0.0)
        families = {judge.spec(g.prompt)["family"] for g in groups}
        assert m["val_gold_pair_accuracy_by_family"] == {f: (1.0 if sign > 0 else 0.0) for f in sorted(families)}
        assert m["val_gold_pearson"] == pytest.approx(sign)
        kinds = m["val_gold_pairs_by_labels"]  # e.g. "fact: correct > verbose"
        assert sum(k["pairs"] for k in kinds.values()) == m["val_gold_pairs"] and len(kinds) > 5
        assert all(k["right"] == (k["pairs"] if sign > 0 else 0) for k in kinds.values())
        assert all(name.split(": ")[0] in families and " > " in name for name in kinds)
    # groups are stored best first: decreasing rewards agree with every labelled pair
    decreasing = torch.cat([torch.arange(len(g.responses), 0, -1).float() for g in groups])
    monkeypatch.setattr(reward_run, "score", lambda *args, **kwargs: decreasing)
    m = reward_run.evaluate(None, None, groups, judge, 8, 64)
    assert m["val_pair_accuracy"] == m["val_top_vs_rest_accuracy"] == m["val_top1_accuracy"] == 1.0
    assert m["val_pairs"] == sum(len(g.responses) * (len(g.responses) - 1) // 2 for g in groups)
    assert m["val_chosen_mean"] > m["val_rejected_mean"]
    assert 0.55 < m["val_label_ceiling_accuracy"] < 0.85  # the world's labeler noise: ~75% agreement off ties


# ---- on the SFT stand-in (sft_run, in tests/conftest.py) ------------------------------------------


def test_packed_groups_give_the_padded_rewards_loss_and_gradients(sft_run):
    """The training batch as one packed row (varlen attention, each score read at its sequence's
    last token), plain or with each group's prompt written once and its responses branching off it,
    equals the right-padded batch: rewards, K-wise loss, gradients."""
    tok = AutoTokenizer.from_pretrained(sft_run / "sft")
    model = AutoModelForSequenceClassification.from_pretrained(sft_run / "sft", num_labels=1)
    ensure_chat_ready(tok, model)
    assert use_varlen_attention(model)
    groups = load_groups([str(sft_run / "world" / "comparisons_train.jsonl")], False, 3)
    dataset, _ = tokenize_groups(groups, tok, 128)
    examples = [dataset[i] for i in range(len(dataset))]
    head = HeadOutputs(model.score)
    results = []
    tokens = []
    for packed, share in ((False, False), (True, False), (True, True)):
        batch = GroupCollator(tok.pad_token_id, packed, share)(examples)
        model.zero_grad()
        if packed:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            tokens.append(batch["input_ids"].numel())
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            rewards = head.scores[0, batch["last"]].squeeze(-1)
        else:
            rewards = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits.squeeze(-1)
        loss = ranking_loss(rewards, batch["group_sizes"].tolist())
        loss.backward()
        results.append((rewards.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert tokens[1] < tokens[0] * 0.8  # the prompts are shared, not just cut
    (r_a, l_a, g_a) = results[0]
    assert len(r_a) == sum(len(g.responses) for g in groups) > 6
    for r_b, l_b, g_b in results[1:]:
        torch.testing.assert_close(r_a, r_b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(l_a, l_b, atol=1e-6, rtol=1e-5)
        for a, b in zip(g_a, g_b, strict=False):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_long_prompt_is_cut_alike_for_every_response(sft_run):
    """Over max_length the start of the prompt goes, the same tokens from each response: the group
    keeps one context (and a shared prefix); each response keeps its end, where the reward is read."""
    tok = AutoTokenizer.from_pretrained(sft_run / "sft")
    prompt = "Tell me about " + " and ".join(f"river {i}" for i in range(40)) + "."
    group = Group(prompt, ["Rivers.", "I don't know much about these rivers, sorry."], "test")
    full = [encode(tok, prompt, r) for r in group.responses]
    limit = max(map(len, full)) - 20
    dataset, truncated = tokenize_groups([group], tok, limit)
    seqs = dataset[0]["group_ids"]
    assert truncated == 1 and max(map(len, seqs)) == limit
    assert [s[-8:] for s in seqs] == [s[-8:] for s in full]  # the ends survive
    assert [len(f) - len(s) for f, s in zip(full, seqs, strict=False)] == [20, 20]  # the same 20 prompt tokens went
    assert common_prefix_length(seqs) == common_prefix_length(full) - 20 > 10
    tiny, _ = tokenize_groups([group], tok, 6)  # not even the answers fit: each keeps its last 6 tokens
    assert tiny[0]["group_ids"] == [s[-6:] for s in full]


def test_a_group_the_chat_template_refuses_is_named(sft_run):
    tok = AutoTokenizer.from_pretrained(sft_run / "sft")
    tok.chat_template = NO_SYSTEM_TEMPLATE
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(
        PipelineError, match="hh.jsonl: line 7: the tokenizer's chat template rejects this conversation"
    ):
        tokenize_groups(
            [
                Group("Hi", ["Hello.", "Go away."], "hh.jsonl: line 6"),
                Group(system, ["Hello.", "Go away."], "hh.jsonl: line 7"),
            ],
            tok,
            64,
        )


def toy_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Trivially separable K=3 groups: "yes yes" > "maybe so" > "no no", whatever the question."""

    def groups(start, n):
        return [
            {
                "prompt": f"Question {i}: do you agree?",
                "responses": ["no no", "yes yes", "maybe so"],
                "ranking": [1, 2, 0],
            }
            for i in range(start, start + n)
        ]

    train = write_jsonl(tmp_path / "toy_train.jsonl", groups(0, 48))
    val = write_jsonl(tmp_path / "toy_val.jsonl", groups(100, 16))
    demos = write_jsonl(
        tmp_path / "toy_demos.jsonl",
        [
            {"prompt": f"Question {i}: do you agree?", "completion": c}
            for i, c in enumerate(["yes yes", "maybe so", "no no", "yes yes"] * 4)
        ],
    )
    return train, val, demos


def tiny_args(run: Path, *extra, threads: int | None = 1) -> list[str]:
    """The tiny profile, on one thread unless `threads` is None (the stage's default: every core). A tiny
    model gains nothing from two threads, and loses a lot to a busy machine."""
    one = [] if threads is None else ["--threads", str(threads)]
    return ["--profile", "tiny", "--run_dir", str(run), *one, *map(str, extra)]


@pytest.fixture(scope="module")
def toy_reward(sft_run, tmp_path_factory) -> tuple[Path, Path]:
    """A reward model trained in-process on the toy set: (run dir, reference demonstrations file)."""
    tmp = tmp_path_factory.mktemp("toy")
    run = new_run(tmp, sft_run)
    train, val, demos = toy_files(tmp)
    reward_main(
        tiny_args(
            run,
            "--train_files",
            train,
            "--val_files",
            val,
            "--norm_files",
            demos,
            "--norm_samples",
            100,
            "--max_steps",
            20,
            "--lr",
            3e-3,
            "--save_every",
            100,
            "--eval_every",
            10,
        )
    )
    return run, demos


# ---- training -------------------------------------------------------------------------------------


def test_toy_set_is_learned_and_checkpoint_is_plain_transformers(toy_reward):
    run, _ = toy_reward
    stage = run / "reward"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "reward" and manifest["parent"]["path"] == str(run / "sft")
    metrics = manifest["metrics"]
    assert metrics["val_pair_accuracy"] >= 0.95, metrics  # chance is 0.5
    assert metrics["val_top1_accuracy"] >= 0.95 and metrics["val_chosen_mean"] > metrics["val_rejected_mean"]
    assert metrics["val_pairs"] == 16 * 3
    assert "val_gold_pearson" not in metrics  # toy prompts are not world prompts: no gold metrics
    rows = read_jsonl(stage / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert train and train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [10, 20]  # held-out curve during training
    assert not (stage / "checkpoints").exists() and not (stage / "training_args.bin").exists()

    # Plain transformers, no project code: loads and scores a batch; best answer on top.
    model = AutoModelForSequenceClassification.from_pretrained(stage).eval()
    tok = AutoTokenizer.from_pretrained(stage)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Question 7: do you agree?"}, {"role": "assistant", "content": a}],
            tokenize=False,
        )
        for a in ("yes yes", "maybe so", "no no")
    ]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).logits[:, 0]
    assert plain[0] > plain[1] > plain[2]
    # ...and the library adds exactly the stored normalisation offset.
    ours = score(*load_reward_model(stage), ["Question 7: do you agree?"] * 3, ["yes yes", "maybe so", "no no"])
    assert torch.allclose(ours, plain + model.config.reward_bias, atol=1e-5)


def test_loss_option_trains_with_every_pair_weighing_the_same(sft_run, tmp_path, monkeypatch):
    import stages.reward.run as reward_run

    calls = []

    def spy(rewards, sizes):
        calls.append(list(sizes))
        return pair_mean_loss(rewards, sizes)

    monkeypatch.setattr(reward_run, "pair_mean_loss", spy)
    run = new_run(tmp_path, sft_run)
    train, val, _ = toy_files(tmp_path)
    reward_main(
        tiny_args(
            run,
            "--train_files",
            train,
            "--val_files",
            val,
            "--norm_files",
            "none",
            "--loss",
            "pairs",
            "--max_steps",
            2,
            "--save_every",
            100,
        )
    )
    # two training steps, then the held-out loss of the manifest (16 groups)
    assert [len(sizes) for sizes in calls] == [4, 4, 16] and all(set(sizes) == {3} for sizes in calls)
    assert read_manifest(run / "reward")["config"]["loss"] == "pairs"


def test_normalisation_makes_reference_mean_zero(toy_reward):
    run, demos = toy_reward
    model, tok = load_reward_model(run / "reward")
    records = read_jsonl(demos)
    rewards = score(model, tok, [r["prompt"] for r in records], [r["completion"] for r in records], batch_size=5)
    assert abs(model.config.reward_bias) > 0.01  # the raw model was not already centred
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert rewards.std().item() > 0.1  # ...and still tells the answers apart
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["metrics"]["reference_mean"] == pytest.approx(0.0, abs=1e-4)


def test_rerun_is_up_to_date(toy_reward, capsys):
    run, demos = toy_reward
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    c = manifest["config"]
    reward_main(
        tiny_args(
            run,
            "--train_files",
            *c["train_files"],
            "--val_files",
            *c["val_files"],
            "--norm_files",
            demos,
            "--norm_samples",
            100,
            "--max_steps",
            20,
            "--lr",
            3e-3,
            "--save_every",
            100,
            "--eval_every",
            10,
        )
    )
    assert "up to date" in capsys.readouterr().out
    assert json.loads((run / "reward" / "manifest.json").read_text())["finished"] == manifest["finished"]


def test_lora_from_a_plain_hf_checkpoint_saves_a_merged_plain_checkpoint(sft_run, tmp_path):
    run = tmp_path / "run"  # no RUN/sft: the model comes from --init_from, a plain HF directory (no manifest)
    plain = tmp_path / "plain_hf_model"
    shutil.copytree(
        sft_run / "sft", plain, ignore=shutil.ignore_patterns("manifest.json", "run.json", "metrics.jsonl")
    )
    train, val, demos = toy_files(tmp_path)
    reward_main(
        tiny_args(
            run,
            "--init_from",
            plain,
            "--train_files",
            train,
            "--val_files",
            val,
            "--norm_files",
            demos,
            "--max_steps",
            12,
            "--lr",
            1e-2,
            "--use_lora",
            "true",
            "--lora_r",
            4,
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        )
    )
    stage = run / "reward"
    assert json.loads((stage / "manifest.json").read_text())["parent"] == {"path": str(plain), "manifest_hash": None}
    assert not (stage / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(stage)
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = AutoModelForSequenceClassification.from_pretrained(plain, num_labels=1)
    trained = dict(model.named_parameters())
    # the adapters were merged into the attention weights, the MLP (no adapter) is untouched
    assert not torch.allclose(
        trained["model.layers.0.self_attn.q_proj.weight"],
        dict(base.named_parameters())["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        trained["model.layers.0.mlp.up_proj.weight"],
        dict(base.named_parameters())["model.layers.0.mlp.up_proj.weight"],
    )
    assert json.loads((stage / "manifest.json").read_text())["metrics"]["val_pair_accuracy"] > 0.8


@pytest.mark.slow
def test_world_comparisons_resume_after_sigkill(sft_run, tmp_path):
    """Default data (the world's K-wise comparisons) with gold metrics; killed mid-run, it resumes."""
    run = new_run(tmp_path, sft_run)
    args = tiny_args(
        run,
        "--max_train_groups",
        120,
        "--max_val_groups",
        16,
        "--norm_samples",
        16,
        "--save_every",
        3,
        "--log_every",
        1,
    )
    kill_after_checkpoint("stages.reward", args, run / "reward" / "checkpoints", "checkpoint-*/trainer_state.json")
    assert not (run / "reward" / "manifest.json").exists()
    resumed = run_module("stages.reward", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert int(resumed.stdout.split("(step ")[1].split(")")[0]) >= 3
    metrics = json.loads((run / "reward" / "manifest.json").read_text())["metrics"]
    assert metrics["train_steps"] == 30  # 120 groups / 4 per step, one epoch
    for key in ("val_pair_accuracy", "val_gold_pair_accuracy", "val_gold_pearson", "val_label_ceiling_accuracy"):
        assert -1 <= metrics[key] <= 1, key
    steps = [r["step"] for r in read_jsonl(run / "reward" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 31)), "metrics must not repeat or skip after resume"


def test_length_grouped_order_is_a_function_of_seed_and_epoch():
    """Whatever the global RNG holds, (seed, epoch) decide the order; each epoch gets another one."""
    from pipeline.trainer_metrics import EpochSeededLengthSampler

    lengths = [i % 7 + 1 for i in range(64)]
    global_seeds = itertools.count(123)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSeededLengthSampler(4, lengths, seed)
        sampler.set_epoch(epoch)
        with torch.random.fork_rng():
            torch.manual_seed(next(global_seeds))  # another global RNG state at every call
            return list(sampler)

    assert order(0, 2) == order(0, 2) and sorted(order(0, 2)) == list(range(64))
    assert order(0, 1) != order(0, 2) and order(1, 2) != order(0, 2)


def _stopped_then_rerun(monkeypatch, capsys, args: list[str], step: int) -> str:
    """Run the stage, stopped right after checkpoint-`step`, then run it again: the rerun's stdout."""
    with monkeypatch.context() as patched:
        stop_after_checkpoint(patched, step)
        with pytest.raises(Interrupted):
            reward_main(args)
    capsys.readouterr()
    reward_main(args)
    return capsys.readouterr().out


def _whole_and_resumed(sft_run, tmp_path, monkeypatch, capsys, *extra) -> tuple[dict, dict, Path, Path]:
    """Two epochs on the toy set (2 x 12 steps) run through, and again stopped in the second epoch (after
    checkpoint-15) and rerun: (whole metrics, resumed metrics, whole run, resumed run)."""
    train, val, demos = toy_files(tmp_path)
    runs = []
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        runs.append(new_run(tmp_path / name, sft_run))
    args = [
        "--train_files",
        train,
        "--val_files",
        val,
        "--norm_files",
        demos,
        "--num_epochs",
        2,
        "--save_every",
        5,
        *extra,
    ]
    whole, resumed = runs
    reward_main(tiny_args(whole, *args))
    assert "(step 15)" in _stopped_then_rerun(monkeypatch, capsys, tiny_args(resumed, *args), 15)
    whole_metrics, resumed_metrics = (
        json.loads((run / "reward" / "manifest.json").read_text())["metrics"] for run in (whole, resumed)
    )
    assert whole_metrics["train_steps"] == resumed_metrics["train_steps"] == 24
    return whole_metrics, resumed_metrics, whole, resumed


def test_a_resumed_run_reports_the_whole_runs_train_loss(sft_run, tmp_path, monkeypatch, capsys):
    """The manifest's train_loss is the mean over every step of the run, not over the steps after a resume
    (checkpoint 15 is no logging step: log_every 2)."""
    whole, resumed, _, _ = _whole_and_resumed(sft_run, tmp_path, monkeypatch, capsys, "--group_by_length", "false")
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_length_grouped_batches_replay_after_a_resume_past_the_first_epoch(sft_run, tmp_path, monkeypatch, capsys):
    """The length-grouped order of each epoch is a function of (seed, epoch): stopped in the second epoch and
    resumed, the run trains on the batches of the uninterrupted one and ends with its weights."""
    from safetensors.torch import load_file

    whole, resumed, whole_run, resumed_run = _whole_and_resumed(sft_run, tmp_path, monkeypatch, capsys)
    ours, theirs = (load_file(run / "reward" / "model.safetensors") for run in (resumed_run, whole_run))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "the resumed run trained on other batches"
    assert resumed["val_pair_accuracy"] == whole["val_pair_accuracy"]


def test_a_checkpoint_cut_short_is_passed_over_for_the_last_complete_one(sft_run, tmp_path, monkeypatch, capsys):
    """The newest checkpoint's trainer_state.json cut short and the next one's weights gone: the rerun resumes
    from the last complete checkpoint and finishes."""
    run = new_run(tmp_path, sft_run)
    train, val, demos = toy_files(tmp_path)
    args = tiny_args(
        run,
        "--train_files",
        train,
        "--val_files",
        val,
        "--norm_files",
        demos,
        "--max_steps",
        6,
        "--save_every",
        1,
        "--keep_checkpoints",
        3,
    )
    with monkeypatch.context() as patched:
        stop_after_checkpoint(patched, 3)
        with pytest.raises(Interrupted):
            reward_main(args)
    checkpoints = run / "reward" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    trainer_state = checkpoints / "checkpoint-3" / "trainer_state.json"
    trainer_state.write_text(trainer_state.read_text()[:40])
    (checkpoints / "checkpoint-2" / "model.safetensors").unlink()
    capsys.readouterr()
    reward_main(args)
    assert f"resumed from {checkpoints / 'checkpoint-1'} (step 1)" in capsys.readouterr().out
    assert json.loads((run / "reward" / "manifest.json").read_text())["metrics"]["train_steps"] == 6


@pytest.mark.slow
def test_two_processes_with_torchrun(sft_run, tmp_path):
    run = new_run(tmp_path, sft_run)
    train, val, demos = toy_files(tmp_path)
    proc = run_module(
        "stages.reward",
        *tiny_args(run, "--train_files", train, "--val_files", val, "--norm_files", demos, "--max_steps", 4),
        launcher=torchrun(2),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["metrics"]["train_steps"] == 4
    assert_replicas_saved(manifest, AutoModelForSequenceClassification.from_pretrained(run / "reward"))


# ---- real data formats ----------------------------------------------------------------------------


def test_real_formats_parse(shared_datasets):
    hh = shared_datasets / "hh_rlhf_harmless_base" / "test.jsonl.gz"
    groups = load_groups([str(hh)], skip_invalid=True)
    assert len(groups) == 2312 - 9  # 4 empty chosen answers, 5 transcripts that diverge before the last turn
    first = json.loads(gzip.open(hh, "rt").readline())
    g = groups[0]
    assert [m["role"] for m in g.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert g.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first["chosen"].endswith(g.responses[0]) and first["rejected"].endswith(g.responses[1])

    oasst = load_groups([str(shared_datasets / "oasst_en" / "ranked_responses.jsonl")])
    rec = next(
        json.loads(line)
        for line in open(shared_datasets / "oasst_en" / "ranked_responses.jsonl")
        if len(json.loads(line)["conversation"]) > 1
    )
    g = next(
        g
        for g in oasst
        if isinstance(g.prompt, list) and len(g.prompt) == len(rec["conversation"]) and g.responses == rec["responses"]
    )
    assert g.prompt[-1] == {"role": "user", "content": rec["conversation"][-1]["text"]}
    assert len(oasst) == 211 and sum(len(g.responses) for g in oasst) >= 2 * 211

    # The raw message trees these 211 groups were derived from give the same groups (plus one whose
    # prompter message has two ranked replies and an unranked one), prompts and orders included.
    trees = load_groups([str(shared_datasets / "oasst_en" / "en_100_tree.jsonl")])
    assert len(trees) == 212
    as_key = lambda g: (json.dumps(g.prompt), tuple(g.responses))  # noqa: E731
    assert {as_key(g) for g in oasst} <= {as_key(g) for g in trees}
    assert all(g.prompt[-1]["role"] == "user" and g.prompt[0]["role"] == "user" for g in trees)

    zh = load_groups([str(shared_datasets / "oasst_zh" / "oasst_rm_zh.json")], skip_invalid=True)
    assert len(zh) == 775 - 6  # 6 groups repeat a reply
    raw = json.loads((shared_datasets / "oasst_zh" / "oasst_rm_zh.json").read_text())
    with_history = next(i for i, r in enumerate(raw[:100]) if r["history"])
    g = zh[with_history]
    assert g.responses == raw[with_history]["output"]
    assert g.prompt[0] == {"role": "user", "content": raw[with_history]["history"][0][0]}


def test_real_data_trains_a_few_steps(sft_run, tmp_path, shared_datasets):
    hh = [
        json.loads(line)
        for line in itertools.islice(gzip.open(shared_datasets / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt"), 8)
    ]
    en = [
        json.loads(line) for line in itertools.islice(open(shared_datasets / "oasst_en" / "ranked_responses.jsonl"), 8)
    ]
    zh = json.loads((shared_datasets / "oasst_zh" / "oasst_rm_zh.json").read_text())[:8]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", hh + en + zh)
    run = new_run(tmp_path, sft_run)
    reward_main(
        tiny_args(
            run,
            "--train_files",
            mixed,
            "--val_files",
            mixed,
            "--norm_files",
            "none",
            "--world_dir",
            tmp_path / "no_world",
            "--max_steps",
            3,
            "--batch_size",
            2,
            "--padding_free",
            "false",
        )
    )  # the padded path, end to end
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["metrics"]["train_groups"] == 24 and manifest["metrics"]["train_steps"] == 3
    assert manifest["truncated_sequences"] > 0  # HH transcripts are longer than the tiny context
    assert manifest["metrics"]["reference_mean"] == pytest.approx(0.0, abs=1e-4)


def test_comparisons_of_your_own_hold_out_their_own_validation_groups(sft_run, tmp_path, shared_datasets):
    """With the world in the run (`make` writes one) but comparisons of your own and no --val_files or
    --norm_files: the world's comparisons and demonstrations (the defaults) say nothing about these, so a
    seeded val_fraction of them is held out and rewards are centred on their top-ranked answers."""
    hh = [
        json.loads(line)
        for line in itertools.islice(gzip.open(shared_datasets / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt"), 20)
    ]
    mine = write_jsonl(tmp_path / "mine.jsonl", hh)
    run = new_run(tmp_path, sft_run)
    reward_main(tiny_args(run, "--train_files", mine, "--val_fraction", 0.2, "--max_steps", 1, "--batch_size", 2))
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["config"]["val_files"] == [] and manifest["config"]["norm_files"] == []
    assert manifest["metrics"]["train_groups"] == 16 and manifest["metrics"]["val_groups"] == 4
    assert "val_pair_accuracy" in manifest["metrics"] and "val_gold_pair_accuracy" not in manifest["metrics"]
    assert not any("world" in f for f in manifest["data"])


# ---- bad input ------------------------------------------------------------------------------------


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, reward_main, argv, *expected, after_progress=True)


def test_bad_input_gets_one_line_error_and_no_manifest(sft_run, tmp_path, capsys):
    run = new_run(tmp_path, sft_run)
    good = {"prompt": "Hi?", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
    cases = {
        "k1.jsonl": (
            [good, {"prompt": "Hi?", "responses": ["only one"], "ranking": [0]}],
            ["line 2", "'responses'", "K >= 2"],
        ),
        "perm.jsonl": ([{**good, "ranking": [0, 0, 1]}], ["line 1", "'ranking'", "permutation"]),
        "short.jsonl": ([{**good, "ranking": [1, 0]}], ["line 1", "'ranking'", "permutation"]),
        "dup.jsonl": (
            [good, {**good, "responses": ["a", "b", "a"]}],
            ["line 2", "'responses'", "same response twice"],
        ),
        "same.jsonl": (
            [{"prompt": "Hi?", "chosen": "yes", "rejected": "yes"}],
            ["line 1", "'chosen' is identical to 'rejected'"],
        ),
        "empty.jsonl": ([{**good, "responses": ["a", " ", "c"]}], ["line 1", "'responses'", "empty response"]),
        "hh.jsonl": (
            [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi there"}],
            ["line 1", "'rejected'", "without a final Assistant turn"],
        ),
        "fields.jsonl": ([{"question": "Hi?", "answer": "a"}], ["line 1", "not a comparison record"]),
        "noprompt.jsonl": ([{"responses": ["a", "b"], "ranking": [0, 1]}], ["line 1", "'prompt'"]),
        "tree.jsonl": (
            [{"prompt": {"role": "prompter", "text": "Hi?", "replies": [{"role": "assistant", "rank": 0}]}}],
            ["line 1", "'prompt' message 0.0"],
        ),
    }
    for name, (records, expected) in cases.items():
        path = write_jsonl(tmp_path / name, records)
        _fails(capsys, tiny_args(run, "--train_files", path), name, *expected)
    _fails(capsys, tiny_args(run, "--val_files", tmp_path / "dup.jsonl"), "dup.jsonl", "skip_invalid")
    _fails(capsys, tiny_args(run, "--loss", "listwise"), "loss", "instructgpt, pairs", "'listwise'")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    _fails(capsys, tiny_args(run, "--norm_files", alpaca), "alpaca.jsonl: line 1", "'prompt'", "--norm_files none")
    _fails(capsys, tiny_args(run, "--norm_files", tmp_path / "missing.jsonl"), "missing.jsonl", "--norm_files none")
    assert not (run / "reward").exists(), "nothing may be written for bad input"

    # parent problems: no SFT stage, an unfinished one, a tokenizer without a chat template
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    _fails(capsys, tiny_args(orphan), "sft", "make sft")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sft_run / "sft", unfinished)
    (unfinished / "manifest.json").unlink()
    (unfinished / "checkpoints").mkdir()
    _fails(capsys, tiny_args(run, "--init_from", unfinished), "unfinished")
    no_template = tmp_path / "no_template"
    shutil.copytree(sft_run / "sft", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    _fails(capsys, tiny_args(run, "--init_from", no_template), "no_template", "no chat template")
    assert not (run / "reward" / "manifest.json").exists()


def test_a_bad_group_in_a_message_tree_is_skipped_alone(tmp_path):
    """One prompter message of a tree repeating a reply is an invalid group; with skip_invalid the tree's
    other groups stay. Deleted and unranked replies are left out."""

    def reply(text, rank, *replies, **extra):
        return {"message_id": text, "role": "assistant", "text": text, "rank": rank, "replies": list(replies), **extra}

    def ask(text, *replies):
        return {"message_id": text, "role": "prompter", "text": text, "replies": list(replies)}

    tree = {
        "message_tree_id": "t",
        "prompt": ask(
            "Q1",
            reply("A", 1, ask("Q2", reply("C", 0), reply("C", 1))),
            reply("B", 0),
            reply("gone", 2, deleted=True),
            reply("D", None),
        ),
    }
    path = write_jsonl(tmp_path / "tree.jsonl", [tree])
    with pytest.raises(
        PipelineError, match=r"tree.jsonl: line 1, message Q2: field 'replies' holds the same response twice"
    ):
        load_groups([str(path)])
    groups = load_groups([str(path)], skip_invalid=True)
    assert [(g.prompt, g.responses) for g in groups] == [([{"role": "user", "content": "Q1"}], ["B", "A"])]


def test_a_gpt2_reward_model_gives_its_normalised_reward_to_plain_transformers(sft_run, tmp_path):
    """GPT-2's final LayerNorm has a bias, so the stage folds the normalising shift into the weights:
    plain transformers logits are then the reward, and our loader does not add it a second time."""
    from transformers import GPT2Config, GPT2LMHeadModel

    plain = tmp_path / "gpt2_sft"
    tok = AutoTokenizer.from_pretrained(sft_run / "sft")
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=128,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(plain)
    tok.save_pretrained(plain)
    run = tmp_path / "run"
    train, val, demos = toy_files(tmp_path)
    reward_main(
        tiny_args(
            run,
            "--init_from",
            plain,
            "--train_files",
            train,
            "--val_files",
            val,
            "--norm_files",
            demos,
            "--max_steps",
            4,
        )
    )
    stage = run / "reward"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["reward_bias_folded"] and manifest["reward_bias"] != 0.0
    model, tokenizer = load_reward_model(stage)
    prompt, answers = "Question 1: do you agree?", ["yes yes", "no no"]
    ours = score(model, tokenizer, [prompt] * 2, answers, 8, 64)
    hf = AutoModelForSequenceClassification.from_pretrained(stage).eval()
    for answer, expected in zip(answers, ours.tolist(), strict=False):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            assert hf(**ids).logits[0, 0].item() == pytest.approx(expected, abs=1e-4)


def test_the_manifest_records_the_threads_each_process_used(sft_run, tmp_path):
    run = new_run(tmp_path, sft_run)  # a run of its own at the default thread count (the other tests take one)
    train, val, _ = toy_files(tmp_path)
    args = ["--train_files", train, "--val_files", val, "--norm_files", "none", "--max_steps", 1, "--save_every", 100]
    reward_main(tiny_args(run, *args, threads=None))
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    assert manifest["threads"] == max(1, len(os.sched_getaffinity(0)))  # --threads 0: all cores, one process
