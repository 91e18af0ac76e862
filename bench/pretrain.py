"""Pretraining throughput and MFU on this machine (`make bench-pretrain`).

For two model sizes it times the pretrain stage's own training step (forward, backward, AdamW) on
packed blocks, and reports tokens/s and model FLOPs utilisation against the fp32 matmul peak measured
in the same run. As a reference it times a GPT-2 model (the architecture nanoGPT implements) of the
same width, depth and context in the same loop.

FLOPs per token follow the PaLM / nanoGPT estimate: 6 * N (weights) + 12 * layers * width * context
(attention scores and values), forward plus backward.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from stages.pretrain.run import param_groups


def matmul_peak_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """Best fp32 matmul rate over a few timed bursts: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
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


def time_training(model, vocab: int, batch: int, context: int, steps: int) -> float:
    """Tokens per second of full training steps (after warm-up steps)."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    x = torch.randint(0, vocab, (batch, context))
    for i in range(steps + 3):
        if i == 3:
            t = time.perf_counter()
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
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak_flops()
    sizes = [("tiny (2x64)", 512, 2, 64, 2, 64), ("default (2x256)", 1024, 2, 256, 4, 128)]
    print(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)\n")
    print("| model | params | ours (Llama) tokens/s | ours MFU | GPT-2 reference tokens/s | GPT-2 MFU | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, vocab, layers, width, heads, context in sizes:
        ours, ref = llama(vocab, layers, width, heads, context), gpt2(vocab, layers, width, heads, context)
        tps_ours = time_training(ours, vocab, args.batch, context, args.steps)
        tps_ref = time_training(ref, vocab, args.batch, context, args.steps)
        mfu_ours = tps_ours * flops_per_token(ours, layers, width, context) / peak
        mfu_ref = tps_ref * flops_per_token(ref, layers, width, context) / peak
        params = sum(p.numel() for p in ours.parameters())
        print(
            f"| {name} | {params / 1e6:.2f}M | {tps_ours:,.0f} | {mfu_ours:.1%} | {tps_ref:,.0f} | {mfu_ref:.1%} "
            f"| {tps_ours / tps_ref:.2f}x |"
        )


if __name__ == "__main__":
    main()
