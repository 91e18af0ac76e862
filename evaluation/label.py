"""A local page for people: rank the stages' answers to one prompt, as InstructGPT's labelers ranked K
samples, and read the run's report.

    python -m evaluation.label --run_dir RUN [--port 7860 --host 127.0.0.1 --prompts_file FILE
                                              --stages sft,ppo --temperature 0.8 --max_new_tokens 64]

Rank view (/): a prompt (typed, drawn from the world's comparison prompts, or from --prompts_file) is
answered by every finished causal-LM stage, plus optional extra samples of one stage; identical answers
are shown once. The answers come in random order without stage names; the person gives each a rank (1 =
best) and submits. Each submission is one line appended to RUN/comparisons/human.jsonl in the reward
stage's K-wise format (`prompt`, `responses`, `ranking` best first, plus who wrote what and, on the
world, the gold judge's ranking), so `make reward HUMAN=also` or `HUMAN=only` trains on it. Then the
page shows which stage wrote which answer and, for a world prompt, the gold judge's label of each and
how many of the person's pairwise preferences the judge shares.

Report view (/report): RUN/report.md (`make report`) with its plots.

A small FastAPI app with one plain page rather than Gradio: ranking K answers needs a rank per card and
a reveal in place, which a page of our own does directly; the JSON API under it is what the tests drive.
The browser sends no paths: it names a report plot by file name only, and every file read or written
lies inside the run directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from data.formats.comparisons import _kwise
from data.formats.prompts import prompt_of
from data.loading import load_records
from evaluation.evaluate import finished_stages, load_causal_lm, pick_device
from pipeline.errors import PipelineError, cli_main
from pipeline.generation import answer
from pipeline.runtime import precision_autocast, resolve_precision
from pipeline.stage import append_jsonl_line
from world.judge import GoldJudge

HUMAN_FILE = Path("comparisons") / "human.jsonl"
PAGE = Path(__file__).with_name("label_page.html")
PLOT_NAME = re.compile(r"[A-Za-z0-9_.-]+\.png")
MAX_EXTRA = 8  # extra samples of one stage per group
MAX_HELD = 1000  # groups shown and not yet ranked, kept in memory (oldest dropped)


# ---- pure helpers (tests/test_label.py) -------------------------------------------------------------


class BadRanking(ValueError):
    """A ranking the page must refuse; its message is shown to the person."""


def ranking_from_ranks(ranks: list, k: int) -> list[int]:
    """The reward stage's `ranking` (answer indices, best first) from the rank the person gave each shown
    answer (1 = best). Every answer needs a rank, each rank once."""
    if not isinstance(ranks, list) or len(ranks) != k:
        raise BadRanking(f"expected a rank for each of the {k} answers")
    missing = sum(r is None or r == "" for r in ranks)
    if missing:
        raise BadRanking(f"rank every answer: {missing} of {k} have no rank yet")
    try:
        values = [int(r) for r in ranks]
    except (TypeError, ValueError):
        raise BadRanking("ranks must be whole numbers") from None
    if any(not 1 <= v <= k for v in values):
        raise BadRanking(f"ranks go from 1 (best) to {k}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise BadRanking(f"rank {repeated[0]} is given to more than one answer: give each rank once")
    return sorted(range(k), key=lambda i: values[i])


def pair_agreement(ranking: list[int], scores: list[float]) -> tuple[int, int]:
    """(pairs the person ordered as the gold scores do, pairs the gold scores order): pairs of equal
    gold score are no evidence either way and are left out."""
    position = {answer: place for place, answer in enumerate(ranking)}
    agree = pairs = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] == scores[j]:
                continue
            pairs += 1
            gold_prefers_i = scores[i] > scores[j]
            agree += gold_prefers_i == (position[i] < position[j])
    return agree, pairs


def merge_answers(written: list[tuple[str, str]]) -> tuple[list[str], list[list[str]], list[str]]:
    """(distinct non-empty answers, who wrote each, who wrote an empty one) from (writer, text) pairs: a
    comparison cannot rank an answer against itself, nor an empty one (the reward stage refuses both)."""
    texts: list[str] = []
    writers: list[list[str]] = []
    empty: list[str] = []
    seen: dict[str, int] = {}
    for who, text in written:
        key = text.strip()
        if not key:
            empty.append(who)
        elif key in seen:
            writers[seen[key]].append(who)
        else:
            seen[key] = len(texts)
            texts.append(text.strip())
            writers.append([who])
    return texts, writers, empty


def plot_path(run_dir: Path, name: str) -> Path | None:
    """RUN/report/<name> for a plot name the browser asked for, or None: a bare file name of a PNG that
    resolves inside the run directory (no '..', no absolute path, no link out)."""
    if not PLOT_NAME.fullmatch(name) or name.startswith("."):
        return None
    path = (run_dir / "report" / name).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
        return None
    return path


def read_human(path: Path) -> list[dict]:
    """The ranked groups so far (complete lines only)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line; the next append cuts it off
    return out


