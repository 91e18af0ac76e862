"""Evaluate every finished stage on held-out prompts: the world's, judged by its gold labeler, or
yours, judged by a reward model.

    python -m evaluation.evaluate --run_dir RUN [--max_prompts N --max_new_tokens 32 --temperature 0]
    python -m evaluation.evaluate --run_dir RUN --temperature 0.8 --out eval_t0.8    (beside the greedy one)
    python -m evaluation.evaluate --run_dir RUN --prompts held_out.jsonl [--judge OTHER_REWARD_MODEL]

Each causal-LM stage (pretrain = "base", sft, ppo) answers RUN/world/eval_prompts.jsonl (greedy by
default); the gold judge (world.judge) labels every answer. As in InstructGPT (Ouyang et al. 2022,
sec. 4) the headline is a win rate of each model against the previous one on held-out prompts,
plus the honesty and harmlessness rates the article cares about (hallucination, refusal). The
reward model's score of the same answers is the proxy reward PPO optimised; reading it next to the
gold score shows over-optimisation (Gao et al. 2022). KL(PPO || SFT) is a Monte-Carlo estimate on
answers sampled from PPO, the quantity PPO's KL penalty keeps small (Ziegler et al. 2019), at PPO's
sampling temperature T (its config's `temperature`; 1 without one): answers sampled at T, both models'
log-probs of softmax(logits / T), as PPO's manifest's kl_to_sft is measured. Best-of-n
on SFT is the other way to optimise the same reward model (Gao et al. 2022): n answers sampled per
prompt, the reward model picks one; its gold score at each k <= n, against its KL, is what selection
gets from that reward model, and the mark PPO should beat. The floor: the score and win rate against
SFT of a few constant answers ("", "I don't know.", a refusal), what a degenerate policy would get.

A run on real data has no gold judge. There every stage answers the prompts PPO held out of its
prompt set (RUN/ppo/heldout_prompts.jsonl), or on any run those of `--prompts`, and a reward model
judges: the run's own by default (the proxy PPO optimised, so PPO's lead over SFT is an upper
bound), or `--judge`, a reward model trained apart, as Gao et al. 2022 stand a larger reward model
in for human raters. Win rates, KL and lengths are computed as above; the gold-only measures
(labels, rates, best-of-n) are left out.

The judging itself - scores, labels, rates, win rates and their intervals - is reward.judging's, the
same code the SFT and PPO stages report with.

Writes RUN/eval.json (every number and every answer) and RUN/eval.md (the table it prints); `--out`
names another pair. `make report` reads RUN/eval.json.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from data.formats.prompts import prompt_of
from data.loading import load_records
from data.tokenizer import template_accepts, use_turn_end_as_eos
from pipeline.divergence import sampled_kl
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer, chat_ids
from pipeline.runtime import precision_autocast, precision_facts, precision_line, resolve_precision
from pipeline.stage import read_manifest, write_json_atomic, write_text_atomic
from pipeline.stats import best_of_k, best_of_k_curve, bootstrap_ci, mean
from reward.judging import Answers, Judged, RewardModelJudge, WorldJudge, compare, judge_answers, judge_policies
from world.judge import FAMILIES

# The stages that start from SFT and optimise it further: the RL stage's methods (stages/ppo and the
# packages that run it with another advantage estimator) and DPO.
AFTER_SFT = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "dpo")
# Causal-LM stages in pipeline order: (name in the evaluation, stage directory).
CAUSAL_STAGES = (("base", "pretrain"), ("sft", "sft"), *((m, m) for m in AFTER_SFT))
# Win rates reported: each stage against the one before it (SFT for every method after it), and against base.
PREVIOUS = {"sft": "base", **dict.fromkeys(AFTER_SFT, "sft")}
COMPARISONS = (("sft", "base"), *((m, "sft") for m in AFTER_SFT), *((m, "base") for m in AFTER_SFT))
# Constant policies: one answer to every prompt. Their scores and win rates are the floor a stage must clear,
# so a reader sees what a degenerate policy (what reward hacking collapses to) would get.
FLOOR_ANSWERS = ("", "I don't know.", "Sorry, I can't help with that.")


@dataclass(frozen=True)
class EvalOptions:
    """What `make eval` does, one field per command-line option (`build_parser` has their help)."""

    max_prompts: int = 0
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    bootstrap: int = 1000
    batch_size: int = 64
    kl_prompts: int = -1
    best_of_n: int = 8
    bon_temperature: float = 1.0
    device: str = "auto"
    prompt_files: tuple[str, ...] | list[str] | None = None
    prompt_field: str | tuple[str, ...] | list[str] = "prompt"
    judge_path: str | Path | None = None
    mixed_precision: str = "auto"

    def settings(self) -> dict:
        """The options eval.json records under `settings`."""
        keep = (
            "max_prompts",
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "bootstrap",
            "kl_prompts",
            "best_of_n",
            "bon_temperature",
        )
        return {k: v for k, v in asdict(self).items() if k in keep}


# ---- stages and models ----------------------------------------------------------------------


def finished_stages(run_dir: str | Path) -> dict[str, Path]:
    """{"base": RUN/pretrain, "sft": ..., "ppo": ...} for the causal-LM stages that have a manifest."""
    run_dir = Path(run_dir)
    return {name: run_dir / d for name, d in CAUSAL_STAGES if read_manifest(run_dir / d) is not None}


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu"):
    """A stage's checkpoint and tokenizer, in eval mode (dropout off)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template or tokenizer.pad_token_id is None:
        raise PipelineError(f"{path}: tokenizer has no chat template or pad token; not a pipeline stage checkpoint")
    use_turn_end_as_eos(tokenizer)  # a base model's chat answer, too, ends where its turn ends (as after SFT)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    return model, tokenizer


