"""The run report: every stage side by side, in Markdown with PNG plots.

    python -m evaluation.report --run_dir RUN      # -> RUN/report.md and RUN/report/*.png

Training curves come from each stage's metrics.jsonl, headline numbers from the manifests, the
evaluation table and sample answers from RUN/eval.json (`make eval` writes it). The PPO plots put
the proxy reward the policy climbs next to the gold score it is meant to stand for and the KL it
spends: when the proxy keeps rising while the gold score stalls or falls, the reward model is being
over-optimised (Gao et al. 2022), the reason InstructGPT keeps a KL penalty to the SFT policy.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.evaluate import AFTER_SFT, CAUSAL_STAGES, accuracy_metrics, gold_judged, markdown_table  # noqa: E402
from pipeline.errors import PipelineError, cli_main  # noqa: E402
from pipeline.stage import read_manifest  # noqa: E402
from pipeline.tracking import read_metrics  # noqa: E402
from world.judge import FAMILIES  # noqa: E402

STAGES = ("pretrain", "sft", "reward", *AFTER_SFT)
# Stages the report lists only once they ran (`make all` runs PPO; the other methods are optional).
OPTIONAL = tuple(m for m in AFTER_SFT if m != "ppo")
RL_TITLES = {
    "ppo": "PPO (RLHF)",
    "grpo": "GRPO (RL without a critic)",
    "dr_grpo": "Dr. GRPO (RL without a critic)",
    "rloo": "RLOO (RL without a critic)",
    "reinforce_pp": "REINFORCE++ (RL without a critic)",
}
EVAL_NAME = dict((d, name) for name, d in CAUSAL_STAGES)  # stage dir -> name in eval.json ("pretrain" -> "base")
SAMPLES_PER_FAMILY = 2
SAMPLES_PER_FILE = 8  # of your own prompts (`make eval EVAL_ARGS='--prompts FILE'`)


# ---- data -----------------------------------------------------------------------------------


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that logged `key` as a finite number (HF Trainer logs training and
    evaluation in separate rows; NaN is stored as a string and is skipped)."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r.get("step", len(steps)))
            values.append(float(v))
    return steps, values


def keys_containing(rows: list[dict], word: str) -> list[str]:
    return sorted({k for r in rows for k in r if word in k})


def stage_names(result: dict) -> list[str]:
    """The evaluated causal-LM stages in pipeline order (eval.json is written with sorted keys)."""
    return [n for n, _ in CAUSAL_STAGES if n in (result.get("stages") or {})]


# ---- plots ----------------------------------------------------------------------------------


def saved(fig, path: Path) -> bool:
    """Write the figure as a PNG at `path` and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_panels(path: Path, title: str, panels: list[dict]) -> bool:
    """One subplot per panel {title, lines: [(label, key)], twin: [(label, key)], rows, xlabel, hlines};
    panels without data are dropped. Returns False (and writes nothing) when no panel has data."""
    panels = [
        p for p in panels if any(p["rows"] and series(p["rows"], k)[0] for _, k in p["lines"] + p.get("twin", []))
    ]
    if not panels:
        return False
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.4 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels, strict=False):  # a grid may hold more axes than panels
        handles = []
        for label, key in p["lines"]:
            x, y = series(p["rows"], key)
            if x:
                handles += ax.plot(x, y, marker="." if len(x) < 30 else None, label=label)
        for i, (label, value) in enumerate(p.get("hlines", [])):
            handles.append(ax.axhline(value, linestyle="--", color=f"C{5 + i}", linewidth=1, label=label))
        if p.get("twin"):
            twin = ax.twinx()
            for i, (label, key) in enumerate(p["twin"]):
                x, y = series(p["rows"], key)
                if x:
                    handles += twin.plot(
                        x, y, color=f"C{3 + i}", linestyle=":", marker="." if len(x) < 30 else None, label=label
                    )
            twin.set_ylabel(", ".join(label for label, _ in p["twin"]))
        ax.set_title(p["title"])
        ax.set_xlabel(p.get("xlabel", "step"))
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return saved(fig, path)


