"""Comparison collection for the reward model: sample K answers per prompt from the SFT policy, rank them
with the world's labeler, and round-trip rankings through human labelers.

    python -m reward.comparisons sample --run_dir RUN [--k 4 --prompts 200 --temperature 1.0]
    python -m reward.comparisons export --run_dir RUN --out to_rank.jsonl
    python -m reward.comparisons import --file ranked.jsonl --out RUN/comparisons/human_comparisons.jsonl

What it writes is a K-wise comparison file (`prompt`, `responses`, `ranking` best first); the formats the
reward stage reads, and `load_groups`, are data.formats.comparisons.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from data.formats.comparisons import _kwise, _prompt, _responses
from data.formats.fields import require_text
from data.loading import load_records
from pipeline.errors import PipelineError, cli_main
from pipeline.runtime import precision_autocast, precision_line, resolve_precision
from pipeline.stage import (
    file_sha256,
    manifest_hash,
    portable,
    read_manifest,
    require_stage,
    resolve_init,
    write_json_atomic,
    write_text_atomic,
)

# ---- files ------------------------------------------------------------------------------------


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> Path:
    """All records or nothing (the loader's `_where` bookkeeping dropped)."""
    return write_text_atomic(
        path,
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "_where"}, ensure_ascii=False, sort_keys=True) + "\n"
            for r in records
        ),
    )


# ---- collection from the SFT policy (InstructGPT: labelers rank K samples of the current model) ----


def distinct(texts: list[str]) -> list[str]:
    """Non-empty answers, each once (first occurrence): a labeler cannot rank an answer against itself."""
    seen, out = set(), []
    for t in texts:
        key = t.strip()
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def sample(args) -> None:
    # Over 80 lines as formatted: one pass (load, sample, rank, write) read top to bottom, each step a few lines.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import answer
    from world.judge import GoldJudge

    run_dir = Path(args.run_dir)
    model_dir = Path(args.model) if args.model else run_dir / "sft"
    if args.model:
        resolve_init(str(model_dir))
    else:
        require_stage(model_dir, "sft", run_dir)
    world = Path(args.world or run_dir / "world")
    try:
        judge = GoldJudge.load(world)
    except FileNotFoundError as e:
        raise PipelineError(str(e)) from None
    prompts_file = args.prompts_file or str(world / "comparisons_train.jsonl")
    records = load_records(prompts_file)
    for r in records:
        try:
            judge.spec(require_text(r, "prompt"))
        except KeyError:
            raise PipelineError(
                f"{r['_where']}: prompt is not part of the world in {world}; the gold judge ranks "
                f"only world prompts (rank others yourself: export, then import)"
            ) from None
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[: args.prompts] if args.prompts else prompts
    if args.k < 2:
        raise PipelineError(f"--k must be >= 2, got {args.k}")
    # Same policy, world, prompts and options as the file on disk: nothing to do (`make all` reruns).
    out_path = Path(args.out or run_dir / "comparisons" / "policy_comparisons.jsonl")
    meta_path = out_path.with_name(out_path.stem + ".meta.json")
    options = {
        k: getattr(args, k) for k in ("prompts", "k", "temperature", "top_p", "max_new_tokens", "noise", "seed")
    }
    precision = resolve_precision(args.mixed_precision)
    if precision != "no":  # keyed only when not fp32, so files sampled before the option stay up to date
        options["mixed_precision"] = precision
    key = {
        "model": portable(str(model_dir), run_dir),
        "model_manifest": manifest_hash(read_manifest(model_dir)),
        "model_weights_mtime": max((p.stat().st_mtime for p in model_dir.glob("*.safetensors")), default=None),
        "truth": file_sha256(world / "truth.json"),
        "prompts_file": file_sha256(prompts_file),
        "options": options,
    }
    if not args.force and out_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == key:
        print(f"[comparisons] up to date: {out_path} (same policy, prompts and options; --force resamples)")
        return

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # K samples per prompt in one pass (prompt repeated K times), seeded: the same call gives the same file.
    print(f"[comparisons] sampling {len(prompts)} prompts x {args.k} from {model_dir}; {precision_line(precision)}")
    with precision_autocast(precision, model.device):
        answers = answer(
            model,
            tokenizer,
            [p for p in prompts for _ in range(args.k)],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    rng = random.Random(f"{args.seed}/labeler")
    out, dropped, labels = [], 0, Counter()
    for n, prompt in enumerate(prompts):
        responses = distinct(answers[n * args.k : (n + 1) * args.k])
        dropped += args.k - len(responses)
        if len(responses) < 2:
            continue
        verdicts = [judge.judge(prompt, r) for r in responses]
        labels.update(v.label for v in verdicts)
        scores = [v.score for v in verdicts]
        out.append(
            {
                "prompt": prompt,
                "responses": responses,
                "family": judge.spec(prompt)["family"],
                "ranking": judge.order(scores, rng=rng, noise=args.noise),
                "gold_ranking": judge.order(scores, noise=0),
            }
        )
    if not out:
        raise PipelineError(
            f"every prompt got fewer than 2 distinct answers from {model_dir}; raise --temperature or --k"
        )
    meta_path.unlink(missing_ok=True)  # a kill between the two writes leaves no stale "up to date"
    path = write_jsonl_atomic(out_path, out)
    write_json_atomic(meta_path, key)
    k_mean = sum(len(r["responses"]) for r in out) / len(out)
    print(
        f"[comparisons] {len(out)} groups (mean K {k_mean:.2f}; {dropped} duplicate/empty answers dropped, "
        f"{len(prompts) - len(out)} prompts left with < 2 answers) -> {path}"
    )
    print("[comparisons] gold labels of the samples: " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))