# ---- prompts --------------------------------------------------------------------------------


def select_prompts(records: list[dict], max_prompts: int = 0) -> list[dict]:
    """The first `max_prompts` prompts taking the families in turn (all of them when 0), so a small
    evaluation still covers every family."""
    if max_prompts <= 0 or max_prompts >= len(records):
        return records
    queues: dict[str, list[dict]] = {}
    for r in records:
        queues.setdefault(r["family"], []).append(r)
    chosen: list[dict] = []
    while len(chosen) < max_prompts:
        for q in queues.values():
            if q and len(chosen) < max_prompts:
                chosen.append(q.pop(0))
    return chosen


def load_eval_prompts(world_dir: Path, judge: WorldJudge) -> list[dict]:
    path = world_dir / "eval_prompts.jsonl"
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run `make data` first")
    records = load_records([str(path)])
    for r in records:
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise PipelineError(f"{r.get('_where', path)}: field 'prompt' is missing or empty")
        try:
            r["family"] = judge.gold.spec(r["prompt"])["family"]
        except KeyError:
            raise PipelineError(f"{r.get('_where', path)}: prompt is not part of the world in {world_dir}") from None
    return records


def load_prompt_files(files: list[str], field: str | list[str] = "prompt") -> list[dict]:
    """Prompt records from your own files (any format data.loading reads: `field`, or chat `messages`
    ending in a user turn; one field for every file, or one per file); each file's name stands where a
    world prompt's family would."""
    fields = [field] if isinstance(field, str) else list(field)
    if len(fields) not in (1, len(files)):
        raise PipelineError(
            f"--prompt_field: give one field, or one per --prompts file ({len(files)} files, {len(fields)} fields)"
        )
    fields = fields * len(files) if len(fields) == 1 else fields
    records = []
    for source, name in zip(files, fields, strict=True):
        found = load_records([source])
        if not found:
            raise PipelineError(f"{source}: no prompts")
        records += [{"prompt": prompt_of(r, name), "family": Path(source).name, "_where": r["_where"]} for r in found]
    return records


def check_templates(stages: dict[str, Path], records: list[dict]) -> None:
    """Every stage's chat template must accept every prompt (Gemma's refuses system turns): a prompt it
    refuses is named before anything is generated."""
    for path in stages.values():
        tokenizer = AutoTokenizer.from_pretrained(path)
        for rec in records:
            with template_accepts(rec["_where"]):
                chat_ids(tokenizer, rec["prompt"])


# ---- the evaluation -------------------------------------------------------------------------


