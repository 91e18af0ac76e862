"""Pretrain stage: smoke, resume after SIGKILL, two processes, bad input, tokenizer round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from data.formats.text import load_texts
from data.tokenizer import train_tokenizer
from stages.pretrain.config import PretrainConfig
from stages.pretrain.run import evaluate, optimizer_step, sample_batch
from stages.pretrain.run import main as pretrain_main
from tests.conftest import (
    assert_replicas_saved,
    kill_after_checkpoint,
    make_corpus,
    one_line_error,
    qwen_style_model,
    read_jsonl,
    run_module,
    small_bpe,
    tiny_args,
    torchrun,
    write_jsonl,
)


def test_smoke_trains_saves_and_loads_in_plain_transformers(pretrained_run):
    stage = pretrained_run / "pretrain"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain"
    assert manifest["metrics"]["val_loss"] > 0 and manifest["metrics"]["val_perplexity"] > 1
    rows = [r for r in read_jsonl(stage / "metrics.jsonl") if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5, "loss did not decrease"
    assert not (stage / "checkpoints").exists(), "work-in-progress checkpoints should be gone"

    model = AutoModelForCausalLM.from_pretrained(stage)
    tok = AutoTokenizer.from_pretrained(stage)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_rerun_is_up_to_date_and_changed_config_redoes(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    args = tiny_args(run, corpus, "--max_steps", "4", "--save_every", "100", "--threads", "1")
    pretrain_main(args)
    assert "1 process(es) x 1 thread(s)" in capsys.readouterr().out
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["threads"] == 1
    # The rerun in a new process: the run key must not depend on anything one process draws (hash seeds).
    again = run_module("stages.pretrain", *args)
    assert again.returncode == 0 and "up to date" in again.stdout
    pretrain_main([*args, "--lr", "1e-3"])
    changed = capsys.readouterr().out
    assert "redoing" in changed and "lr" in changed
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["config"]["lr"] == 1e-3


def test_run_keys_see_paths_inside_the_run_relative_to_it():
    from pipeline.stage import portable

    config = {
        "run_dir": "runs/a/",
        "train_files": ["runs/a/world/c.jsonl", "data/x.jsonl"],
        "world_dir": "runs/a//world",
        "elsewhere": "runs/ab/x",
        "steps": 3,
    }
    assert portable(config, "runs/a/") == {
        "run_dir": "{run_dir}",
        "train_files": ["{run_dir}/world/c.jsonl", "data/x.jsonl"],
        "world_dir": "{run_dir}/world",
        "elsewhere": "runs/ab/x",
        "steps": 3,
    }


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_checkpoint(tmp_path):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    args = tiny_args(
        run, corpus, "--max_steps", "400", "--save_every", "20", "--log_every", "20", "--eval_every", "400"
    )
    kill_after_checkpoint("stages.pretrain", args, run / "pretrain" / "checkpoints", "step_*[0-9]")  # not step_N.tmp
    assert not (run / "pretrain" / "manifest.json").exists()
    resumed = run_module("stages.pretrain", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    step = int(resumed.stdout.split("(step ")[1].split(")")[0])
    assert step >= 20
    assert (run / "pretrain" / "manifest.json").exists()
    steps = [r["step"] for r in read_jsonl(run / "pretrain" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 400, "metrics must not repeat or skip after resume"


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    proc = run_module("stages.pretrain", *tiny_args(run, corpus, "--max_steps", "6"), launcher=torchrun(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    # Two processes share the cores instead of each taking all of them.
    assert manifest["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert_replicas_saved(manifest, AutoModelForCausalLM.from_pretrained(run / "pretrain"))
    rows = read_jsonl(run / "pretrain" / "metrics.jsonl")
    assert len({r["step"] for r in rows}) == len(rows), "only the main process logs, once per step"


def test_batches_are_a_function_of_the_seed():
    stream = torch.arange(1000)
    assert torch.equal(sample_batch(stream, 4, 16, 7), sample_batch(stream, 4, 16, 7))
    assert not torch.equal(sample_batch(stream, 4, 16, 7), sample_batch(stream, 4, 16, 8))


def test_training_and_held_out_forwards_build_no_kv_cache(monkeypatch):
    """transformers builds a KV cache in any forward not told otherwise; the step and the held-out loss
    need none. Checked by counting caches built: a plain forward of the same model builds one."""
    built = []
    init = DynamicCache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "__init__", counting_init)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    model, accelerator = LlamaForCausalLM(config), Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stream = torch.randint(0, 64, (500,))
    optimizer_step(PretrainConfig(batch_size=2, context=16), accelerator, model, optimizer, scheduler, stream, 0)
    evaluate(model, accelerator, stream[:64].view(4, 16), batch_size=2)
    assert built == []
    model(input_ids=stream[:16][None])
    assert built == [1]


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, pretrain_main, argv, *expected)


def test_bad_input_gets_one_line_error_and_no_manifest(tmp_path, capsys):
    run = tmp_path / "run"
    good = make_corpus(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "fine"}, {"body": "wrong field"}])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "fine"}, {"text": "   "}])
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)

    _fails(capsys, tiny_args(run, tmp_path / "missing.jsonl"), "missing.jsonl", "no such file")
    _fails(capsys, tiny_args(run, empty), "empty.jsonl", "empty")
    _fails(capsys, tiny_args(run, bad_json), "bad.jsonl", "line 2", "not valid JSON")
    _fails(capsys, tiny_args(run, no_field), "nofield.jsonl", "line 2", "'text'")
    _fails(capsys, tiny_args(run, latin), "latin.txt", "line 1", "UTF-8")
    _fails(capsys, tiny_args(run, blank), "blank.jsonl", "line 2", "empty")
    _fails(capsys, tiny_args(run, good, "--no_such_key", "1"), "--no_such_key")
    _fails(capsys, tiny_args(run, good, "--lr", "fast"), "lr")
    _fails(capsys, tiny_args(run, good, "--init_from", str(unfinished)), "unfinished")
    _fails(capsys, tiny_args(run, good, "--init_from", str(tmp_path)), "neither a finished stage")
    _fails(capsys, ["--profile", "nope", "--run_dir", str(run)], "no such profile")
    assert not (run / "pretrain" / "manifest.json").exists()


def test_unknown_key_in_profile_file(tmp_path, capsys):
    profile = tmp_path / "mine.yaml"
    profile.write_text("n_layers: 2\nlearning_rate: 0.1\n")
    _fails(capsys, ["--profile", str(profile), "--run_dir", str(tmp_path)], "mine.yaml", "learning_rate")


def test_continued_pretraining_from_a_finished_stage(pretrained_run, tmp_path):
    pretrain_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(tmp_path),
            "--init_from",
            str(pretrained_run / "pretrain"),
            "--train_files",
            str(make_corpus(tmp_path)),
            "--max_steps",
            "3",
            "--threads",
            "1",
        ]
    )
    manifest = json.loads((tmp_path / "pretrain" / "manifest.json").read_text())
    assert manifest["parent"]["path"] == str(pretrained_run / "pretrain")


def test_continued_pretraining_of_a_model_that_needs_a_pad_token(tmp_path):
    # Qwen-style: pad = EOS, no BOS, its own chat template. The stage adds a pad token, grows the
    # embeddings to match, and saves a checkpoint that plain transformers loads.
    corpus = make_corpus(tmp_path)
    base = qwen_style_model(tmp_path / "qwen_style", load_texts(corpus))
    pretrain_main(
        [
            "--profile",
            "tiny",
            "--run_dir",
            str(tmp_path / "run"),
            "--init_from",
            str(base),
            "--train_files",
            str(corpus),
            "--max_steps",
            "2",
            "--threads",
            "1",
        ]
    )
    stage = tmp_path / "run" / "pretrain"
    tok, model = AutoTokenizer.from_pretrained(stage), AutoModelForCausalLM.from_pretrained(stage)
    assert len(tok) == len(AutoTokenizer.from_pretrained(base)) + 1 == model.get_input_embeddings().num_embeddings
    assert (
        tok.pad_token_id != tok.eos_token_id
        and tok.bos_token is None
        and model.config.pad_token_id == tok.pad_token_id
    )


def llama3_style_tokenizer(tmp_path, special: list[str]):
    """A small BPE vocabulary with Llama 3's BOS/EOS first and the given special tokens after them."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", *special]
    return PreTrainedTokenizerFast(
        tokenizer_object=small_bpe(load_texts(make_corpus(tmp_path)), special, 300),
        bos_token=special[0],
        eos_token=special[1],
        additional_special_tokens=special[2:],
    )


