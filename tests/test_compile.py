"""`--compile`: regional torch.compile of the transformer blocks (pretrain), the update's policy+critic
forward (PPO, with symbolic lengths) and transformers' torch_compile (SFT). The compiled model must compute
what the eager one does - packed, padding-free rows included, whose attention runs eagerly inside the
compiled graphs - without a new graph per answer length, and save under the same names."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.packing import pack_rows, use_varlen_attention
from pipeline.runtime import compile_blocks
from stages.ppo import run as ppo_run
from stages.pretrain.run import main as pretrain_main
from stages.sft.run import main as sft_main
from tests.conftest import make_corpus, read_jsonl, rl_run, tiny_args, tiny_rl, write_jsonl


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_compile_blocks_compiles_each_decoder_layer_and_keeps_names_and_outputs():
    model = tiny_llama()
    keys = list(model.state_dict())
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        eager = model(input_ids=x).logits
        assert compile_blocks(model) == 2
        compiled = model(input_ids=x).logits
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compiled_blocks_keep_packed_sequences_apart_across_lengths():
    model = tiny_llama()
    assert use_varlen_attention(model)
    compile_blocks(model)
    for rows in ([[5, 6, 7, 8], [9, 10, 11]], [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]):
        ids, positions, where = pack_rows([rows])
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]
            packed = model(
                input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=False
            ).logits[0]
        for seq, at in zip(alone, where, strict=True):
            torch.testing.assert_close(packed[torch.tensor(at)], seq, atol=1e-4, rtol=1e-4)


def test_compile_blocks_compiles_a_model_without_named_blocks_whole():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert compile_blocks(plain) == 1
    assert plain._compiled_call_impl is not None  # what nn.Module.compile() sets: calls go through dynamo
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), torch.relu(plain[0](x)))


@pytest.mark.slow
def test_pretrain_with_compile_trains_and_saves_a_plain_checkpoint(tmp_path):
    corpus = make_corpus(tmp_path)
    stages = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "true"])):
        run = tmp_path / name
        pretrain_main(tiny_args(run, corpus, "--max_steps", "6", "--save_every", "100", "--threads", "1", *extra))
        stages[name] = run / "pretrain"
    assert json.loads((stages["compiled"] / "manifest.json").read_text())["config"]["compile"] is True
    eager, compiled = (AutoModelForCausalLM.from_pretrained(s).state_dict() for s in stages.values())
    assert list(compiled) == list(eager)
    # Six steps from the same start: compiled kernels round differently, the weights stay close.
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=2e-3, rtol=0, msg=name)


@pytest.mark.slow
def test_sft_with_compile_trains_and_saves_a_plain_checkpoint(pretrained_run, world_dir, tmp_path, own_precision):
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("world", "pretrain"):
        os.symlink(pretrained_run / stage, run / stage)
    demos = write_jsonl(tmp_path / "train.jsonl", read_jsonl(world_dir / "sft_train.jsonl")[:32])
    sft_main(
        ["--profile", "tiny", "--run_dir", str(run), "--threads", "1", "--train_files", str(demos), "--max_steps", "3",
         "--eval_prompts", "0", "--compile", "true"]
    )  # fmt: skip
    assert json.loads((run / "sft" / "manifest.json").read_text())["config"]["compile"] is True
    saved = AutoModelForCausalLM.from_pretrained(run / "sft").state_dict()
    assert list(saved) == list(AutoModelForCausalLM.from_pretrained(run / "pretrain").state_dict())


@pytest.mark.slow  # compiles a forward and its three shapes: about 20 s
def test_compiled_update_forward_matches_eager_and_does_not_recompile_for_new_answer_lengths(parents):
    from torch._dynamo.utils import counters
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.generation import chat_ids, left_pad
    from pipeline.packing import packs_sequences

    torch._dynamo.reset()
    policy = AutoModelForCausalLM.from_pretrained(parents / "sft").eval()
    critic = ppo_run.Critic(AutoModelForSequenceClassification.from_pretrained(parents / "reward").eval(), 0.5)
    assert packs_sequences(policy) and packs_sequences(critic.body)
    tok = AutoTokenizer.from_pretrained(parents / "sft")
    eager = ppo_run.ActorCritic(policy, critic)
    compiled = ppo_run.ActorCritic(policy, critic)
    compiled.compile(dynamic=True)  # as stages.ppo prepares it under --compile
    graphs = []
    for answer in ([5, 6, 7], [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]):  # a new answer length each time
        prompts = [chat_ids(tok, p) + answer for p in ("Who is Ana Lint?", "Hi", "Where is Port Red?")]
        seq, mask = left_pad(prompts, tok.pad_token_id)
        ep = ppo_run.episodes(seq, mask, mask[:, -len(answer) :], packed=True)
        with torch.no_grad():
            (logits, values, _), (want_logits, want_values, _) = compiled(ep, 0.7), eager(ep, 0.7)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, want_values, atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1], f"graphs compiled after each call: {graphs}"


@pytest.mark.slow
def test_ppo_with_compile_runs_updates_on_packed_episodes(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    ppo_run.main(tiny_rl(run, "--num_updates", "2", "--compile", "true"))
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    assert manifest["config"]["compile"] is True and manifest["config"]["padding_free"] is True
    assert manifest["metrics"]["episodes"] > 0
    assert AutoModelForCausalLM.from_pretrained(run / "ppo") is not None


def test_a_dynamo_backend_from_accelerate_or_transformers_does_not_reach_the_stage(tmp_path, monkeypatch):
    # `accelerate config` can set one for every launch, and transformers' torch_compile sets one for the
    # rest of its process: accelerate would then compile the model whole in prepare(), behind --compile.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
    run = tmp_path / "run"
    pretrain_main(tiny_args(run, make_corpus(tmp_path), "--max_steps", "2", "--save_every", "100", "--threads", "1"))
    assert not [name for name in os.environ if name.startswith("ACCELERATE_DYNAMO_")]
    assert (run / "pretrain" / "model.safetensors").is_file()
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["config"]["compile"] is False


def test_compile_off_keeps_the_run_key_of_stages_finished_before_the_option_existed():
    from pipeline.stage import _run_key

    before = {"run_dir": "runs/x", "lr": 0.001, "max_steps": 10}
    assert _run_key({**before, "compile": False}, None, {}) == _run_key(before, None, {})
    assert _run_key({**before, "compile": True}, None, {}) != _run_key(before, None, {})
