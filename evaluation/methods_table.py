"""RUN/methods.md, RUN/methods.json and the plots in RUN/methods/ of `make methods` (evaluation/methods.py).

Every figure comes from a finished run of the bench: the stages' manifests (their final evaluation:
greedy answers to the world's held-out prompts judged by the gold judge against SFT's, the win rate's
95% bootstrap interval, KL to SFT at the sampling temperature), best-of-n's manifest, and for the
curves over training and the tokens an RL run generated, its metrics.jsonl. Means over worlds carry a
95% t interval over the worlds (pipeline.stats.t_interval); a single world shows its bootstrap
intervals over prompts instead.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.stage import git_commit, read_manifest, write_json_atomic, write_text_atomic  # noqa: E402
from pipeline.stats import interpolate, t_interval  # noqa: E402
from pipeline.tracking import read_metrics  # noqa: E402

NAMES = {
    "ppo": "PPO",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "reinforce_pp": "REINFORCE++",
    "dpo": "DPO",
    "best_of_n": "best-of-n",
}
# The figures a row holds, in the tables' order: key -> column title.
COLUMNS = {
    "gold": "gold score",
    "gain": "gain over SFT",
    "win": "win rate vs SFT",
    "kl": "KL to SFT",
    "hallucination": "hallucination",
    "refusal": "refusal (harmful)",
    "over_refusal": "over-refusal",
    "proxy": "reward model score",
    "seconds": "seconds",
    "tokens": "tokens generated",
}
# KL to SFT (nats per answer) at which the frontiers are compared.
KL_TARGETS = (0.25, 0.5, 1.0, 2.0, 4.0)


# ---- rows from manifests ----------------------------------------------------------------------


def tokens_generated(stage_dir: Path, manifest: dict) -> float:
    """Tokens an RL run sampled in training: per update the mean answer length times the episodes
    (metrics.jsonl, the last entry of each update: a resumed run logs some twice). DPO samples none."""
    if manifest.get("stage") == "dpo":
        return 0.0
    by_step = {r["step"]: r["response/length"] for r in read_metrics(stage_dir) if "response/length" in r}
    return float(sum(by_step.values()) * manifest["config"]["rollout_batch_size"])


def training_curve(stage_dir: Path) -> list[tuple[int, float, float]]:
    """(update, reward model score, gold score) of the held-out answers an RL run scored as it trained."""
    by_step = {r["step"]: r for r in read_metrics(stage_dir) if "gold/score" in r and "gold/proxy_score" in r}
    return [(s, by_step[s]["gold/proxy_score"], by_step[s]["gold/score"]) for s in sorted(by_step)]


def stage_row(job) -> dict:
    manifest = read_manifest(job.out)
    m = manifest["metrics"]
    return {
        "seed": job.seed,
        "method": job.method,
        "setting": f"{job.knob} {job.value:g}",
        "default": job.factor == 1.0,
        "manifest": str(job.out / "manifest.json"),
        "prompts": m.get("eval_prompts"),
        "sft_gold": m.get("sft_gold_score"),
        "gold": m.get("gold_score"),
        "gold_ci": m.get("gold_score_ci"),
        "win": m.get("gold_win_rate"),
        "win_ci": m.get("gold_win_rate_ci"),
        "kl": m.get("kl_to_sft"),
        "hallucination": m.get("hallucination_rate"),
        "refusal": m.get("harmful_refusal_rate"),
        "over_refusal": m.get("over_refusal_rate"),
        "proxy": m.get("reward_score"),
        "seconds": manifest.get("seconds"),
        "tokens": tokens_generated(job.out, manifest),
        "curve": training_curve(job.out),
    }


def best_of_n_rows(job) -> list[dict]:
    """One row per k of best-of-n's curve (expected gold and proxy score of the pick among k, KL log k -
    (k-1)/k); the one of k = n, the pick among all samples, holds the rates and the win rate too."""
    manifest = read_manifest(job.out)
    m = manifest["metrics"]
    rows = []
    for point in m["curve"]:
        row = {"seed": job.seed, "method": "best_of_n", "setting": f"n {point['k']}", "default": point["k"] == m["n"]}
        row.update(manifest=str(job.out / "manifest.json"), prompts=m["eval_prompts"])
        row.update(gold=point["gold"], kl=point["kl"], proxy=point["proxy"])
        row.update(tokens=point["tokens_generated"], curve=[])
        if point["k"] == m["n"]:
            row.update(gold_ci=m["gold_score_ci"], win=m["gold_win_rate"], win_ci=m["gold_win_rate_ci"])
            row.update(hallucination=m["hallucination_rate"], refusal=m["harmful_refusal_rate"])
            row.update(over_refusal=m["over_refusal_rate"], seconds=manifest["seconds"])
        rows.append(row)
    return rows


def collect(jobs) -> list[dict]:
    """Every row, each with its gain: gold score minus its world's SFT's on the same prompts (the stages'
    manifests hold SFT's; best-of-n samples the same SFT). Worlds differ in how good their SFT is; the
    gain, paired within a world, is what the methods are compared on across worlds."""
    rows = []
    for job in jobs:
        if job.kind == "stage":
            rows.append(stage_row(job))
        elif job.kind == "best_of_n":
            rows += best_of_n_rows(job)
    sft = {r["seed"]: r["sft_gold"] for r in rows if r.get("sft_gold") is not None}
    for r in rows:
        r["sft_gold"] = sft.get(r["seed"])
        r["gain"] = None if r["gold"] is None or r["sft_gold"] is None else r["gold"] - r["sft_gold"]
    return rows


# ---- over worlds --------------------------------------------------------------------------------


def over_worlds(rows: list[dict]) -> list[dict]:
    """Each (method, setting) with every figure as (mean, low, high) over the worlds that ran it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["setting"])].append(r)
    out = []
    for (method, setting), rs in groups.items():
        entry = {"method": method, "setting": setting, "default": rs[0]["default"], "worlds": len(rs)}
        entry.update({k: t_interval([r.get(k) for r in rs]) for k in COLUMNS})
        if len(rs) == 1:  # one world: its bootstrap intervals over the prompts
            entry.update({k: (rs[0][k], *rs[0][f"{k}_ci"]) for k in ("gold", "win") if rs[0].get(f"{k}_ci")})
        out.append(entry)
    return out


