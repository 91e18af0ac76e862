"""Pretraining throughput and MFU on this machine (`make bench-pretrain`).

At two shapes - the default profile's model (2 layers x 256, context 128, batch 16) and 4 layers x 256
(context 256, batch 8) - it times the pretrain stage's own training step (its model, AdamW, sampled
blocks, loss, backward, clipping, step; `stages.pretrain.run.optimizer_step`) on the token stream of
the vocabulary the stage built (RUN/pretrain's tokenizer, else one trained as the stage would on
RUN/world's corpus). Beside it, at the same dimensions, vocabulary and tokens:

- `--nanogpt PATH`: karpathy/nanoGPT's own train.py from a work tree you cloned (its CPU recipe:
  --device=cpu --compile=False, fp32), run as a subprocess with the same thread count; its data
  directory and checkpoints go to a temporary directory, the tree is not written to;
- without it, a GPT-2 model (the architecture nanoGPT implements) in our loop, in process.

Rounds alternate the two sides; each figure is the median over rounds of tokens/s over the timed
steps (after 3 warm-up steps). MFU: FLOPs per token by the PaLM / nanoGPT estimate, 6 * N (weights) +
12 * layers * width * context, against the fp32 matmul peak measured in the same run.

`--compile` also times our step with the stage's `--compile` (regional torch.compile), reporting the
first (compiling) step apart, and nanoGPT's with its own --compile=True. Where the CPU multiplies bf16
in hardware (AMX, AVX-512 BF16; `--bf16 auto`, the default) or when asked (`--bf16 yes`), our step is
also timed under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from data.formats.text import load_texts
from data.tokenizer import train_tokenizer
from pipeline.packing import document_stream
from pipeline.runtime import bf16_hardware, cpu_model, setup
from stages.pretrain.config import PretrainConfig
from stages.pretrain.run import build_model, optimizer_step, param_groups, prepare_training, sample_batch

WARMUP = 3


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    width: int
    heads: int
    context: int
    batch: int


SHAPES = (Shape("default (2x256)", 2, 256, 4, 128, 16), Shape("4x256", 4, 256, 4, 256, 8))


def matmul_peak_flops(n: int = 1024, seconds: float = 2.0, dtype=torch.float32) -> float:
    """Best matmul rate over a few timed bursts: the machine's practical peak at `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_token(params: int, layers: int, width: int, context: int) -> float:
    """Training FLOPs per token (PaLM / nanoGPT): 6 per weight, plus attention's scores and values."""
    return 6 * params + 12 * layers * width * context


def stage_token_stream(run_dir: Path):
    """(tokenizer, token stream): the tokenizer the pretrain stage saved in RUN/pretrain, or one trained
    as the stage trains it (default vocabulary) on RUN/world's corpus; the stream is that corpus."""
    corpus = run_dir / "world" / "corpus.jsonl"
    if not corpus.is_file():
        sys.exit(f"bench.pretrain: {corpus} not found; build the world first (make data RUN={run_dir})")
    texts = load_texts([str(corpus)])
    saved = run_dir / "pretrain" / "tokenizer.json"
    tokenizer = (
        AutoTokenizer.from_pretrained(saved.parent)
        if saved.is_file()
        else train_tokenizer(texts, PretrainConfig.vocab_size)
    )
    return tokenizer, document_stream(tokenizer, texts)


def ours(shape: Shape, tokenizer, stream, steps: int, accelerator, compile_: bool = False, bf16: bool = False):
    """(tokens/s, first-step seconds, parameters) of the pretrain stage's own step at `shape`."""
    cfg = PretrainConfig(
        n_layers=shape.layers,
        hidden_size=shape.width,
        n_heads=shape.heads,
        context=shape.context,
        batch_size=shape.batch,
        max_steps=steps + WARMUP,
        mixed_precision="fp32",
        compile=compile_,
    )
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    model, optimizer, scheduler = prepare_training(cfg, model, accelerator)
    model.train()
    t = time.perf_counter()
    for step in range(steps + WARMUP):
        if step == 1:
            first = time.perf_counter() - t
        if step == WARMUP:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            optimizer_step(cfg, accelerator, model, optimizer, scheduler, stream, step)
    return steps * shape.batch * shape.context / (time.perf_counter() - t), first, params


