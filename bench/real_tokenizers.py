"""The recipe on real tokenizers: Llama 3, Llama 2, Qwen2, Phi-3 and Gemma 4 vocabularies and chat templates.

    python -m bench.real_tokenizers [--names llama-bpe qwen2] [--steps 150]    (= make check-tokenizers)

Model weights cannot be fetched here, but tokenizers can: llama.cpp ships each model family's
vocabulary as a small GGUF file, and its Python binding's source package (on PyPI) carries them.
transformers converts such a file into a Hugging Face tokenizer (with the `gguf` package). For each
one this builds a tiny random Llama model around the tokenizer, continues pretraining it on the
embedded world, then runs sft -> comparisons -> reward -> ppo -> eval -> chat, each stage a
subprocess as `make` runs it, and reports what the chat template made of the run: the token that
ends an answer after SFT, the share of PPO answers that never reach it, and one greedy answer.

The downloads (a 77 MB source package, once) live in bench/.vocab-cache; runs in bench/out/tokenizers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".vocab-cache"
OUT = ROOT / "bench" / "out" / "tokenizers"
LLAMA_CPP = "llama-cpp-python==0.3.36"
GGUF = "gguf==0.19.0"
PROBE = "Hi! Where is Zelda Nash from?"  # a training prompt of the default world: "Zelda Nash is from Kelmora."
NAMES = {"llama-bpe": "Llama 3", "llama-spm": "Llama 2", "qwen2": "Qwen2", "phi-3": "Phi-3", "gemma-4": "Gemma 4"}


def fetch_vocab(names: list[str]) -> Path:
    """CACHE/vocab/ggml-vocab-NAME.gguf for each name, from llama.cpp's source package; the gguf package in
    CACHE/gguf."""
    vocab = CACHE / "vocab"
    pip = [sys.executable, "-m", "pip", "-q"]
    if not all((vocab / f"ggml-vocab-{n}.gguf").is_file() for n in names):
        subprocess.run(pip + ["download", LLAMA_CPP, "--no-deps", "--no-binary", ":all:", "-d", CACHE], check=True)
        (sdist,) = CACHE.glob("llama_cpp_python-*.tar.gz")
        vocab.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if name in {f"ggml-vocab-{n}.gguf" for n in names}:
                    member.name = name
                    tar.extract(member, vocab, filter="data")
    if not (CACHE / "gguf" / "gguf").is_dir():
        subprocess.run(pip + ["install", "--no-deps", "--target", CACHE / "gguf", GGUF], check=True)
    return vocab


BUILD = """
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
vocab, name, out = sys.argv[1:]
try:
    tok = AutoTokenizer.from_pretrained(vocab, gguf_file=f"ggml-vocab-{name}.gguf")
except Exception:  # transformers 5.25 cannot read Gemma 4's model config from the file; its tokenizer part it can
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    architecture, vocabulary, settings = get_gguf_tokenizer(f"{vocab}/ggml-vocab-{name}.gguf")
    special = {k: v for k, v in settings.items() if k.endswith("_token") and v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=convert_gguf_tokenizer(architecture, vocabulary)[0], **special)
    tok.chat_template = settings.get("chat_template")
config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2,
                     max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)  # the same random base model on every run: runs of one vocabulary compare
LlamaForCausalLM(config).save_pretrained(out)
tok.save_pretrained(out)
"""


def run_recipe(vocab: Path, name: str, steps: int) -> dict:
    """A tiny model with the tokenizer `name`, through every stage; what its answers ended with."""
    from transformers import AutoTokenizer

    from data.tokenizer import LLAMA3_TEMPLATE, SPACED_CHAT_TEMPLATE

    run, base = OUT / name, OUT / name / "base"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    py = [sys.executable, "-m"]
    if not (base / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-c", BUILD, vocab, name, base],
            check=True,
            env={**env, "PYTHONPATH": str(CACHE / "gguf")},
        )
    steps_arg = ["--max_steps", str(steps)]
    for cmd in (
        ["world", "--out", run / "world", "--if_missing", "true"],
        ["stages.pretrain", "--profile", "tiny", "--run_dir", run, "--init_from", base, *steps_arg],
        ["stages.sft", "--profile", "tiny", "--run_dir", run, *steps_arg, "--lr", "2e-3"],
        ["reward.comparisons", "sample", "--run_dir", run, "--prompts", "16", "--k", "3", "--max_new_tokens", "16"],
        ["stages.reward", "--profile", "tiny", "--run_dir", run],
        ["stages.ppo", "--profile", "tiny", "--run_dir", run],
        ["evaluation.evaluate", "--run_dir", run, "--max_prompts", "24"],
    ):
        subprocess.run(py + [str(c) for c in cmd], check=True, cwd=ROOT, env=env)
    chat = subprocess.run(
        py + ["evaluation.chat", "--model", str(run / "sft"), "--temperature", "0", "--max_new_tokens", "24"],
        input=f"{PROBE}\n/quit\n",
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    base_tok, sft_tok = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(run / "sft")
    ppo = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    no_eos = [m["response/no_eos_rate"] for m in ppo if "response/no_eos_rate" in m]
    answer = next((line for line in chat.stdout.splitlines() if line.startswith("assistant>")), "")
    names = {LLAMA3_TEMPLATE: "Llama 3's", SPACED_CHAT_TEMPLATE: "ours, a space opening each turn"}
    template = "its own" if base_tok.chat_template else f"{names.get(sft_tok.chat_template, 'ours')} (it has none)"
    return {
        "tokenizer": name,
        "family": NAMES.get(name, name),
        "vocab": len(base_tok),
        "sft_vocab": len(sft_tok),
        "template": template,
        "base_eos": base_tok.eos_token,
        "sft_eos": sft_tok.eos_token,
        "ppo_no_eos_first": no_eos[0],
        "ppo_no_eos_last": no_eos[-1],
        "chat_answer": answer.removeprefix("assistant>").strip(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--names", nargs="+", default=list(NAMES), help="llama.cpp vocabulary names (ggml-vocab-NAME.gguf)"
    )
    parser.add_argument(
        "--steps", type=int, default=150, help="pretraining and SFT steps (enough to learn where answers end)"
    )
    args = parser.parse_args(argv)
    vocab = fetch_vocab(args.names)
    rows = [run_recipe(vocab, name, args.steps) for name in args.names]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    print(
        "| tokenizer | vocab (base -> SFT) | chat template | EOS before -> after SFT "
        f"| PPO answers without EOS (first -> last update) | greedy SFT answer to '{PROBE}' |"
    )
    print("|---|---:|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} (`{r['tokenizer']}`) | {r['vocab']:,} -> {r['sft_vocab']:,} | {r['template']} "
            f"| `{r['base_eos']}` -> `{r['sft_eos']}` "
            f"| {r['ppo_no_eos_first']:.2f} -> {r['ppo_no_eos_last']:.2f} | {r['chat_answer']!r} |"
        )


if __name__ == "__main__":
    main()