def plot_scatter_vs_kl(ax, rows: list[dict], bon: dict | None = None) -> None:
    """Proxy and gold score against KL to the SFT policy: Gao et al.'s over-optimisation view, with
    best-of-n on SFT (the evaluation's) as the selection curve beside PPO's points."""
    pairs = [(r["objective/kl"], r) for r in rows if isinstance(r.get("objective/kl"), (int, float))]
    lines = (("PPO proxy (objective/score)", "objective/score"), ("PPO gold/score (greedy)", "gold/score"))
    for i, (label, key) in enumerate(lines):
        pts = [(kl, r[key]) for kl, r in pairs if isinstance(r.get(key), (int, float))]
        if pts:  # points, not a line: KL does not grow monotonically over updates
            ax.scatter(*zip(*pts, strict=True), color=f"C{i}", label=label, alpha=0.7, s=18)
    if bon and bon.get("curve"):
        kls = [c["kl"] for c in bon["curve"]]
        for i, key in enumerate(("proxy", "gold")):
            label = f"best-of-k {key} (k={bon['curve'][0]['k']}..{bon['n']}, sft sampled at T={bon['temperature']:g})"
            ax.plot(
                kls,
                [c[key] for c in bon["curve"]],
                color=f"C{i}",
                linestyle="--",
                marker="s",
                markersize=4,
                label=label,
            )
    ax.set_xlabel("KL(policy || SFT)")
    ax.set_title("reward vs KL spent")
    ax.grid(alpha=0.3)
    if ax.collections or ax.get_lines():
        ax.legend(fontsize=7)
    if not ax.collections:
        not_logged(ax, "objective/kl")


def not_logged(ax, key: str) -> None:
    ax.text(
        0.5,
        0.06,
        f"{key} not logged",
        ha="center",
        va="bottom",
        transform=ax.transAxes,
        color="grey",
        bbox={"facecolor": "white", "edgecolor": "none"},
    )


def plot_ppo_overoptimisation(path: Path, rows: list[dict], bon: dict | None = None) -> bool:
    if not any(k in r for r in rows for k in ("objective/score", "gold/score", "objective/kl")):
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    (a, b), (c, d) = axes
    for label, key in (
        ("objective/score (proxy, with penalties)", "objective/score"),
        ("gold/proxy_score (RM on gold batch)", "gold/proxy_score"),
    ):
        x, y = series(rows, key)
        if x:
            a.plot(x, y, label=label)
    twin = a.twinx()
    x, y = series(rows, "gold/score")
    if x:
        twin.plot(x, y, color="C3", linestyle=":", marker=".", label="gold/score")
    else:
        not_logged(a, "gold/score")
    twin.set_ylabel("gold score")
    a.set_ylabel("reward model score")
    a.set_title("proxy reward vs gold score")
    a.legend(handles=a.get_lines() + twin.get_lines(), fontsize=8)
    for key, ax, ylabel in (("objective/kl", b, "KL"), ("gold/hallucination_rate", c, "hallucination rate")):
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, label=key)
        else:
            not_logged(ax, key)
        ax.set_ylabel(ylabel)
        ax.set_title(key)
    x, y = series(rows, "objective/kl_coef")
    if x and max(y) > min(y):  # the adaptive controller's coefficient, beside the KL it steers by
        t = b.twinx()
        t.plot(x, y, color="C4", linestyle=":", label="kl_coef")
        t.set_ylabel("kl_coef")
    elif x:  # a fixed coefficient is one number, not a curve
        b.set_title(f"objective/kl (fixed kl_coef {y[0]:g})")
    plot_scatter_vs_kl(d, rows, bon)
    for ax in (a, b, c):
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
    fig.suptitle("PPO: proxy reward, gold score and KL (over-optimisation)")
    return saved(fig, path)