def gpt2(shape: Shape, vocab: int) -> GPT2LMHeadModel:
    """A GPT-2 model (the architecture nanoGPT implements) of the same dimensions, without dropout."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_embd=shape.width,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_positions=shape.context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,  # GPT-2's own ids lie outside a small vocabulary
            eos_token_id=None,
        )
    )


def gpt2_reference(shape: Shape, vocab: int, stream, steps: int) -> float:
    """Tokens/s of the GPT-2 model in the same kind of loop as ours, in process."""
    model = gpt2(shape, vocab)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    for step in range(steps + WARMUP):
        if step == WARMUP:
            t = time.perf_counter()
        x = sample_batch(stream, shape.batch, shape.context, step)
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * shape.batch * shape.context / (time.perf_counter() - t)


def write_nanogpt_data(workdir: Path, stream: torch.Tensor, vocab: int) -> None:
    """nanoGPT's data layout in `workdir`: data/bench/{train,val}.bin (uint16 tokens) and meta.pkl."""
    if vocab > 2**16:
        sys.exit(f"bench.pretrain: nanoGPT stores tokens as uint16; vocabulary {vocab} does not fit")
    data = workdir / "data" / "bench"
    data.mkdir(parents=True, exist_ok=True)
    tokens = stream.numpy().astype(np.uint16)
    tokens.tofile(data / "train.bin")
    tokens[: max(len(tokens) // 10, 1024)].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)


ITER_LINE = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.M)


def nanogpt_tokens_per_s(output: str, shape: Shape, steps: int) -> float:
    """Tokens/s from train.py's own per-iteration times, over the iterations after the warm-up ones."""
    times = [float(ms) / 1000 for it, ms in ITER_LINE.findall(output) if int(it) >= WARMUP]
    if len(times) < steps:
        raise RuntimeError(
            f"nanoGPT's train.py printed {len(times)} timed iterations, expected {steps}:\n{output[-2000:]}"
        )
    return steps * shape.batch * shape.context / sum(times[:steps])


def nanogpt(tree: Path, workdir: Path, shape: Shape, steps: int, threads: int, compile_: bool = False) -> float:
    """Tokens/s of nanoGPT's own train.py at `shape`, run from `workdir` (data and out_dir there)."""
    args = {
        "dataset": "bench",
        "out_dir": str(workdir / "out"),
        "device": "cpu",
        "compile": compile_,
        "dtype": "float32",
        "n_layer": shape.layers,
        "n_head": shape.heads,
        "n_embd": shape.width,
        "block_size": shape.context,
        "batch_size": shape.batch,
        "gradient_accumulation_steps": 1,
        "dropout": 0.0,
        "bias": False,
        "max_iters": steps + WARMUP - 1,  # iterations 0..max_iters
        "eval_interval": 10**9,
        "eval_iters": 1,
        "log_interval": 1,
        "always_save_checkpoint": False,
        "wandb_log": False,
    }
    argv = [sys.executable, str(tree / "train.py"), *(f"--{k}={v}" for k, v in args.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nanoGPT's train.py failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return nanogpt_tokens_per_s(done.stdout, shape, steps)


def nanogpt_params(tree: Path, shape: Shape, vocab: int) -> int:
    sys.path.insert(0, str(tree))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py, from the tree passed in
    finally:
        sys.path.remove(str(tree))
    config = GPTConfig(
        block_size=shape.context, vocab_size=vocab, n_layer=shape.layers, n_head=shape.heads,
        n_embd=shape.width, dropout=0.0, bias=False,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        return sum(p.numel() for p in GPT(config).parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT work tree: run its own train.py beside ours")
    ap.add_argument("--run", type=Path, default=Path("runs/default"), help="run whose world (and tokenizer) to use")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians")
    ap.add_argument(
        "--compile", action="store_true", help="also time ours with --compile (and nanoGPT with its --compile=True)"
    )
    ap.add_argument(
        "--bf16",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also time ours under bf16 autocast (auto: on bf16 hardware)",
    )
    args = ap.parse_args()
    if args.nanogpt and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"bench.pretrain: {args.nanogpt}/train.py not found (--nanogpt takes a nanoGPT work tree)")
    accelerator = setup(0, "no")
    threads = torch.get_num_threads()
    hardware = bf16_hardware()
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and hardware is not None)
    tokenizer, stream = stage_token_stream(args.run)
    vocab = len(tokenizer)
    peak = matmul_peak_flops()
    reference = "nanoGPT train.py" if args.nanogpt else "GPT-2 reference (in process)"
    print(f"{cpu_model()} ({hardware or 'no bf16 hardware'}), {threads} threads on both sides")
    print(
        f"vocabulary {vocab:,} (the stage's tokenizer), {len(stream):,} corpus tokens; "
        f"{args.steps} timed steps, {args.rounds} rounds"
    )
    print(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s\n")
    head = f"| shape | ours (Llama) tokens/s | ours MFU | {reference} tokens/s | its MFU | ours / it |"
    rule = "|---|---|---|---|---|---|"
    if args.compile:
        head, rule = head + " ours --compile tokens/s | first step s | compiled / eager |", rule + "---|---|---|"
        if args.nanogpt:
            head, rule = head + " nanoGPT --compile=True tokens/s | both compiled: ours / it |", rule + "---|---|"
    if bf16:
        head, rule = head + " ours bf16 autocast tokens/s | bf16 / fp32 |", rule + "---|---|"
    print(head + "\n" + rule)
    with tempfile.TemporaryDirectory() as tmp:
        if args.nanogpt:
            write_nanogpt_data(Path(tmp), stream, vocab)
            (Path(tmp) / "configurator.py").symlink_to((args.nanogpt / "configurator.py").resolve())
        for shape in SHAPES:
            ours_tps, ref_tps, compiled, firsts, ref_compiled = [], [], [], [], []
            for r in range(args.rounds):
                sides = ["ours", "ref"] if r % 2 == 0 else ["ref", "ours"]
                for side in sides:
                    if side == "ours":
                        tps, _, n_ours = ours(shape, tokenizer, stream, args.steps, accelerator)
                        ours_tps.append(tps)
                    elif args.nanogpt:
                        ref_tps.append(nanogpt(args.nanogpt, Path(tmp), shape, args.steps, threads))
                    else:
                        ref_tps.append(gpt2_reference(shape, vocab, stream, args.steps))
                if args.compile:
                    torch._dynamo.reset()
                    tps, first, _ = ours(shape, tokenizer, stream, args.steps, accelerator, compile_=True)
                    compiled.append(tps)
                    firsts.append(first)
                    if args.nanogpt:
                        ref_compiled.append(nanogpt(args.nanogpt, Path(tmp), shape, args.steps, threads, True))
            mine, ref = statistics.median(ours_tps), statistics.median(ref_tps)
            if args.nanogpt:
                n_ref = nanogpt_params(args.nanogpt, shape, vocab)
            else:
                n_ref = sum(p.numel() for p in gpt2(shape, vocab).parameters())
            mfu = mine * flops_per_token(n_ours, shape.layers, shape.width, shape.context) / peak
            ref_mfu = ref * flops_per_token(n_ref, shape.layers, shape.width, shape.context) / peak
            cells = (
                f"| {shape.name}, context {shape.context}, batch {shape.batch} | {mine:,.0f} | {mfu:.1%} "
                f"| {ref:,.0f} | {ref_mfu:.1%} | {mine / ref:.2f}x |"
            )
            if args.compile:
                c = statistics.median(compiled)
                cells += f" {c:,.0f} | {firsts[0]:.1f} | {c / mine:.2f}x |"  # the first round's compile: the coldest
                if args.nanogpt:
                    rc = statistics.median(ref_compiled)
                    cells += f" {rc:,.0f} | {c / rc:.2f}x |"
            if bf16:
                b = ours(shape, tokenizer, stream, args.steps, accelerator, bf16=True)[0]
                cells += f" {b:,.0f} | {b / mine:.2f}x |"
            print(cells, flush=True)


if __name__ == "__main__":
    main()
