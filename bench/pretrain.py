"""Pretraining throughput and MFU on this machine (`make bench-pretrain`).

For two model sizes it times the pretrain stage's own training step (forward, backward, AdamW) on
packed blocks, and reports tokens/s and model FLOPs utilisation against the fp32 matmul peak measured
in the same run. As a reference it times a GPT-2 model (the architecture nanoGPT implements) of the
same width, depth and context in the same loop.

FLOPs per token follow the PaLM / nanoGPT estimate: 6 * N (weights) + 12 * layers * width * context
(attention scores and values), forward plus backward.

Both run fp32. Where the CPU multiplies bf16 in hardware (AMX, AVX-512 BF16; `--bf16 auto`, the default)
or when asked (`--bf16 yes`), our step is also timed under bf16 autocast over fp32 weights - what the
stages' `mixed_precision: auto` runs there - beside the fp32 matmul and bf16 matmul peaks.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.runtime import bf16_hardware, cpu_model
from stages.pretrain.run import param_groups


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


def llama(vocab: int, layers: int, width: int, heads: int, context: int):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=64 * -(-width * 8 // 3 // 64),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=context,
            tie_word_embeddings=True,
        )
    )


def gpt2(vocab: int, layers: int, width: int, heads: int, context: int):
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_positions=context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def time_training(model, vocab: int, batch: int, context: int, steps: int, bf16: bool = False) -> float:
    """Tokens per second of full training steps (after warm-up steps), optionally under bf16 autocast."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    x = torch.randint(0, vocab, (batch, context))
    for i in range(steps + 3):
        if i == 3:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * context / (time.perf_counter() - t)


def flops_per_token(model, layers: int, width: int, context: int) -> float:
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * layers * width * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--bf16",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also time ours under bf16 autocast (auto: on bf16 hardware)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    hardware = bf16_hardware()
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and hardware is not None)
    peak = matmul_peak_flops()
    sizes = [("tiny (2x64)", 512, 2, 64, 2, 64), ("default (2x256)", 1024, 2, 256, 4, 128)]
    print(f"{cpu_model()} ({hardware or 'no bf16 hardware'}), {torch.get_num_threads()} threads")
    print(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s")
    if bf16:
        print(f"bf16 matmul peak: {matmul_peak_flops(dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s")
    print("\nfp32 on both sides" + ("; ours also under bf16 autocast (fp32 weights)" if bf16 else "") + "\n")
    extra = " ours bf16 autocast tokens/s | bf16 / fp32 |" if bf16 else ""
    print(
        f"| model | params | ours (Llama) tokens/s | ours MFU | GPT-2 reference tokens/s | GPT-2 MFU | ratio |{extra}"
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if bf16 else ""))
    for name, vocab, layers, width, heads, context in sizes:
        ours, ref = llama(vocab, layers, width, heads, context), gpt2(vocab, layers, width, heads, context)
        tps_ours = time_training(ours, vocab, args.batch, context, args.steps)
        tps_ref = time_training(ref, vocab, args.batch, context, args.steps)
        mfu_ours = tps_ours * flops_per_token(ours, layers, width, context) / peak
        mfu_ref = tps_ref * flops_per_token(ref, layers, width, context) / peak
        params = sum(p.numel() for p in ours.parameters())
        cells = ""
        if bf16:
            tps_bf16 = time_training(
                llama(vocab, layers, width, heads, context), vocab, args.batch, context, args.steps, True
            )
            cells = f" {tps_bf16:,.0f} | {tps_bf16 / tps_ours:.2f}x |"
        print(
            f"| {name} | {params / 1e6:.2f}M | {tps_ours:,.0f} | {mfu_ours:.1%} | {tps_ref:,.0f} | {mfu_ref:.1%} "
            f"| {tps_ours / tps_ref:.2f}x |{cells}"
        )


if __name__ == "__main__":
    main()