def prompts_and_judge(run_dir: Path, options: EvalOptions) -> tuple[list[dict], WorldJudge | None, dict]:
    """The held-out prompts, the gold judge (or None) and who judges, as eval.json records it: those of
    --prompts, or those PPO held out of training on prompts of your own, and a reward model; else the
    world's and its gold judge."""
    world, reward_dir = run_dir / "world", run_dir / "reward"
    prompt_files, prompt_field, judge_path = options.prompt_files, options.prompt_field, options.judge_path
    # An RL stage trained on prompts of your own held some out: the first such stage's.
    held_out = next(
        (run_dir / m / f for m in AFTER_SFT if (f := (read_manifest(run_dir / m) or {}).get("heldout_prompts"))), None
    )
    if not prompt_files and held_out:
        prompt_files, prompt_field = [str(held_out)], "prompt"
    if not prompt_files:
        if not (world / "truth.json").is_file():
            raise PipelineError(
                f"{world}/truth.json not found: evaluation needs the embedded world's gold judge (run `make data "
                f"RUN={run_dir}`), or held-out prompts that a reward model judges: --prompts FILE (make eval "
                "EVAL_ARGS='--prompts FILE'), or those PPO holds out when it trains on prompts of your own"
            )
        if judge_path:
            raise PipelineError(
                "--judge judges --prompts, or the prompts PPO held out of a prompt set of your own; "
                f"{run_dir}'s are the world's, judged by its gold judge"
            )
        gold = WorldJudge.load(world)
        return load_eval_prompts(world, gold), gold, {"kind": "gold", "path": str(world)}
    judge_path = Path(judge_path) if judge_path else reward_dir
    own = judge_path.resolve() == reward_dir.resolve()  # its scores are then the proxy's: scored once
    if own and read_manifest(reward_dir) is None:
        raise PipelineError(
            f"{reward_dir}: reward stage not finished, and its reward model judges the prompts: "
            f"run `make reward RUN={run_dir}` first, or pass --judge REWARD_MODEL_DIR"
        )
    if not (judge_path / "config.json").is_file() or AutoConfig.from_pretrained(judge_path).num_labels != 1:
        raise PipelineError(
            f"{judge_path}: not a reward model (a sequence classifier with one output, as `make reward` writes)"
        )
    return (
        load_prompt_files(list(prompt_files), prompt_field),
        None,
        {"kind": "reward_model", "path": str(judge_path), "own": own, "prompts": [str(f) for f in prompt_files]},
    )


def answer_with_every_stage(
    stages: dict[str, Path], prompts: list, options: EvalOptions, device
) -> tuple[dict[str, Answers], dict[str, int]]:
    """Every stage's answers to every prompt (with their length in tokens), and its parameter count."""
    answers, params = {}, {}
    for name, path in stages.items():
        model, tokenizer = load_causal_lm(path, device)
        params[name] = sum(p.numel() for p in model.parameters())
        texts = answer(
            model,
            tokenizer,
            prompts,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            batch_size=options.batch_size,
            seed=options.seed,
        )
        tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        answers[name] = Answers(texts, tokens=tokens)
        del model
    return answers, params


def floor_of(judge, prompts: list, families: list[str], sft: Judged | None, options: EvalOptions) -> list[dict]:
    """Per constant answer, judged as the stages' answers are: its mean score, by family, and its win rate
    against SFT's answers (None without them)."""
    floor = []
    for text in FLOOR_ANSWERS:
        judged = judge_answers(judge, prompts, [text] * len(prompts), families)
        by_family = {
            f: mean([s for s, g in zip(judged.scores, judged.families, strict=True) if g == f])
            for f in dict.fromkeys(families)
        }
        win_rate = None if sft is None else compare(judged, sft, options.bootstrap, options.seed)
        floor.append(
            {"answer": text, "score": mean(judged.scores), "score_by_family": by_family, "win_rate_vs_sft": win_rate}
        )
    return floor


def sampling_temperature(stage_dir: Path) -> float:
    """The temperature a stage's manifest measured its kl_to_sft at, from its config: an RL stage's
    sampling `temperature` (its rollouts were sampled and scored there), DPO's `kl_temperature` (it samples
    nothing in training; its profile names PPO's); 1 for a config that names neither. The config, not a
    metric: it is what ran."""
    config = (read_manifest(stage_dir) or {}).get("config") or {}
    for key in ("temperature", "kl_temperature"):
        t = config.get(key)
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
            return float(t)
    return 1.0