def small_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )


def test_a_pad_the_vocabulary_reserves_is_used_instead_of_a_new_one(tmp_path):
    # Llama-3.1-style: EOS <|end_of_text|>, no pad named, <|finetune_right_pad_id|> kept for padding, a
    # chat template of its own. Nothing is added, so the embeddings keep the base model's size.
    from data.tokenizer import ensure_chat_ready

    tok = llama3_style_tokenizer(
        tmp_path, ["<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    tok.chat_template = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] "
        "+ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
    )
    model = small_llama(len(tok))
    size = len(tok)
    assert ensure_chat_ready(tok, model) == 0
    assert tok.pad_token == "<|finetune_right_pad_id|>" and model.config.pad_token_id == tok.convert_tokens_to_ids(
        tok.pad_token
    )
    assert len(tok) == size == model.get_input_embeddings().num_embeddings


def test_a_llama3_base_vocabulary_without_a_template_gets_llama3s_format_and_no_new_tokens(tmp_path):
    # Llama 3.0 base: no template, no pad, and the header / end-of-turn tokens of its chat format already
    # in the vocabulary among reserved ones. Before, it got our role tokens and a new pad: 4 rows more.
    from data.tokenizer import ensure_chat_ready, use_turn_end_as_eos
    from pipeline.generation import chat_ids

    tok = llama3_style_tokenizer(
        tmp_path,
        [
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
    )
    model = small_llama(len(tok))
    size = len(tok)
    assert ensure_chat_ready(tok, model) == 0
    assert len(tok) == size == model.get_input_embeddings().num_embeddings
    assert tok.pad_token == "<|reserved_special_token_0|>" and model.config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert tok.decode(chat_ids(tok, "Hi")).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert use_turn_end_as_eos(tok) == "<|end_of_text|>" and tok.eos_token == "<|eot_id|>"  # as Llama 3 Instruct


def test_a_sentencepiece_vocabulary_gets_our_template_with_words_that_keep_their_start(tmp_path):
    # Llama 2 / Mistral / TinyLlama: Metaspace marks only a text's first word with "▁", so right after a
    # role token "Sorry" would become "S" "orry". A space opens each turn's content instead, inside the
    # turn: the generation prompt still ends at <|assistant|>, and the answer starts with "▁Sorry".
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import CHAT_TEMPLATE, SPACED_CHAT_TEMPLATE, ensure_chat_ready
    from pipeline.generation import chat_ids
    from reward.model import encode

    texts = load_texts(make_corpus(tmp_path)) + ["Sorry, I can't help with that."] * 20
    spm = small_bpe(texts, ["<unk>", "<s>", "</s>"], metaspace=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ensure_chat_ready(tok)
    assert tok.chat_template == SPACED_CHAT_TEMPLATE
    question, answer = "Sorry to ask, who are you?", "Sorry, I can't help with that."
    prompt, full = chat_ids(tok, question), encode(tok, question, answer)
    alone = [tok(text, add_special_tokens=False)["input_ids"] for text in (question, answer)]
    assert tok.convert_ids_to_tokens(alone[1][0]).startswith("▁Sorry")
    assert (
        prompt[2:-1] == alone[0] and tok.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"
    )  # <s><|user|> ... <|assistant|>
    assert (
        full[: len(prompt)] == prompt and full[len(prompt) : -1] == alone[1]
    )  # then the answer as running text has it, and </s>
    assert tok.decode(full[len(prompt) :], skip_special_tokens=True) == answer

    byte_level = train_tokenizer(texts, vocab_size=300)  # GPT-2-style byte-level BPE splits both alike
    byte_level.chat_template = None
    ensure_chat_ready(byte_level)
    assert byte_level.chat_template == CHAT_TEMPLATE


def test_tokenizer_round_trips_english_and_chinese(shared_datasets):
    english = load_texts(shared_datasets / "tinyshakespeare" / "input.txt")[:300]
    chinese = [
        r["text"]
        for r in map(
            json.loads,
            (shared_datasets / "luxun_zh" / "luxun_fiction_and_prose.jsonl")
            .read_text(encoding="utf-8")
            .splitlines()[:5],
        )
    ]
    tok = train_tokenizer(english + chinese, vocab_size=600)
    for text in english[:50] + chinese + ["  spaces\tand\nnewlines  ", "混合 mixed 文本 🙂"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3


def test_text_files_split_into_documents(shared_datasets):
    # Blank lines separate documents (Shakespeare's speeches); a file marked with <|endoftext|> splits there
    # instead, and the marker is not kept as text (TinyStories: 5 stories, some with blank lines inside).
    assert len(load_texts(shared_datasets / "tinyshakespeare" / "input.txt")) == 7222
    stories = load_texts(shared_datasets / "tinystories_sample" / "tinystories_sample.txt")
    assert len(stories) == 5 and not any("<|endoftext|>" in s for s in stories)
    assert all(s.startswith(("Once upon a time", "One day")) for s in stories)