# ---- the labeling session ------------------------------------------------------------------------


@dataclass
class Held:
    """A group shown to the person and not ranked yet: answers in shown order."""

    prompt: str | list[dict]
    responses: list[str]
    writers: list[list[str]]
    empty: list[str]
    seed: int
    gold: list[dict] | None  # per answer {label, score}, for a world prompt


@dataclass
class Session:
    """One labeling server's state: the run's answering stages (loaded on first use), the world's judge,
    the groups shown and not yet ranked, and the file the rankings go to."""

    run_dir: Path
    stages: dict[str, Path]  # name in the evaluation ("base", "sft", "ppo", ...) -> stage dir
    prompts_file: str | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    device: str = "auto"
    precision: str = "no"  # resolved (pipeline.runtime): generation under bf16 autocast where it pays
    judge: GoldJudge | None = None
    held: dict[str, Held] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _models: dict = field(default_factory=dict)
    _prompts: dict[str, list] = field(default_factory=dict)

    @property
    def human_path(self) -> Path:
        return self.run_dir / HUMAN_FILE

    def prompt_sources(self) -> list[str]:
        return (["world"] if self.judge is not None else []) + (["file"] if self.prompts_file else [])

    def prompts(self, source: str) -> list:
        if source not in self._prompts:
            if source == "world" and self.judge is not None:
                path = self.run_dir / "world" / "comparisons_train.jsonl"
            elif source == "file" and self.prompts_file:
                path = Path(self.prompts_file)
            else:
                raise BadRanking(f"no prompt source {source!r} here (have: {', '.join(self.prompt_sources())})")
            self._prompts[source] = [prompt_of(r) for r in load_records(str(path))]
        return self._prompts[source]

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_causal_lm(self.stages[name], pick_device(self.device))
        return self._models[name]

    def gold_of(self, prompt, responses: list[str]) -> list[dict] | None:
        if self.judge is None or not isinstance(prompt, str):
            return None
        try:
            self.judge.spec(prompt)
        except KeyError:
            return None  # not a prompt of the world: no gold label
        verdicts = [self.judge.judge(prompt, r) for r in responses]
        return [{"label": v.label, "score": v.score} for v in verdicts]

    def new_group(self, prompt, extra_stage: str | None = None, extra: int = 0) -> tuple[str, Held]:
        """Every stage's answer to `prompt` (plus `extra` more samples of `extra_stage`), shuffled."""
        if extra and extra_stage not in self.stages:
            raise BadRanking(f"no finished stage {extra_stage!r} for extra samples")
        if not 0 <= extra <= MAX_EXTRA:
            raise BadRanking(f"extra samples go from 0 to {MAX_EXTRA}")
        seed = random.SystemRandom().randrange(2**31)
        written = []
        with self.lock:
            for n, name in enumerate(self.stages):
                count = 1 + (extra if name == extra_stage else 0)
                model, tokenizer = self.model(name)
                with precision_autocast(self.precision, model.device):
                    texts = answer(
                        model,
                        tokenizer,
                        [prompt] * count,
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature,
                        top_p=self.top_p,
                        seed=seed + 1000 * n,
                    )
                written += [(name if i == 0 else f"{name} (sample {i + 1})", t) for i, t in enumerate(texts)]
        random.Random(seed).shuffle(written)
        responses, writers, empty = merge_answers(written)
        if len(responses) < 2:
            raise BadRanking(
                "the stages gave fewer than 2 different answers to this prompt: draw another, or ask for extra samples"
            )
        group_id = uuid.uuid4().hex
        held = Held(prompt, responses, writers, empty, seed, self.gold_of(prompt, responses))
        with self.lock:
            self.held[group_id] = held
            while len(self.held) > MAX_HELD:
                self.held.pop(next(iter(self.held)))
        return group_id, held

    def rank(self, group_id: str, ranks: list) -> dict:
        """Check the ranks, append the group to human.jsonl, and say who wrote what."""
        with self.lock:
            saved = read_human(self.human_path)
            if any(r.get("group_id") == group_id for r in saved):
                raise BadRanking("this group is ranked and saved already; draw the next one")
            held = self.held.get(group_id)
            if held is None:
                raise BadRanking("this group is no longer held by the server (it restarted?): draw a new one")
            ranking = ranking_from_ranks(ranks, len(held.responses))
            record = {
                "prompt": held.prompt,
                "responses": held.responses,
                "ranking": ranking,
                "stages": held.writers,
                "group_id": group_id,
                "labeler": "human",
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "sampling": {
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                    "max_new_tokens": self.max_new_tokens,
                    "seed": held.seed,
                },
            }
            if held.gold is not None:
                scores = [g["score"] for g in held.gold]
                record["gold_ranking"] = self.judge.order(scores, noise=0)
                record["gold_labels"] = [g["label"] for g in held.gold]
                record["gold_scores"] = scores
                record["family"] = self.judge.spec(held.prompt)["family"]
            _kwise({**record, "_where": str(self.human_path)})  # what the reward stage will read, checked now
            append_jsonl_line(self.human_path, record)
            del self.held[group_id]
        agreement = pair_agreement(ranking, record["gold_scores"]) if held.gold is not None else None
        return {"record": record, "agreement": agreement, "empty": held.empty, **self.counts([*saved, record])}

    def counts(self, records: list[dict] | None = None) -> dict:
        """Groups ranked so far (`records`, else the file's) and, over those with gold scores, the person's
        agreement with the judge."""
        records = read_human(self.human_path) if records is None else records
        agree = pairs = 0
        for r in records:
            if "gold_scores" in r:
                a, p = pair_agreement(r["ranking"], r["gold_scores"])
                agree, pairs = agree + a, pairs + p
        return {"ranked": len(records), "agree_total": agree, "pairs_total": pairs}