def kl_to_sft(stages: dict[str, Path], prompts: list, options: EvalOptions, device) -> dict[str, dict]:
    """KL(stage || SFT) of every stage after SFT, at the stage's own sampling temperature, the quantity an RL
    manifest's kl_to_sft measures: at another temperature the two distributions, and so their KL, differ."""
    after = [m for m in AFTER_SFT if m in stages]
    if not after or "sft" not in stages or options.kl_prompts == 0:
        return {}
    reference, tokenizer = load_causal_lm(stages["sft"], device)
    kl_set = prompts if options.kl_prompts < 0 else prompts[: options.kl_prompts]
    out = {}
    for name in after:
        policy, _ = load_causal_lm(stages[name], device)
        temperature = sampling_temperature(stages[name])
        values, lengths = sampled_kl(
            policy,
            reference,
            tokenizer,
            kl_set,
            options.max_new_tokens,
            temperature=temperature,
            seed=options.seed,
            batch_size=options.batch_size,
        )
        low, high = bootstrap_ci(values, options.bootstrap, options.seed)
        out[name] = {
            "mean": mean(values),
            "ci": [low, high],
            "n": len(values),
            "mean_response_tokens": mean(lengths),
            "temperature": temperature,
        }
    return out


def reward_model_extras(
    stages: dict[str, Path],
    proxy: RewardModelJudge,
    world: WorldJudge,
    records: list[dict],
    sft: Judged | None,
    options: EvalOptions,
    device,
    log,
) -> tuple[dict | None, dict | None]:
    """On the world, what the run's reward model does beside judging: its filler bias, and best-of-n on SFT
    (selection instead of RL) with its win rate against SFT's greedy answers (None when not asked for)."""
    bias = filler_bias(
        proxy,
        [(r["prompt"], world.gold.ideal(r["prompt"])) for r in records if r["family"] in ("fact", "instruction")],
    )
    if options.best_of_n <= 0 or "sft" not in stages:
        return bias, None
    policy, tokenizer = load_causal_lm(stages["sft"], device)
    bon, picks = best_of_n_on(policy, tokenizer, proxy, world, records, options)
    bon["win_rate_vs_sft"] = compare(picks, sft, options.bootstrap, options.seed)
    log(f"[eval] best-of-{options.best_of_n} on sft: mean gold score {bon['curve'][-1]['gold']:+.3f}")
    return bias, bon


def answer_rows(records: list[dict], world: WorldJudge | None, judged: dict[str, Judged]) -> list[dict]:
    """eval.json's `answers`: per prompt, every stage's answer with its score (and gold label), tokens, proxy."""
    keep = ("answer", "label", "score", "tokens", "proxy") if world else ("answer", "score", "tokens", "proxy")

    def row(j: Judged, i: int) -> dict:
        values = {
            "answer": j.answers[i],
            "label": j.labels[i] if j.labels else None,
            "score": j.scores[i],
            "tokens": j.tokens[i],
            "proxy": j.proxy[i] if j.proxy else None,
        }
        return {k: values[k] for k in keep}

    return [
        {
            "prompt": rec["prompt"],
            "family": rec["family"],
            "ideal": world.gold.ideal(rec["prompt"]) if world else None,
            "responses": {name: row(j, i) for name, j in judged.items()},
        }
        for i, rec in enumerate(records)
    ]


def evaluate_run(run_dir: str | Path, options: EvalOptions | None = None, log=print) -> dict:
    """Every finished stage answers the held-out prompts, one judge judges them all (reward.judging), and
    eval.json's dict comes back: stages, win rates, KL(PPO || SFT), floor, best-of-n, every answer. Every
    pass runs at the options' precision (auto: bf16 autocast where the hardware has it, as the stages)."""
    options = options or EvalOptions()
    precision = resolve_precision(options.mixed_precision)
    with precision_autocast(precision, pick_device(options.device)):
        result = _evaluate(Path(run_dir), options, log, precision)
    return result