def plot_eval(path: Path, result: dict) -> bool:
    """Gold score per family and the honesty/harmlessness rates, one bar per stage."""
    stages = result.get("stages") or {}
    if not stages:
        return False
    names = stage_names(result)
    if not gold_judged(result):
        return plot_judged_eval(path, result, names)
    width = 0.8 / len(names)
    rates = (
        ("hallucination", "hallucination_rate"),
        ("refusal acc.", "refusal_accuracy"),
        ("over-refusal", "over_refusal_rate"),
        ("fact correct", "fact_accuracy"),
        ("instr. correct", "instruction_accuracy"),
        ("malformed", "malformed_rate"),
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    for i, n in enumerate(names):
        s = stages[n]
        a.bar(
            [j + i * width for j in range(len(FAMILIES) + 1)],
            [s["gold_score"]] + [s["gold_score_by_family"][f] or 0.0 for f in FAMILIES],
            width,
            label=n,
        )
        b.bar([j + i * width for j in range(len(rates))], [s[k] or 0.0 for _, k in rates], width, label=n)
    a.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(FAMILIES) + 1)], ["all", *FAMILIES])
    a.set_title("mean gold score (held-out prompts)")
    a.axhline(0, color="black", linewidth=0.5)
    a.set_ylim(-1.05, 1.05)  # the gold judge scores in [-1, 1]
    b.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rates))], [t for t, _ in rates], fontsize=8)
    b.set_ylim(0, 1)
    b.set_title("rates")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return saved(fig, path)


