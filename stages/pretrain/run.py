"""Pretraining: next-token prediction on a text corpus (GPT-1's first stage, the article's "text completion").

Recipe: parse -> corpus -> tokenizer -> model -> train (resumable) -> evaluate -> save -> sample -> manifest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from data.formats.text import load_texts
from data.tokenizer import ensure_chat_ready, train_tokenizer
from pipeline.config import config_dict, parse_config
from pipeline.errors import PipelineError, cli_main
from pipeline.packing import document_stream
from pipeline.runtime import (
    compile_blocks,
    configure_deepspeed,
    load_checkpoint,
    one_entry_per_parameter,
    peak_memory_mb,
    precision_facts,
    precision_line,
    progress,
    rank_checksums,
    save_checkpoint,
    setup,
)
from pipeline.stage import StageRun, resolve_init
from pipeline.tracking import Tracker
from stages.pretrain.config import PretrainConfig


def split_documents(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents (not token ranges) so validation text is never seen in training: at
    least one, never all. A corpus of one document holds none out (see main)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(texts) - 1, max(1, round(len(texts) * val_fraction)))
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


def sample_batch(stream: torch.Tensor, batch_size: int, context: int, seed: int) -> torch.Tensor:
    """Random blocks, drawn from a generator seeded by (seed, rank, step): a resumed run sees exactly
    the batches the uninterrupted run would have seen (nanoGPT's random-offset sampling)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - context, (batch_size,), generator=g)
    return stream[starts[:, None] + torch.arange(context)]


def val_blocks(stream: torch.Tensor, context: int, n: int) -> torch.Tensor:
    """Fixed, non-overlapping validation blocks (the same ones at every evaluation). Held-out text
    shorter than one block is one shorter block: a small corpus still gets a held-out loss."""
    if len(stream) < context:
        return stream.view(1, -1)
    n = min(n, max(1, (len(stream) - 1) // context))
    return stream[: n * context].view(n, context)


@torch.no_grad()
def evaluate(model, accelerator, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    mine = blocks[accelerator.process_index :: accelerator.num_processes]
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        x = mine[i : i + batch_size].to(accelerator.device)
        total += model(input_ids=x, labels=x, use_cache=False).loss.float() * len(x)
        count += len(x)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return (total / count.clamp(min=1)).item()


def build_model(cfg: PretrainConfig, tokenizer):
    if cfg.init_from:
        path, _ = resolve_init(cfg.init_from)
        model = AutoModelForCausalLM.from_pretrained(path)
        ensure_chat_ready(tokenizer, model)
        return model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 64 * math.ceil(cfg.hidden_size * 8 / 3 / 64),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def get_tokenizer(cfg: PretrainConfig, stage_dir: Path, texts: list[str], accelerator):
    """Reuse the tokenizer a killed run already saved; else load the given one or train a new one.

    Every rank looks before the barrier and only the main process writes after it, so all ranks
    take the same branch and meet at the same barriers."""
    reuse = (stage_dir / "tokenizer.json").is_file()
    accelerator.wait_for_everyone()
    if not reuse:
        if accelerator.is_main_process:
            source = cfg.tokenizer or (resolve_init(cfg.init_from)[0] if cfg.init_from else None)
            if source:
                tokenizer = AutoTokenizer.from_pretrained(source)
                ensure_chat_ready(tokenizer)
            else:
                tokenizer = train_tokenizer(texts, cfg.vocab_size)
            tokenizer.save_pretrained(stage_dir)
        accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(stage_dir)


def param_groups(model, weight_decay: float):
    """Decay matrices only: decaying norms and biases hurts small models (GPT-2/nanoGPT practice)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int
) -> list[dict]:
    model.eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": completion})
    return out


# ---- the recipe's pieces ------------------------------------------------------------------------


def stage_run(cfg: PretrainConfig, stage_dir: Path, is_main: bool) -> StageRun:
    """The stage directory's bookkeeping: its config, parent (--init_from) and data."""
    parent = resolve_init(cfg.init_from) if cfg.init_from else (None, None)
    return StageRun("pretrain", stage_dir, config_dict(cfg), parent[1], parent[0], list(cfg.train_files), is_main)


@dataclass
class Corpus:
    """The corpus as whole training and held-out documents, the tokenizer, and their token streams."""

    train_texts: list[str]
    val_texts: list[str]
    tokenizer: Any
    vocab: dict  # the manifest's vocabulary sizes
    train_stream: torch.Tensor
    val_stream: torch.Tensor | None
    held_out: torch.Tensor | None  # the fixed validation blocks; None without held-out documents


def load_corpus(cfg: PretrainConfig, stage_dir: Path, accelerator) -> Corpus:
    files = ", ".join(cfg.train_files)
    texts = load_texts(cfg.train_files, cfg.text_field)
    # One document cannot be split into whole documents for validation. Training on it is still what
    # the user asked for, so train on all of it and say there is no held-out loss, instead of refusing
    # (or holding out a slice of the one text, which would not be the same measure as on any other corpus).
    train_texts, val_texts = split_documents(texts, cfg.val_fraction, cfg.seed) if len(texts) > 1 else (texts, [])
    if not val_texts:
        accelerator.print(
            f"[pretrain] {files}: one document, so none is held out for validation: no held-out loss "
            f"(give several documents, e.g. a .txt with blank lines between them, for one)"
        )
    tokenizer = get_tokenizer(cfg, stage_dir, train_texts, accelerator)
    vocab = vocab_sizes(cfg, tokenizer, accelerator)
    train_stream = document_stream(tokenizer, train_texts)
    val_stream = document_stream(tokenizer, val_texts) if val_texts else None
    if len(train_stream) <= cfg.context:
        held = f" once {len(val_texts)} of {len(texts)} documents are held out (--val_fraction)" if val_texts else ""
        raise PipelineError(
            f"{files}: {len(train_stream)} tokens to train on{held}, fewer than one block of {cfg.context}"
        )
    held_out = val_blocks(val_stream, cfg.context, cfg.eval_batches * cfg.batch_size) if val_texts else None
    return Corpus(train_texts, val_texts, tokenizer, vocab, train_stream, val_stream, held_out)


def vocab_sizes(cfg: PretrainConfig, tokenizer, accelerator) -> dict:
    vocab = {"vocab_size": len(tokenizer)}
    if not (cfg.tokenizer or cfg.init_from):
        # BPE stops merging when no pair of tokens occurs twice: a small corpus gives fewer tokens than asked.
        vocab["vocab_size_requested"] = cfg.vocab_size
        if len(tokenizer) < cfg.vocab_size:
            accelerator.print(
                f"[pretrain] tokenizer: {len(tokenizer):,} tokens, fewer than the {cfg.vocab_size:,} "
                f"asked (--vocab_size): the corpus has no more pairs seen twice to merge"
            )
    return vocab


def prepare_training(cfg: PretrainConfig, model, accelerator):
    """AdamW, warmup then cosine decay to min_lr_ratio * lr; the model and optimizer prepared by accelerate.
    Returns (model, optimizer, scheduler)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.max_steps, min_lr_rate=cfg.min_lr_ratio
    )
    configure_deepspeed(accelerator, cfg.batch_size, cfg.grad_clip)
    # The scheduler is not prepared: accelerate would step it once per process per step, and our
    # schedule is in optimizer steps. It is registered so checkpoints still carry it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def resume(run: StageRun, accelerator, tracker: Tracker) -> int:
    """The step to go on from: the newest complete checkpoint's, if a killed run left one (its metrics
    logged after that step are dropped), else 0."""
    latest = run.latest_checkpoint()
    if latest is None:
        return 0
    step = load_checkpoint(accelerator, latest)["step"]
    tracker.truncate_after(step)
    accelerator.print(f"[pretrain] resumed from {latest} (step {step})")
    return step


def tokens_per_step(cfg: PretrainConfig, accelerator) -> int:
    return cfg.batch_size * cfg.context * cfg.grad_accum * accelerator.num_processes


def train(
    cfg: PretrainConfig,
    accelerator,
    model,
    optimizer,
    scheduler,
    corpus: Corpus,
    run: StageRun,
    tracker: Tracker,
    step: int,
) -> None:
    """From `step` to max_steps: log every log_every steps (the held-out loss every eval_every), save a
    checkpoint every save_every."""
    per_step = tokens_per_step(cfg, accelerator)
    bar = progress(cfg.max_steps, step, "pretrain", accelerator.is_main_process)
    model.train()
    t0, tokens_since, losses = time.time(), 0, []
    val_loss = None
    while step < cfg.max_steps:
        losses += optimizer_step(cfg, accelerator, model, optimizer, scheduler, corpus.train_stream, step)
        step += 1
        tokens_since += per_step
        bar.update(1)
        if not torch.isfinite(losses[-1]):
            raise PipelineError(f"pretrain: loss became {losses[-1].item()} at step {step}; lower lr (now {cfg.lr})")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.time() - t0
            train_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            metrics = {
                "train/loss": train_loss,
                "train/lr": scheduler.get_last_lr()[0],
                "perf/tokens_per_s": tokens_since / max(elapsed, 1e-9),
            }
            if corpus.held_out is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val_loss = evaluate(model, accelerator, corpus.held_out, cfg.batch_size)
                metrics.update({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))})
            tracker.log(metrics, step)
            bar.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
            t0, tokens_since, losses = time.time(), 0, []
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(accelerator, run.checkpoints, step, cfg.keep_checkpoints)
    bar.close()


def optimizer_step(
    cfg: PretrainConfig, accelerator, model, optimizer, scheduler, stream: torch.Tensor, step: int
) -> list[torch.Tensor]:
    """One optimizer step over grad_accum micro-batches; returns their losses."""
    losses = []
    for micro in range(cfg.grad_accum):
        seed = hash((cfg.seed, accelerator.process_index, step, micro)) % 2**62
        x = sample_batch(stream, cfg.batch_size, cfg.context, seed).to(accelerator.device)
        with accelerator.accumulate(model):
            # use_cache=False: transformers would otherwise build a KV cache in every training forward,
            # copying each layer's keys and values into it for nothing.
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def save_model(cfg: PretrainConfig, accelerator, model, tokenizer, stage_dir: Path) -> None:
    """A plain HF checkpoint (with a sampling generation config) and the tokenizer."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=cfg.temperature,
        max_new_tokens=64,
    )
    state_dict = accelerator.get_state_dict(model)  # every process takes part; the main one saves it
    if state_dict is not None:
        state_dict = one_entry_per_parameter(unwrapped, state_dict)
    unwrapped.save_pretrained(
        stage_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(stage_dir)


def sample_saved_model(cfg: PretrainConfig, corpus: Corpus, stage_dir: Path, device) -> list[dict]:
    """Samples from the saved checkpoint, on the main process: under FSDP or ZeRO-3 the trained model is
    sharded, and a forward on the main process alone would wait for the others forever."""
    tokenizer = corpus.tokenizer
    prompts = cfg.sample_prompts or [
        tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:6])
        for t in (corpus.val_texts or corpus.train_texts)[:4]
    ]
    saved = AutoModelForCausalLM.from_pretrained(stage_dir).to(device)
    return sample_completions(saved, tokenizer, prompts, cfg.sample_tokens, cfg.temperature, cfg.seed)


def finish(
    cfg: PretrainConfig,
    run: StageRun,
    accelerator,
    corpus: Corpus,
    val_loss: float | None,
    n_params: int,
    checksums: list[float],
    samples: list[dict],
) -> None:
    """The manifest (written last), then the result on the console."""
    perplexity = math.exp(min(val_loss, 50)) if val_loss is not None else None
    metrics = {
        "val_loss": val_loss,
        "val_perplexity": perplexity,
        "params": n_params,
        "train_tokens_seen": cfg.max_steps * tokens_per_step(cfg, accelerator),
        "peak_memory_mb": round(peak_memory_mb()),
    }
    run.finish(
        metrics,
        {
            "samples": samples,
            "processes": accelerator.num_processes,
            "threads": torch.get_num_threads(),
            "precision": precision_facts(cfg.mixed_precision),
            "weights_checksum_per_rank": checksums,
            "train_documents": len(corpus.train_texts),
            "held_out_documents": len(corpus.val_texts),
            **corpus.vocab,
        },
    )
    done = f"val loss {val_loss:.3f} (perplexity {perplexity:.1f})" if val_loss is not None else "no held-out loss"
    accelerator.print(f"[pretrain] done: {done} -> {run.dir}")
    for s in samples:
        accelerator.print(f"  {s['prompt']!r} -> {s['completion']!r}")


# ---- the recipe ---------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> None:
    # 1. Config and stage directory: finished already? resumable checkpoints?
    cfg = parse_config(PretrainConfig, "pretrain", argv)
    accelerator = setup(cfg.seed, cfg.mixed_precision, cfg.grad_accum, cfg.threads)
    stage_dir = Path(cfg.run_dir) / "pretrain"
    run = stage_run(cfg, stage_dir, accelerator.is_main_process)
    if not run.begin(cfg.force):
        return
    accelerator.wait_for_everyone()

    # 2. Corpus and tokenizer.
    corpus = load_corpus(cfg, stage_dir, accelerator)

    # 3. Model and optimizer (AdamW, warmup then cosine decay to min_lr_ratio * lr).
    model = build_model(cfg, corpus.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    model, optimizer, scheduler = prepare_training(cfg, model, accelerator)
    tracker = Tracker(
        stage_dir,
        "pretrain",
        config_dict(cfg),
        enabled=accelerator.is_main_process,
        run_name=f"{cfg.run_dir}/pretrain",
    )

    # 4. Resume from the newest complete checkpoint, if a killed run left one.
    step = resume(run, accelerator, tracker)
    accelerator.print(
        f"[pretrain] {n_params / 1e6:.2f}M parameters, {len(corpus.train_stream):,} train tokens, "
        f"{len(corpus.val_stream) if corpus.val_texts else 0:,} held-out tokens, "
        f"{accelerator.num_processes} process(es) x {torch.get_num_threads()} thread(s); "
        f"{precision_line(cfg.mixed_precision)}"
    )

    # 5. Train.
    train(cfg, accelerator, model, optimizer, scheduler, corpus, run, tracker, step)

    # 6. Evaluate, save a plain HF checkpoint, sample from it, then the manifest (last).
    val_loss = evaluate(model, accelerator, corpus.held_out, cfg.batch_size) if corpus.held_out is not None else None
    checksums = rank_checksums(accelerator, model)
    save_model(cfg, accelerator, model, corpus.tokenizer, stage_dir)
    if accelerator.is_main_process:
        samples = sample_saved_model(cfg, corpus, stage_dir, accelerator.device)
        finish(cfg, run, accelerator, corpus, val_loss, n_params, checksums, samples)
    tracker.close()
    accelerator.wait_for_everyone()