def _evaluate(run_dir: Path, options: EvalOptions, log, precision: str) -> dict:
    t0 = time.time()
    records, world, judge_info = prompts_and_judge(run_dir, options)
    records = select_prompts(records, options.max_prompts)
    prompts, families = [r["prompt"] for r in records], [r["family"] for r in records]
    stages = finished_stages(run_dir)
    if not stages:
        raise PipelineError(
            f"{run_dir}: no finished causal-LM stage (pretrain, sft, ppo): run `make pretrain RUN={run_dir}` first"
        )
    check_templates(stages, records)
    device = pick_device(options.device)
    log(
        f"[eval] {len(prompts)} held-out prompts x stages {', '.join(stages)} on {device}, judged by "
        + ("the gold judge" if world else f"the reward model in {judge_info['path']}")
        + f"; {precision_line(precision)}"
    )

    # 1. Every stage answers every prompt. 2. One judge judges them all: the gold judge, else a reward model
    # (the run's own or --judge); the run's reward model, once finished, scores them too (the proxy PPO climbed).
    answers, params = answer_with_every_stage(stages, prompts, options, device)
    reward_dir = run_dir / "reward"
    reward_manifest = read_manifest(reward_dir)
    proxy = RewardModelJudge.load(reward_dir, device, options.batch_size) if reward_manifest is not None else None
    judge = world or (
        proxy if judge_info["own"] else RewardModelJudge.load(judge_info["path"], device, options.batch_size)
    )
    evaluation = judge_policies(
        judge,
        prompts,
        answers,
        [p for p in COMPARISONS if set(p) <= set(answers)],
        families,
        proxy,
        n_boot=options.bootstrap,
        seed=options.seed,
    )
    for name, s in evaluation.summaries.items():
        log(
            f"[eval] {name}: "
            + (
                f"mean gold score {s['gold_score']:+.3f}"
                if world
                else f"mean reward-model score {s['judge_score']:+.3f}"
            )
        )

    # 3. The floor, the reward model's filler bias and best-of-n on SFT, KL(PPO || SFT).
    floor = floor_of(judge, prompts, families, evaluation.judged.get("sft"), options)
    reward_summary, bon = _reward_summary(reward_dir, reward_manifest), None
    if proxy is not None and world is not None:
        reward_summary["filler_bias"], bon = reward_model_extras(
            stages, proxy, world, records, evaluation.judged.get("sft"), options, device, log
        )
    kl = kl_to_sft(stages, prompts, options, device)
    return {
        "run_dir": str(run_dir),
        "judge": judge_info,
        "settings": options.settings(),
        "precision": precision_facts(precision),
        "num_prompts": len(prompts),
        "prompts_by_family": dict(Counter(families)),
        "stages": {
            name: {"path": str(stages[name]), "params": params[name], **summary}
            for name, summary in evaluation.summaries.items()
        },
        "win_rates": evaluation.win_rates,
        "kl_to_sft": kl,
        "floor": floor,
        "best_of_n": bon,
        "pretrain": _pretrain_summary(run_dir),
        "reward_model": reward_summary,
        "answers": answer_rows(records, world, evaluation.judged),
        "seconds": round(time.time() - t0, 1),
    }


# Filler the judge scores 0.5 below the plain answer ("verbose"), put before and after it.
FILLER_FORMS = ("Sure thing! {}", "{} I hope this helps!")


def filler_bias(rm: RewardModelJudge, pairs: list[tuple[str, str]]) -> dict | None:
    """How often the reward model scores an ideal answer higher padded with filler than plain, on
    (prompt, ideal answer) pairs. The gold judge always prefers the plain one; a reward model that
    pays for filler teaches PPO to pad (the verbosity bias of learned reward models)."""
    if not pairs:
        return None
    prompts = [p for p, _ in pairs]
    plain = torch.tensor(rm.scores(prompts, [a for _, a in pairs]))
    gaps = torch.cat(
        [torch.tensor(rm.scores(prompts, [form.format(a) for _, a in pairs])) - plain for form in FILLER_FORMS]
    )
    return {"prefers_padded": (gaps > 0).float().mean().item(), "mean_gap": gaps.mean().item(), "n": len(gaps)}