def plot_judged_eval(path: Path, result: dict, names: list[str]) -> bool:
    """Mean reward-model score per stage with its 95% interval, and the answers' length."""
    stages = result["stages"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    means = [stages[n]["judge_score"] for n in names]
    errors = [
        [m - stages[n]["judge_score_ci"][0] for n, m in zip(names, means, strict=True)],
        [stages[n]["judge_score_ci"][1] - m for n, m in zip(names, means, strict=True)],
    ]
    a.bar(names, means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
    a.axhline(0, color="black", linewidth=0.5)
    a.set_title("mean judge score (reward model, 95% CI)")
    b.bar(names, [stages[n]["response_tokens"] for n in names], color=[f"C{i}" for i in range(len(names))])
    b.set_title("response length (tokens)")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    return saved(fig, path)


# ---- markdown -------------------------------------------------------------------------------


def cell(text: str, limit: int = 140) -> str:
    """Text safe inside a Markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty)")


def sample_rows(result: dict) -> list[dict]:
    """The first evaluated prompts of each family, or of each file of your own prompts (the same ones
    for every stage)."""
    answers = result.get("answers", [])
    groups, n = (
        (FAMILIES, SAMPLES_PER_FAMILY)
        if gold_judged(result)
        else (dict.fromkeys(a["family"] for a in answers), SAMPLES_PER_FILE)
    )
    return [a for g in groups for a in [a for a in answers if a["family"] == g][:n]]


def samples_table(result: dict) -> str:
    rows = sample_rows(result)
    names = stage_names(result)
    if not rows or not names:
        return "_No answers in eval.json._\n"
    if not gold_judged(result):  # your prompts: no ideal answer, the reward model's score
        lines = ["| prompts | prompt | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for a in rows:
            answers = [f"{cell(a['responses'][n]['answer'])} **({a['responses'][n]['score']:+.2f})**" for n in names]
            lines.append(f"| {cell(a['family'])} | {cell(a['prompt'])} | " + " | ".join(answers) + " |")
        return "\n".join(lines) + "\n"
    lines = ["| family | prompt | ideal | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for a in rows:
        answers = [f"{cell(a['responses'][n]['answer'])} **({a['responses'][n]['label']})**" for n in names]
        lines.append(f"| {a['family']} | {cell(a['prompt'])} | {cell(a['ideal'])} | " + " | ".join(answers) + " |")
    return "\n".join(lines) + "\n"


def missing(stage: str, run_dir: Path) -> str:
    return f"_Stage `{stage}` is not finished in {run_dir}: run `make {stage} RUN={run_dir}`._\n"


def image(md: list[str], report_dir: Path, name: str, made: bool, what: str) -> None:
    md.append(f"![{what}]({report_dir.name}/{name})\n" if made else f"_No {what} logged._\n")


def stage_table(manifests: dict[str, dict | None]) -> list[str]:
    """Every stage's status, minutes and headline metrics."""
    md = ["| stage | status | minutes | headline |", "|---|---|---|---|"]
    for s in STAGES:
        m = manifests[s]
        if m is None and s in OPTIONAL:
            continue
        if m is None:
            md.append(f"| {s} | not finished | - | run `make {s}` |")
            continue
        head = ", ".join(
            f"{k} {v:.4g}"
            for k, v in (m.get("metrics") or {}).items()
            if isinstance(v, float) and ("loss" in k or "accuracy" in k or "perplexity" in k or "score" in k)
        )
        md.append(f"| {s} | finished | {m.get('seconds', 0) / 60:.1f} | {head or '-'} |")
    return md + [""]


def evaluation_section(md: list[str], out: Path, result: dict | None, to_evaluate: str) -> None:
    """Held-out prompts: the world's and its gold judge, or yours and a reward model."""
    md.append("## Evaluation on held-out prompts\n")
    if result is None:
        md.append(f"_No evaluation: {to_evaluate}._\n")
        return
    md.append(markdown_table(result))
    md.append(
        "Win rate: share of prompts where the first stage's answer has the higher "
        + ("gold" if gold_judged(result) else "reward-model")
        + " score (ties half), 95% bootstrap interval over prompts.\n"
    )
    image(md, out, "eval.png", plot_eval(out / "eval.png", result), "evaluation chart")


def pretrain_section(md: list[str], out: Path, manifest: dict, rows: list[dict]) -> None:
    made = plot_panels(
        out / "pretrain.png",
        "pretraining (next-token prediction)",
        [
            {"title": "loss", "rows": rows, "lines": [("train/loss", "train/loss"), ("val/loss", "val/loss")]},
            {"title": "held-out perplexity", "rows": rows, "lines": [("val/perplexity", "val/perplexity")]},
        ],
    )
    m = manifest.get("metrics", {})
    if isinstance(m.get("val_perplexity"), (int, float)):
        md.append(f"Held-out loss {m.get('val_loss', float('nan')):.3f}, perplexity {m['val_perplexity']:.2f}.\n")
    image(md, out, "pretrain.png", made, "pretraining curves")


def sft_section(md: list[str], out: Path, manifest: dict, rows: list[dict]) -> None:
    made = plot_panels(
        out / "sft.png",
        "SFT on demonstrations",
        [
            {"title": "loss", "rows": rows, "lines": [("train loss", "loss"), ("eval loss", "eval_loss")]},
            {"title": "learning rate", "rows": rows, "lines": [("learning_rate", "learning_rate")]},
        ],
    )
    image(md, out, "sft.png", made, "SFT curves")


def reward_section(md: list[str], out: Path, manifest: dict, rows: list[dict]) -> None:
    held_out = accuracy_metrics(manifest.get("metrics") or {})
    md.append(
        "Held-out pairwise accuracy (share of comparisons where the preferred answer scores higher): "
        + (", ".join(f"{k} **{v:.3f}**" for k, v in held_out.items()) or "not recorded in its manifest")
        + ".\n"
    )
    made = plot_panels(
        out / "reward.png",
        "reward model (ranked comparisons)",
        [
            {"title": "loss", "rows": rows, "lines": [("train loss", "loss"), ("eval loss", "eval_loss")]},
            {
                "title": "pairwise accuracy",
                "rows": rows,
                "lines": [(k, k) for k in keys_containing(rows, "accuracy")],
                "hlines": [("chance", 0.5)] + [(f"held-out {k}", v) for k, v in held_out.items()],
            },
        ],
    )
    image(md, out, "reward.png", made, "reward-model curves")
    kinds = (manifest.get("metrics") or {}).get("val_gold_pairs_by_labels") or {}
    if kinds:  # the pairs it orders against the gold judge most often: its holes, which PPO may find
        md.append(
            "Where it disagrees with the gold judge most often (held-out pairs with different gold scores, "
            "most disagreements first):\n"
        )
        md.append("| family: gold-preferred > other | right | pairs | accuracy |\n|---|---:|---:|---:|")
        # The manifest sorts keys; the worst first.
        worst = sorted(kinds.items(), key=lambda kv: kv[1]["right"] - kv[1]["pairs"])[:8]
        md += [f"| {name} | {k['right']} | {k['pairs']} | {k['right'] / k['pairs']:.3f} |" for name, k in worst]
        md.append("")


def rl_section(md: list[str], out: Path, rows: list[dict], result: dict | None, stage: str = "ppo") -> None:
    """An RL stage's curves (PPO's, or another method's run of the RL stage): proxy against gold reward
    and KL, answer length, the training statistics it logged (no critic panels without a critic)."""
    label = stage.upper().replace("_PP", "++").replace("_", " ")
    if any("gold/score" in r for r in rows):
        md.append(
            "Proxy reward (the reward model PPO optimises) against the gold score (the labeler it stands "
            "for) and the KL to the SFT policy: a rising proxy with a flat or falling gold score is "
            "over-optimisation. Dashed: best-of-k on SFT with the same reward model (from the evaluation), "
            "the selection baseline for the same KL.\n"
        )
    else:  # a run on your own prompts: no gold judge to hold the proxy against
        md.append(
            "Proxy reward (the reward model PPO optimises) and the KL to the SFT policy. Without the world's "
            "gold judge nothing shows over-optimisation here; `make eval EVAL_ARGS='--judge DIR'` scores the "
            "answers with a reward model trained apart.\n"
        )
    bon = (result or {}).get("best_of_n")
    image(
        md,
        out,
        f"{stage}_reward_vs_gold.png",
        plot_ppo_overoptimisation(out / f"{stage}_reward_vs_gold.png", rows, bon),
        "proxy vs gold reward",
    )
    made = plot_panels(
        out / f"{stage}_length.png",
        f"{label}: answer length",
        [
            {
                "title": "response length",
                "rows": rows,
                "lines": [("response/length", "response/length")],
                "twin": [("no-EOS rate", "response/no_eos_rate")],
                "xlabel": f"{label} update",
            },
        ],
    )
    image(md, out, f"{stage}_length.png", made, "response length")
    made = plot_panels(
        out / f"{stage}_training.png",
        f"{label} training",
        [
            {
                "title": "rewards",
                "rows": rows,
                "lines": [
                    ("objective/score", "objective/score"),
                    ("objective/total_reward", "objective/total_reward"),
                ],
            },
            {
                "title": "policy",
                "rows": rows,
                "lines": [("policy/entropy", "policy/entropy")],
                "twin": [("policy/approx_kl", "policy/approx_kl")],
            },
            {
                "title": "losses",
                "rows": rows,
                "lines": [("loss/policy", "loss/policy")],
                "twin": [("loss/value", "loss/value"), ("loss/kl", "loss/kl")],
            },
            {
                "title": "clipping",
                "rows": rows,
                "lines": [("policy/clipfrac", "policy/clipfrac"), ("value/clipfrac", "value/clipfrac")],
            },
            {"title": "critic", "rows": rows, "lines": [("value/explained_variance", "value/explained_variance")]},
            {
                "title": "groups and rules",
                "rows": rows,
                "lines": [("groups all alike", "objective/flat_groups"), ("rule reward", "objective/rule_score")],
            },
            {"title": "throughput", "rows": rows, "lines": [("episodes/s", "perf/episodes_per_s")]},
        ],
    )
    image(md, out, f"{stage}_training.png", made, f"{label} training curves")


def dpo_section(md: list[str], out: Path, manifest: dict, rows: list[dict]) -> None:
    """DPO: its held-out preference accuracy and KL (the manifest's), and the curves TRL logged."""
    metrics = manifest.get("metrics") or {}
    head = [(k, v) for k, v in metrics.items() if isinstance(v, float) and ("accuracy" in k or "kl" in k)]
    if head:
        md += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in head] + [""]
    panels = [
        {"title": "loss", "rows": rows, "lines": [(k, k) for k in keys_containing(rows, "loss")]},
        {"title": "implicit reward", "rows": rows, "lines": [(k, k) for k in keys_containing(rows, "rewards/")]},
    ]
    image(md, out, "dpo_training.png", plot_panels(out / "dpo_training.png", "DPO training", panels), "DPO curves")


def samples_section(md: list[str], run_dir: Path, manifests: dict, result: dict | None, to_evaluate: str) -> None:
    """The same prompts answered by every stage."""
    md.append(
        "## Sample answers (same held-out prompts, every stage, "
        + ("gold label" if result is None or gold_judged(result) else "reward-model score of the judge")
        + " in bold)\n"
    )
    if result is None:
        md.append(f"_No evaluation: {to_evaluate}._\n")
        return
    stale = [EVAL_NAME[s] for s in EVAL_NAME if manifests[s] is not None and EVAL_NAME[s] not in result["stages"]]
    if stale:
        md.append(
            f"_eval.json has no answers from {', '.join(stale)} (finished after it): "
            f"rerun `make eval RUN={run_dir}`._\n"
        )
    md.append(samples_table(result))


# Each training stage's section: its title and what writes it from (markdown, report dir, manifest, metrics rows).
SECTIONS = (
    ("pretrain", "Pretraining", pretrain_section),
    ("sft", "Supervised fine-tuning", sft_section),
    ("reward", "Reward model", reward_section),
)


def build_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: no such run directory")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifests = {s: read_manifest(run_dir / s) for s in STAGES}
    metrics = {s: read_metrics(run_dir / s) if manifests[s] else [] for s in STAGES}
    eval_path = run_dir / "eval.json"
    result = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
    # Without a world, `make eval` takes the prompts PPO held out of a prompt set of your own, or --prompts.
    held_out = any((manifests[m] or {}).get("heldout_prompts") for m in AFTER_SFT)
    if (run_dir / "world" / "truth.json").is_file() or held_out:
        to_evaluate = f"run `make eval RUN={run_dir}` (writes {eval_path}), then `make report` again"
    else:
        to_evaluate = (
            f"this run has no world and its gold judge; run `make eval RUN={run_dir} EVAL_ARGS='--prompts "
            "FILE'` with held-out prompts of your own, judged by a reward model, then `make report` again"
        )

    md = [
        f"# Run report: {run_dir}\n",
        "InstructGPT recipe (Ouyang et al. 2022): pretrain -> SFT -> reward model -> PPO, each stage "
        "starting from the previous one's checkpoint.\n",
    ]
    md += stage_table(manifests)
    evaluation_section(md, out, result, to_evaluate)
    for stage, title, section in SECTIONS:
        md.append(f"## {title}\n")
        if manifests[stage] is None:
            md.append(missing(stage, run_dir))
        else:
            section(md, out, manifests[stage], metrics[stage])
    for stage, title in RL_TITLES.items():
        if manifests[stage] is None and stage in OPTIONAL:
            continue
        md.append(f"## {title}\n")
        if manifests[stage] is None:
            md.append(missing(stage, run_dir))
        else:
            rl_section(md, out, metrics[stage], result, stage)
    if manifests["dpo"] is not None:
        md.append("## DPO (preferences without a reward model)\n")
        dpo_section(md, out, manifests["dpo"], metrics["dpo"])
    samples_section(md, run_dir, manifests, result, to_evaluate)
    path = run_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/default", help="run directory (stage dirs, eval.json)")
    args = p.parse_args(argv)
    path = build_report(args.run_dir)
    print(f"[report] wrote {path} and plots in {path.parent / 'report'}")


if __name__ == "__main__":
    main()