def open_session(args) -> Session:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: no such run directory: run `make all RUN={run_dir}` first")
    stages = finished_stages(run_dir)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            raise PipelineError(
                f"--stages: {', '.join(unknown)} not finished in {run_dir} (finished: {', '.join(stages) or 'none'})"
            )
        stages = {s: stages[s] for s in wanted}
    if len(stages) < 1:
        raise PipelineError(
            f"{run_dir}: no finished causal-LM stage to answer prompts: run `make pretrain sft RUN={run_dir}` first"
        )
    judge = GoldJudge.load(run_dir / "world") if (run_dir / "world" / "truth.json").is_file() else None
    session = Session(
        run_dir=run_dir,
        stages=stages,
        prompts_file=args.prompts_file,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        precision=resolve_precision(args.mixed_precision),
        judge=judge,
    )
    for source in session.prompt_sources():  # a bad prompt file fails now, with its record named
        session.prompts(source)
    return session


# ---- the web app ----------------------------------------------------------------------------------


class Draw(BaseModel):
    """POST /api/group: a typed prompt, or one drawn from `source` ("world" or "file")."""

    prompt: str | None = None
    source: str | None = None
    extra_stage: str | None = None
    extra: int = 0


class Ranks(BaseModel):
    """POST /api/rank: the rank (1 = best) of each answer as shown, None where not given."""

    group_id: str
    ranks: list