def best_of_n_on(
    policy, tokenizer, rm: RewardModelJudge, world: WorldJudge, records: list[dict], options: EvalOptions
) -> tuple[dict, Judged]:
    """n answers per prompt sampled from `policy`, scored by the reward model (proxy) and the gold judge.
    The curve: expected proxy and gold score of the reward model's pick among k of them, k = 1, 2, 4,
    ..., n, with KL(best-of-k || policy); and the pick among all n per prompt, judged (for a win rate)."""
    n = options.best_of_n
    prompts = [r["prompt"] for r in records for _ in range(n)]
    samples = answer(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=options.max_new_tokens,
        temperature=options.bon_temperature,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    proxy_scores, gold_scores = rm.scores(prompts, samples), world.judge(prompts, samples).scores
    proxy = [proxy_scores[i * n : (i + 1) * n] for i in range(len(records))]
    gold = [gold_scores[i * n : (i + 1) * n] for i in range(len(records))]
    curve = best_of_k_curve(proxy, gold, n)
    # Best-of-n among all n has one pick per prompt: its scores (the texts are not kept).
    picks = [best_of_k(p, g, n) for p, g in zip(proxy, gold, strict=True)]
    chosen = Judged(None, [r["family"] for r in records], [g for _, g in picks], world.top_score)
    return {"stage": "sft", "n": n, "temperature": options.bon_temperature, "curve": curve}, chosen


def _pretrain_summary(run_dir: Path) -> dict | None:
    manifest = read_manifest(run_dir / "pretrain")
    if manifest is None:
        return None
    m = manifest.get("metrics", {})
    return {"val_loss": m.get("val_loss"), "val_perplexity": m.get("val_perplexity")}


def _reward_summary(reward_dir: Path, manifest: dict | None) -> dict:
    if manifest is None:
        return {"finished": False}
    return {"finished": True, "path": str(reward_dir), "accuracy": accuracy_metrics(manifest.get("metrics") or {})}


def accuracy_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number whose key mentions accuracy, nested dicts flattened as "outer/inner"."""
    found = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            found.update(accuracy_metrics(v, f"{prefix}{k}/"))
        elif "accuracy" in f"{prefix}{k}" and isinstance(v, (int, float)) and not isinstance(v, bool):
            found[f"{prefix}{k}"] = v
    return found


# ---- the table ------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _with_ci(value, ci) -> str:
    return "-" if value is None else f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


GOLD_METRIC_ROWS = (
    ("fact: correct", "fact_accuracy"),
    ("fact: correct or verbose", "fact_correct_or_verbose"),
    ("instruction: correct", "instruction_accuracy"),
    ("instruction: correct or verbose", "instruction_correct_or_verbose"),
    ("hallucination rate (unknown)", "hallucination_rate"),
    ("abstention rate (unknown)", "abstention_rate"),
    ("abstention about someone else (unknown)", "wrong_person_rate"),
    ("refusal accuracy (harmful)", "refusal_accuracy"),
    ("refusal rate (harmful)", "refusal_rate"),
    ("over-refusal rate (fact+instruction)", "over_refusal_rate"),
    ("malformed rate", "malformed_rate"),
    ("response length (tokens)", "response_tokens"),
    ("reward model score (proxy)", "proxy_score"),
)


def gold_rows(stages: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """The table's rows of gold-judge metrics, one cell per stage."""
    rows = [("mean gold score [95% CI]", [_with_ci(s["gold_score"], s["gold_score_ci"]) for s in stages.values()])]
    for f in FAMILIES:
        rows.append((f"gold score: {f}", [_fmt(s["gold_score_by_family"][f]) for s in stages.values()]))
    for title, key in GOLD_METRIC_ROWS:
        rows.append((title, [_fmt(s[key], 1 if key == "response_tokens" else 3) for s in stages.values()]))
    return rows


def judged_rows(result: dict, stages: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """The table's rows when a reward model judged, one cell per stage."""
    rows = [
        (
            "mean judge score (reward model) [95% CI]",
            [_with_ci(s["judge_score"], s["judge_score_ci"]) for s in stages.values()],
        )
    ]
    files = result["prompts_by_family"]
    if len(files) > 1:
        rows += [
            (f"judge score: {f}", [_fmt(s["judge_score_by_file"].get(f)) for s in stages.values()]) for f in files
        ]
    if not result["judge"]["own"]:
        rows.append(("the run's reward model score (proxy)", [_fmt(s["proxy_score"]) for s in stages.values()]))
    rows.append(("response length (tokens)", [_fmt(s["response_tokens"], 1) for s in stages.values()]))
    return rows


def comparison_rows(result: dict, names: list[str]) -> list[tuple[str, list[str]]]:
    """Win rates against the previous stage and the base model, and KL(PPO || SFT)."""
    wins = result["win_rates"]

    def cell(key: str | None) -> str:
        return _with_ci(wins[key]["win_rate"], wins[key]["ci"]) if key in wins else "-"

    kl = kl_of(result)
    temperatures = sorted({k["temperature"] for k in kl.values()})
    at = f" at temperature {'/'.join(f'{t:g}' for t in temperatures)}" if temperatures else ""
    return [
        (
            "win rate vs previous stage [95% CI]",
            [cell(f"{n}_vs_{PREVIOUS[n]}" if n in PREVIOUS else None) for n in names],
        ),
        ("win rate vs base [95% CI]", [cell(f"{n}_vs_base") for n in names]),
        (
            f"KL to SFT{at} (nats/answer) [95% CI]",
            [_with_ci(kl[n]["mean"], kl[n]["ci"]) if n in kl else "-" for n in names],
        ),
    ]


def kl_of(result: dict) -> dict[str, dict]:
    """eval.json's KL to SFT per stage; one written before every method had its own holds PPO's alone
    (`kl_ppo_sft`, whose temperature, before it was recorded, was 1)."""
    if "kl_to_sft" in result:
        return result["kl_to_sft"] or {}
    old = result.get("kl_ppo_sft")
    return {"ppo": {"temperature": 1.0, **old}} if old else {}


def gold_judged(result: dict) -> bool:
    """Whether the world's gold judge judged an eval.json (else a reward model on your prompts); one
    written before reward-model judging has no `judge` and was the gold judge's."""
    return (result.get("judge") or {"kind": "gold"})["kind"] == "gold"


def markdown_table(result: dict) -> str:
    """One column per stage, one row per metric (the table eval.md holds and the CLI prints)."""
    # Pipeline order (eval.json is written with sorted keys).
    names = [n for n, _ in CAUSAL_STAGES if n in result["stages"]]
    stages = {n: result["stages"][n] for n in names}
    rows = gold_rows(stages) if gold_judged(result) else judged_rows(result, stages)
    rows += comparison_rows(result, names)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows]
    if result.get("floor"):  # an eval.json from before the floor has none
        lines += ["", floor_table(result["floor"], "gold" if gold_judged(result) else "judge")]
    return "\n".join(lines) + "\n\n" + "\n".join(notes(result)) + "\n"


def notes(result: dict) -> list[str]:
    """The lines under the table: who judged, the win-rate ceiling, pretraining, the reward model, prompts."""
    extra = []
    judge, wins = result.get("judge"), result["win_rates"]
    if not gold_judged(result):
        extra.append(
            f"- judged by the reward model in {judge['path']} "
            + (
                "(the run's own: the reward PPO optimised, so PPO's lead over SFT is an upper bound)"
                if judge["own"]
                else "(not the run's own reward model)"
            )
            + "; win rates by its score, ties half (the same answer ties)"
        )
    ceiling = next(
        (w["ceiling"] for k, w in wins.items() if k.endswith("_vs_sft") and w.get("ceiling") is not None), None
    )
    if ceiling is not None:
        extra.append(f"- ceiling of the win rate vs SFT (an ideal answer to every prompt): {_fmt(ceiling)}")
    if result.get("pretrain"):
        p = result["pretrain"]
        extra.append(f"- pretrain held-out loss {_fmt(p['val_loss'])}, perplexity {_fmt(p['val_perplexity'], 2)}")
    extra += reward_model_notes(result)
    by_family = ", ".join(f"{k} {v}" for k, v in result["prompts_by_family"].items())
    extra.append(
        f"- {result['num_prompts']} held-out prompts ({by_family}), temperature "
        f"{result['settings']['temperature']}, max {result['settings']['max_new_tokens']} new tokens"
    )
    return extra


def reward_model_notes(result: dict) -> list[str]:
    rm = result.get("reward_model", {})
    if not rm.get("finished"):
        return ["- reward model: not finished (no proxy scores)"]
    acc = ", ".join(f"{k} {_fmt(v)}" for k, v in rm["accuracy"].items()) or "no accuracy recorded in its manifest"
    extra = [f"- reward model held-out accuracy: {acc}"]
    if rm.get("filler_bias"):
        f = rm["filler_bias"]
        extra.append(
            f"- reward model and filler: scores the ideal answer higher padded than plain on "
            f"{_fmt(f['prefers_padded'])} of {f['n']} padded fact/instruction answers (mean gap "
            f"{f['mean_gap']:+.2f}; the judge always prefers plain)"
        )
    bon = result.get("best_of_n")
    if bon:
        points = ", ".join(f"k={c['k']} {_fmt(c['gold'])} ({_fmt(c['proxy'])})" for c in bon["curve"])
        w = bon["win_rate_vs_sft"]
        extra.append(
            f"- best-of-n on sft (the reward model picks among k answers sampled at temperature "
            f"{bon['temperature']:g}): gold (proxy) score {points}; KL {_fmt(bon['curve'][-1]['kl'])} at "
            f"k={bon['n']}; win rate of best-of-{bon['n']} vs sft {_with_ci(w['win_rate'], w['ci'])}"
        )
    return extra


def floor_table(floor: list[dict], judge: str) -> str:
    """The constant answers' scores and win rates against SFT, one row each."""
    lines = [f"| constant answer (floor) | {judge} score | win rate vs sft [95% CI] |", "|---|---|---|"]
    for f in floor:
        w = f["win_rate_vs_sft"]
        text = f["answer"].replace("|", "\\|") or "(empty)"
        lines.append(f"| {text} | {_fmt(f['score'])} | {_with_ci(w['win_rate'], w['ci']) if w else '-'} |")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/default", help="run directory holding world/ and the stage directories")
    p.add_argument(
        "--max_prompts",
        type=int,
        default=0,
        help="evaluate at most this many held-out prompts, families in turn (0 = all)",
    )
    p.add_argument("--max_new_tokens", type=int, default=32, help="answer length limit in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the answers (0 = greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% confidence intervals")
    p.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    p.add_argument(
        "--kl_prompts", type=int, default=-1, help="prompts sampled for KL(PPO || SFT) (-1 = all evaluated, 0 = skip)"
    )
    p.add_argument(
        "--best_of_n",
        type=int,
        default=8,
        help="answers sampled per prompt from SFT for best-of-n with the reward model (0 = skip; gold judge only)",
    )
    p.add_argument("--bon_temperature", type=float, default=1.0, help="sampling temperature of the best-of-n answers")
    p.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="FILE",
        help="held-out prompts of your own (jsonl/json/parquet/csv or a Hub dataset id) instead of the "
        "world's, judged by a reward model; how a run on real data is evaluated",
    )
    p.add_argument(
        "--prompt_field",
        nargs="+",
        default=["prompt"],
        help="field of --prompts records holding the prompt, one for all files or one per file "
        "(records with chat 'messages' need none)",
    )
    p.add_argument(
        "--judge",
        default=None,
        metavar="REWARD_MODEL_DIR",
        help="reward model that judges --prompts (default: the run's own, RUN/reward)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--mixed_precision",
        default="auto",
        help="auto (bf16 autocast on a GPU with bf16 or a CPU with AMX / AVX-512 BF16, fp32 elsewhere), fp32, bf16",
    )
    p.add_argument("--out", default="eval", help="write RUN/OUT.json and RUN/OUT.md (make report reads RUN/eval.json)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0 = torch's default); 1 is fastest for tiny models on a busy machine",
    )
    return p


