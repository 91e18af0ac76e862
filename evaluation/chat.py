"""Talk to a stage's checkpoint, or put one prompt to every stage side by side.

    python -m evaluation.chat --model RUN/ppo [--temperature 0.8 --top_p 0.95 --max_new_tokens 64 --seed S
                                               --system TEXT]
    python -m evaluation.chat --run_dir RUN --compare "Who is Zoe Marsh?" [--samples 3]

Chat keeps the conversation (multi-turn, through the checkpoint's own chat template) and streams the
answer token by token; it reads lines from stdin until EOF or "/quit" ("/reset" forgets the history),
so it can be driven by a pipe. Compare samples each finished causal-LM stage (the article's point:
an answer is a sample, temperature decides how adventurous) and, for a prompt of the embedded world,
shows the gold judge's label and, once a reward model exists, its score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, TextStreamer
from transformers.utils import logging as hf_logging

from data.tokenizer import template_accepts
from evaluation.evaluate import finished_stages, load_causal_lm, pick_device
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer, chat_ids, max_prompt_tokens
from pipeline.stage import read_manifest, resolve_init
from reward.model import load_reward_model, score
from world.judge import GoldJudge


def check_chat_model(path: str) -> str:
    """A causal LM to chat with: a finished stage, a plain checkpoint dir, or a Hub id (not a reward model)."""
    path, manifest = resolve_init(path)
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if (manifest or {}).get("stage") == "reward" or any("SequenceClassification" in a for a in architectures):
        raise PipelineError(f"{path} is a reward model (scores answers, does not write them): chat with sft or ppo")
    return path


@torch.no_grad()
def reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float, stream: bool = True
) -> str:
    """Generate the next assistant turn for `messages`, printing it as it is produced."""
    limit = max(1, max_prompt_tokens(model, max_new_tokens))
    ids = torch.tensor([fit_conversation(tokenizer, messages, limit)], device=model.device)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if temperature > 0
        else dict(do_sample=False)
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def fit_conversation(tokenizer, messages: list[dict], limit: int) -> list[int]:
    """Token ids of the conversation within `limit`: the oldest exchanges fall off whole, a system turn
    stays; a last turn longer than the limit alone is cut from the left."""
    system, turns = (messages[:1], messages[1:]) if messages and messages[0]["role"] == "system" else ([], messages)
    ids = chat_ids(tokenizer, system + turns)
    while len(ids) > limit and len(turns) > 2:
        turns = turns[2:]  # the oldest user turn and the answer to it
        ids = chat_ids(tokenizer, system + turns)
    return ids[-limit:]


def chat(args) -> None:
    path = check_chat_model(args.model)
    model, tokenizer = load_causal_lm(path, pick_device(args.device))
    interactive = sys.stdin.isatty()
    print(
        f"chatting with {path} (temperature {args.temperature}, top_p {args.top_p}); "
        "/reset forgets the conversation, /quit or Ctrl-D ends",
        flush=True,
    )
    opening = [{"role": "system", "content": args.system}] if args.system else []
    if opening:
        with template_accepts("--system"):  # Gemma's template, for one, has no system turn
            chat_ids(tokenizer, opening + [{"role": "user", "content": "Hi"}])
    messages = list(opening)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive:
            if not line:  # EOF
                break
            print(f"you> {line.rstrip()}", flush=True)  # a piped transcript reads like a typed one
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = list(opening)
            print("(conversation forgotten)", flush=True)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        text = reply(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.top_p)
        if not text:
            print("(empty answer)", flush=True)
        messages.append({"role": "assistant", "content": text})


def compare(args) -> None:
    run_dir = Path(args.run_dir)
    stages = finished_stages(run_dir)
    if not stages:
        raise PipelineError(
            f"{run_dir}: no finished causal-LM stage (pretrain, sft, ppo): run `make pretrain RUN={run_dir}` first"
        )
    device = pick_device(args.device)
    prompt = args.compare
    verdict_of = None
    if (run_dir / "world" / "truth.json").is_file():
        judge = GoldJudge.load(run_dir / "world")
        try:
            spec = judge.spec(prompt)
            print(f"prompt: {prompt!r}  [world prompt: family {spec['family']}; ideal {spec['ideal']!r}]")
            verdict_of = lambda text: judge.judge(prompt, text)  # noqa: E731
        except KeyError:
            print(f"prompt: {prompt!r}  [not a prompt of the world: no gold label]")
    else:
        print(f"prompt: {prompt!r}")
    answers = {}
    for name, path in stages.items():
        model, tokenizer = load_causal_lm(path, device)
        answers[name] = answer(
            model,
            tokenizer,
            [prompt] * args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        del model
    proxy = {}
    if read_manifest(run_dir / "reward") is not None:
        rm, rm_tok = load_reward_model(run_dir / "reward", device)
        proxy = {name: score(rm, rm_tok, [prompt] * len(texts), texts).tolist() for name, texts in answers.items()}
    for name, texts in answers.items():
        print(f"\n== {name} ({stages[name]}) ==")
        for i, text in enumerate(texts):
            notes = []
            if verdict_of is not None:
                v = verdict_of(text)
                notes.append(f"gold: {v.label} {v.score:+.2f}")
            if name in proxy:
                notes.append(f"reward model: {proxy[name][i]:+.3f}")
            tag = f"[{i + 1}] " if len(texts) > 1 else ""
            print(f"{tag}{text or '(empty answer)'}" + (f"   ({'; '.join(notes)})" if notes else ""))
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="stage dir (RUN/sft, RUN/ppo, ...), plain checkpoint dir or Hub id to chat with")
    p.add_argument("--run_dir", default="runs/default", help="run directory whose stages --compare asks")
    p.add_argument("--system", default="", help="chat: a system turn that opens the conversation (kept by /reset)")
    p.add_argument("--compare", metavar="PROMPT", help="answer PROMPT with every finished stage side by side")
    p.add_argument("--samples", type=int, default=1, help="answers per stage with --compare")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument(
        "--top_p", type=float, default=0.95, help="nucleus sampling: smallest token set with this much probability"
    )
    p.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit in tokens")
    p.add_argument(
        "--seed", type=int, default=None, help="seed for reproducible samples (default: different every run)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda ...")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.compare is None):
        raise PipelineError("give either --model STAGE_DIR (chat) or --compare PROMPT (with --run_dir)")
    if args.samples < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise PipelineError("--samples and --max_new_tokens must be >= 1 and --temperature >= 0")
    hf_logging.disable_progress_bar()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    chat(args) if args.model else compare(args)


if __name__ == "__main__":
    main()