def export(args) -> None:
    source = args.file or str(Path(args.run_dir) / "comparisons" / "policy_comparisons.jsonl")
    out = []
    for rec in load_records(source):
        responses = _responses(rec, "responses", rec.get("responses"))
        out.append({"prompt": _prompt(rec), "responses": responses, "ranking": []})
    path = write_jsonl_atomic(args.out, out)
    print(
        f"[comparisons] {len(out)} groups to rank -> {path}: fill each 'ranking' with the response indices, best first"
    )


def import_(args) -> None:
    records = load_records(args.file)
    if not records:
        raise PipelineError(f"{args.file}: no records")
    out = []
    for rec in records:
        if "responses" not in rec:
            raise PipelineError(f"{rec['_where']}: missing field 'responses'")
        _kwise(rec)  # validates prompt, responses, ranking (raises on the first problem)
        out.append({k: v for k, v in rec.items() if k != "_where"})
    path = write_jsonl_atomic(args.out, out)
    print(f"[comparisons] {len(out)} ranked groups -> {path}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the pipeline
        raise PipelineError(f"bad option: {message}")


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m reward.comparisons", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "sample", help="sample K answers per prompt from RUN/sft and rank them with the world's gold labeler"
    )
    s.add_argument("--run_dir", default="runs/default", help="run directory (reads RUN/sft and RUN/world)")
    s.add_argument(
        "--model", default=None, help="policy to sample from (default RUN/sft; e.g. RUN/ppo for another round)"
    )
    s.add_argument("--world", default=None, help="world directory with truth.json (default RUN/world)")
    s.add_argument(
        "--prompts_file", default=None, help="prompts to answer (default RUN/world/comparisons_train.jsonl)"
    )
    s.add_argument("--prompts", type=int, default=200, help="how many prompts (0 = all)")
    s.add_argument("--k", type=int, default=4, help="answers sampled per prompt (duplicates are dropped)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    s.add_argument("--max_new_tokens", type=int, default=48, help="answer length limit")
    s.add_argument("--batch_size", type=int, default=64, help="generation batch size")
    s.add_argument("--noise", type=float, default=None, help="labeler noise (default: the world's)")
    s.add_argument("--seed", type=int, default=0, help="sampling and labeler seed")
    s.add_argument(
        "--mixed_precision", default="auto", help="auto (bf16 autocast where the CPU or GPU has bf16), fp32, bf16"
    )
    s.add_argument("--out", default=None, help="output (default RUN/comparisons/policy_comparisons.jsonl)")
    s.add_argument("--force", action="store_true", help="resample even if the output is up to date")
    e = sub.add_parser("export", help="write a file of groups for human ranking (empty rankings)")
    e.add_argument("--run_dir", default="runs/default", help="run directory")
    e.add_argument("--file", default=None, help="groups to export (default RUN/comparisons/policy_comparisons.jsonl)")
    e.add_argument("--out", required=True, help="file to write")
    i = sub.add_parser("import", help="validate human rankings and write a K-wise comparison file")
    i.add_argument("--file", required=True, help="ranked file (prompt, responses, ranking best first)")
    i.add_argument("--out", required=True, help="K-wise comparison file to write")
    args = parser.parse_args(argv)
    {"sample": sample, "export": export, "import": import_}[args.command](args)


if __name__ == "__main__":
    main()