def matched_kl(rows: list[dict]) -> list[dict]:
    """Per KL target: each method's gain over SFT read off its frontier (pipeline.stats.interpolate) in
    every world, averaged over the worlds where the frontier reaches it, and the method that leads there."""
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for target in KL_TARGETS:
        scores = {}
        for method in NAMES:
            per_world = []
            for s in seeds:
                points = [(r["kl"], r["gain"]) for r in rows if r["method"] == method and r["seed"] == s]
                points = [p for p in points if p[0] is not None and p[1] is not None]
                per_world.append(interpolate(points, target) if points else None)
            if per_world and all(v is not None for v in per_world):
                scores[method] = t_interval(per_world)
        if scores:
            leader = max(scores, key=lambda m: scores[m][0])
            out.append({"kl": target, "scores": scores, "leader": leader, "close": close_to(scores, leader)})
    return out


def close_to(scores: dict[str, tuple], leader: str) -> list[str]:
    """The methods whose interval reaches the leader's: the lead over them is not told apart from noise.
    Without intervals (one world) none are named."""
    _, low, _ = scores[leader]
    if low is None:
        return []
    return [m for m, (_, _, high) in scores.items() if m != leader and high is not None and high >= low]


# ---- Markdown ---------------------------------------------------------------------------------


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


# Columns counted in whole units.
WHOLE = ("seconds", "tokens")


def cell(key: str, value, ci=None) -> str:
    return fmt(value, 0) if key in WHOLE else with_ci(value, ci) if ci is not None else fmt(value)