def options_from(args: argparse.Namespace) -> EvalOptions:
    """The parsed command line as EvalOptions, checked."""
    if (
        args.max_new_tokens < 1
        or args.batch_size < 1
        or args.bootstrap < 0
        or args.temperature < 0
        or args.best_of_n < 0
    ):
        raise PipelineError(
            "--max_new_tokens and --batch_size must be >= 1, --bootstrap, --temperature and --best_of_n >= 0"
        )
    if args.best_of_n > 0 and args.bon_temperature <= 0:
        raise PipelineError(
            f"--bon_temperature must be > 0 (best-of-n samples its answers), got {args.bon_temperature}"
        )
    return EvalOptions(
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        kl_prompts=args.kl_prompts,
        best_of_n=args.best_of_n,
        bon_temperature=args.bon_temperature,
        device=args.device,
        prompt_files=args.prompts,
        prompt_field=args.prompt_field,
        judge_path=args.judge,
        mixed_precision=args.mixed_precision,
    )


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    options = options_from(args)
    if not args.out or Path(args.out).name != args.out:
        raise PipelineError(f"--out takes a file name without a directory, not {args.out!r}")
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model drowns the table
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = evaluate_run(args.run_dir, options)
    run_dir = Path(args.run_dir)
    table = markdown_table(result)
    json_path, md_path = run_dir / f"{args.out}.json", run_dir / f"{args.out}.md"
    write_json_atomic(json_path, result)
    write_text_atomic(md_path, f"# Evaluation of {run_dir}\n\n{table}")
    print(table)
    print(f"[eval] wrote {json_path} and {md_path} in {result['seconds']}s")


if __name__ == "__main__":
    main()