def create_app(session: Session):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from markdown_it import MarkdownIt

    app = FastAPI(title="rlhf-pipeline: rank answers", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRanking)
    async def refuse(request, exc: BadRanking):
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/state")
    def state():
        return {
            "run_dir": str(session.run_dir),
            "stages": list(session.stages),
            "sources": session.prompt_sources(),
            "world": session.judge is not None,
            "human_file": str(session.human_path),
            **session.counts(),
        }

    @app.post("/api/group")
    def group(draw: Draw):
        if draw.prompt is not None and draw.prompt.strip():
            prompt = draw.prompt.strip()
        elif draw.source:
            prompt = random.choice(session.prompts(draw.source))
        else:
            raise BadRanking("type a prompt, or draw one from the world or your prompt file")
        group_id, held = session.new_group(prompt, draw.extra_stage or None, draw.extra)
        return {"group_id": group_id, "prompt": held.prompt, "answers": held.responses}

    @app.post("/api/rank")
    def rank(ranks: Ranks):
        out = session.rank(ranks.group_id, ranks.ranks)
        record = out["record"]
        reveal = [
            {
                "stages": record["stages"][i],
                **(
                    {"gold_label": record["gold_labels"][i], "gold_score": record["gold_scores"][i]}
                    if "gold_labels" in record
                    else {}
                ),
            }
            for i in range(len(record["responses"]))
        ]
        return {
            "saved": True,
            "ranking": record["ranking"],
            "reveal": reveal,
            "empty": out["empty"],
            "agreement": out["agreement"],
            **{k: out[k] for k in ("ranked", "agree_total", "pairs_total")},
        }

    @app.get("/report", response_class=HTMLResponse)
    def report():
        path = session.run_dir / "report.md"
        if not path.is_file():
            body = f"<p>No report yet: run <code>make eval report RUN={session.run_dir}</code>, then reload.</p>"
        else:
            body = MarkdownIt("commonmark").enable("table").render(path.read_text(encoding="utf-8"))
        return REPORT_PAGE.format(body=body)

    @app.get("/report/{name}")
    def plot(name: str):
        path = plot_path(session.run_dir, name)
        if path is None:
            raise HTTPException(status_code=404, detail="no such plot in this run's report")
        return FileResponse(path, media_type="image/png")

    return app


REPORT_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Run report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
img{{max-width:100%}}nav a{{margin-right:1em}}</style></head>
<body><nav><a href="/">Rank answers</a><a href="/report">Report</a></nav>{body}</body></html>"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.label", description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/default", help="run directory whose finished stages answer")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--prompts_file", default=None, help="prompts of your own (prompt or messages records)")
    p.add_argument("--stages", default="", help="comma-separated stages that answer (default: every finished one)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of every answer")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling threshold")
    p.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit in tokens")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda ...")
    p.add_argument("--mixed_precision", default="auto", help="auto (bf16 autocast where bf16 is fast), fp32, bf16")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.temperature <= 0 or args.max_new_tokens < 1:
        raise PipelineError("--temperature must be > 0 (ranked answers are samples) and --max_new_tokens >= 1")
    session = open_session(args)
    import uvicorn

    print(
        f"[label] {', '.join(session.stages)} answer; rankings go to {session.human_path} "
        f"({session.counts()['ranked']} so far). Open http://{args.host}:{args.port}/  (Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(create_app(session), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