def with_ci(value, ci) -> str:
    if value is None:
        return "-"
    if not ci or ci[0] is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def world_table(rows: list[dict]) -> str:
    head = "| method | setting | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [cell(k, r.get(k), r.get(f"{k}_ci")) for k in COLUMNS]
        name = NAMES[r["method"]] + (" (default)" if r["default"] and r["method"] != "best_of_n" else "")
        lines.append(f"| {name} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def means_table(entries: list[dict]) -> str:
    head = "| method | setting | worlds | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for e in entries:
        cells = [cell(k, e[k][0], e[k][1:] if k in ("gold", "gain", "win", "kl") else None) for k in COLUMNS]
        name = NAMES[e["method"]] + (" (default)" if e["default"] and e["method"] != "best_of_n" else "")
        lines.append(f"| {name} | {e['setting']} | {e['worlds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_table(matched: list[dict]) -> str:
    methods = [m for m in NAMES if any(m in x["scores"] for x in matched)]
    lines = [
        "| KL to SFT | " + " | ".join(NAMES[m] for m in methods) + " | leads |",
        "|---:|" + "---|" * (len(methods) + 1),
    ]
    for x in matched:
        cells = [with_ci(x["scores"][m][0], x["scores"][m][1:]) if m in x["scores"] else "-" for m in methods]
        close = f" (intervals overlap {', '.join(NAMES[m] for m in x['close'])})" if x["close"] else ""
        lines.append(f"| {x['kl']:g} | " + " | ".join(cells) + f" | {NAMES[x['leader']]}{close} |")
    return "\n".join(lines)


def markdown(rows: list[dict], entries: list[dict], matched: list[dict], plots: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    prompts = "/".join(str(n) for n in sorted({r["prompts"] for r in rows if r.get("prompts")})) or "world's"
    parts = [
        "# Which alignment method wins?",
        f"Worlds --seed {', '.join(map(str, seeds))}, each with its own SFT and reward model; code at {git_commit()}. "
        f"Gold score: the world's gold judge on greedy answers to the {prompts} held-out prompts (best-of-n: the "
        "expected score of its pick among n sampled answers); win rate: against SFT's greedy answers, ties "
        "half; KL to SFT in nats per answer at the sampling temperature (best-of-n: log n - (n-1)/n). "
        "Seconds: the run's wall time; tokens: answer tokens sampled in training (best-of-n: on the held-out "
        "prompts). "
        + (
            "Intervals over worlds: 95% t interval of the mean."
            if len(seeds) > 1
            else "Intervals: 95% bootstrap over the prompts."
        ),
        "## Gain over SFT at matched KL",
        "Each method's frontier (its settings' gold score minus SFT's, against KL; a straight line between "
        "neighbours) read at the same KL; '-' where a method's settings do not reach that KL in every world.",
        matched_table(matched) if matched else "No KL is reached by any method's settings in every world.",
        "## Means over the worlds" if len(seeds) > 1 else "## Every run",
        means_table(entries),
        *[f"![{p}]({p})" for p in plots],
    ]
    if len(seeds) > 1:
        for s in seeds:
            parts += [f"## World {s}", world_table([r for r in rows if r["seed"] == s])]
    return "\n\n".join(parts) + "\n"


# ---- plots ------------------------------------------------------------------------------------


def colour(method: str) -> str:
    return f"C{list(NAMES).index(method)}"


def frontier_plot(entries: list[dict], rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in NAMES:
        es = sorted((e for e in entries if e["method"] == method and e["kl"][0] is not None), key=lambda e: e["kl"][0])
        if not es:
            continue
        xs, ys = [e["kl"][0] for e in es], [e["gold"][0] for e in es]
        low = [y - e["gold"][1] if e["gold"][1] is not None else 0.0 for y, e in zip(ys, es, strict=True)]
        high = [e["gold"][2] - y if e["gold"][2] is not None else 0.0 for y, e in zip(ys, es, strict=True)]
        err = [low, high]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colour(method), label=NAMES[method])
        own = [r for r in rows if r["method"] == method and r["kl"] is not None]
        ax.scatter([r["kl"] for r in own], [r["gold"] for r in own], s=8, alpha=0.35, color=colour(method))
    ax.set(xlabel="KL to SFT (nats per answer)", ylabel="gold score", title="Gold score against KL to SFT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_plot(entries: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("seconds", "tokens"), ("wall seconds", "tokens generated"), strict=True):
        for method in NAMES:
            es = [e for e in entries if e["method"] == method and e[key][0] is not None and e["gold"][0] is not None]
            ax.scatter([e[key][0] for e in es], [e["gold"][0] for e in es], color=colour(method), label=NAMES[method])
        ax.set(xlabel=label, ylabel="gold score", xscale="symlog" if key == "tokens" else "linear")
        ax.set_title(f"Gold score against {label}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def win_plot(entries: list[dict], path: Path) -> None:
    es = [e for e in entries if e["win"][0] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(es) + 1.2))
    for i, e in enumerate(es):
        mid, low, high = e["win"]
        xerr = [[mid - low], [high - mid]] if low is not None else None
        ax.errorbar([mid], [i], xerr=xerr, marker="o", capsize=3, color=colour(e["method"]))
    ax.set_yticks(range(len(es)), [f"{NAMES[e['method']]} {e['setting']}" for e in es], fontsize=8)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="win rate vs SFT (95% interval)", title="Win rate against SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overoptimisation_plot(rows: list[dict], path: Path) -> None:
    """Per RL method: the reward model's score (x) against the gold score (y) of held-out answers as the
    run trains, one line per setting and world. A line that goes right and then down is over-optimisation
    (Gao et al. 2022): the proxy still climbs while the gold score falls."""
    methods = [m for m in NAMES if any(r["method"] == m and r["curve"] for r in rows)]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        settings = sorted({r["setting"] for r in rows if r["method"] == method})
        for r in rows:
            if r["method"] == method and r["curve"]:
                c = f"C{settings.index(r['setting'])}"
                label = r["setting"] if r["seed"] == min(x["seed"] for x in rows) else None
                ax.plot([p for _, p, _ in r["curve"]], [g for _, _, g in r["curve"]], color=c, alpha=0.7, label=label)
        ax.set(title=NAMES[method], xlabel="reward model score", ylabel="gold score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(run_dir: Path, jobs) -> Path:
    """RUN/methods.json, the plots in RUN/methods/ and RUN/methods.md (last); returns the Markdown's path."""
    out = Path(run_dir) / "methods"
    rows = collect(jobs)
    entries, matched = over_worlds(rows), matched_kl(rows)
    frontier_plot(entries, rows, out / "frontier.png")
    cost_plot(entries, out / "cost.png")
    win_plot(entries, out / "win_rates.png")
    overoptimisation_plot(rows, out / "overoptimisation.png")
    plots = [p for p in ("frontier.png", "cost.png", "win_rates.png", "overoptimisation.png") if (out / p).is_file()]
    write_json_atomic(run_dir / "methods.json", {"rows": rows, "over_worlds": entries, "matched_kl": matched})
    return write_text_atomic(run_dir / "methods.md", markdown(rows, entries, matched, [f"methods/{p}" for p in plots]))
