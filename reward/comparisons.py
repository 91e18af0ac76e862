"""Comparison data for the reward model: read every accepted format, collect new comparisons from
the SFT policy, and round-trip rankings through human labelers.

    python -m reward.comparisons sample --run_dir RUN [--k 4 --prompts 200 --temperature 1.0]
    python -m reward.comparisons export --run_dir RUN --out to_rank.jsonl
    python -m reward.comparisons import --file ranked.jsonl --out RUN/comparisons/human_comparisons.jsonl

Every record becomes a `Group`: one prompt and K >= 2 responses ordered best first. Accepted formats:

- K-wise (canonical, InstructGPT): `prompt`, `responses` (list, K >= 2), `ranking` (indices into
  `responses`, best first). Other fields are ignored (the world adds `gold_ranking`, `family`).
- pairs (Bradley-Terry, K = 2): `chosen`, `rejected`, optional `prompt`; strings, or TRL's
  conversational form (lists of {role, content} messages, prompt explicit or shared).
- Anthropic HH transcripts: `chosen` / `rejected` strings of "\\n\\nHuman: ... \\n\\nAssistant: ..."
  turns; the turns before the final Assistant turn are the (shared) prompt conversation.
- OpenAssistant ranked replies: `conversation` [{role: prompter|assistant, text}], `responses`, `ranks`
  (0 = best).
- OpenAssistant message trees (the oasst1/oasst2 `*.trees.jsonl` exports): `prompt` is the root message
  {message_id, role, text, rank, deleted, replies: [...]}; every prompter message with two or more
  ranked, non-deleted assistant replies is one group, the path from the root its prompt conversation.
- LLaMA-Factory ranked lists: `instruction`, `input`, `output` (list, best first), `history`
  ([user, assistant] pairs), optional `system`.

A prompt is a string (one user turn) or a list of messages ending in a user turn.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.loading import load_records, require_text
from pipeline.errors import PipelineError, cli_main
from pipeline.stage import write_text_atomic

ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class InvalidGroup(PipelineError):
    """A well-formed record whose content cannot be a comparison (empty or duplicate responses,
    chosen == rejected, diverging transcripts). `skip_invalid` turns these into skips."""


@dataclass
class Group:
    prompt: str | list[dict]  # a user prompt, or a conversation ending in a user turn
    responses: list[str]  # best first
    where: str  # "file: line N", for errors and reports


# ---- validation helpers ---------------------------------------------------------------------


def _permutation(rec: dict, field: str, k: int) -> list[int]:
    where, value = rec["_where"], rec.get(field)
    if value is None:
        raise PipelineError(f"{where}: missing field '{field}' (indices of the responses, best first)")
    if isinstance(value, list) and not value:
        raise PipelineError(f"{where}: field '{field}' is empty: rank the {k} responses (indices, best first)")
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value) \
            or sorted(value) != list(range(k)):
        raise PipelineError(f"{where}: field '{field}' must be a permutation of 0..{k - 1} (the responses, best first), got {value!r}")
    return value


def _responses(rec: dict, field: str, values) -> list[str]:
    where = rec["_where"]
    if not isinstance(values, list):
        raise PipelineError(f"{where}: field '{field}' must be a list of responses, got {type(values).__name__}")
    if len(values) < 2:
        raise PipelineError(f"{where}: field '{field}' has {len(values)} response(s); a comparison needs K >= 2")
    for i, r in enumerate(values):
        if not isinstance(r, str):
            raise PipelineError(f"{where}: field '{field}' item {i} must be a string, got {type(r).__name__}")
    return values


def _check_content(where: str, field: str, responses: list[str]) -> None:
    """Content problems: an empty response, or the same response twice (it cannot beat itself)."""
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if not r.strip():
            raise InvalidGroup(f"{where}: field '{field}' item {i} is an empty response")
        key = r.strip()
        if key in seen:
            raise InvalidGroup(f"{where}: field '{field}' holds the same response twice (items {seen[key]} and {i})")
        seen[key] = i


def _messages(rec: dict, field: str, value, role_key: str = "role", text_key: str = "content",
              rename: dict | None = None) -> list[dict]:
    where = rec["_where"]
    if not isinstance(value, list):
        raise PipelineError(f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        role = (rename or {}).get(m.get(role_key), m.get(role_key)) if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(m.get(text_key), str):
            raise PipelineError(f"{where}: field '{field}' message {i} must be {{'{role_key}': one of {'/'.join(ROLES)}, '{text_key}': text}}")
        out.append({"role": role, "content": m[text_key]})
    return out


def _prompt(rec: dict, field: str = "prompt", allow_empty: bool = False) -> str | list[dict]:
    value = rec.get(field)
    if isinstance(value, list):
        messages = _messages(rec, field, value)
        if messages and messages[-1]["role"] != "user":
            raise PipelineError(f"{rec['_where']}: field '{field}' must end with a user turn (the response answers it)")
        return messages
    if allow_empty and value is None:
        return ""
    return require_text(rec, field, allow_empty=allow_empty)


# ---- one parser per format ------------------------------------------------------------------


def _kwise(rec: dict) -> Group:
    responses = _responses(rec, "responses", rec["responses"])
    ranking = _permutation(rec, "ranking", len(responses))
    prompt = _prompt(rec)
    _check_content(rec["_where"], "responses", responses)
    ordered = [responses[i] for i in ranking]
    return Group(prompt, ordered, rec["_where"])


def _oasst(rec: dict) -> Group:
    responses = _responses(rec, "responses", rec["responses"])
    ranks = rec.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != len(responses) or not all(isinstance(r, (int, float)) for r in ranks):
        raise PipelineError(f"{rec['_where']}: field 'ranks' must hold one number per response (0 = best)")
    conversation = _messages(rec, "conversation", rec["conversation"], text_key="text", rename={"prompter": "user"})
    if not conversation or conversation[-1]["role"] != "user":
        raise PipelineError(f"{rec['_where']}: field 'conversation' must end with a prompter turn")
    _check_content(rec["_where"], "responses", responses)
    order = sorted(range(len(responses)), key=lambda i: (ranks[i], i))
    return Group(conversation, [responses[i] for i in order], rec["_where"])


def _oasst_tree_groups(rec: dict) -> list:
    """Builders (called one by one, so one bad group does not hide the others) of the groups in an
    OpenAssistant message tree: each prompter message with >= 2 ranked, non-deleted assistant replies."""
    builders = []

    def walk(node, path: list[dict], trail: str) -> None:
        if not isinstance(node, dict) or node.get("role") not in ("prompter", "assistant") or not isinstance(node.get("text"), str):
            raise PipelineError(f"{rec['_where']}: field 'prompt' message {trail} must be {{'role': prompter/assistant, 'text': text, ...}}")
        if node.get("deleted") or node.get("review_result") is False:  # withdrawn or failed review: not data
            return
        path = path + [{"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise PipelineError(f"{rec['_where']}: field 'prompt' message {trail}: 'replies' must be a list")
        ranked = [(r["rank"], i, r) for i, r in enumerate(replies) if isinstance(r, dict) and not r.get("deleted")
                  and r.get("review_result") is not False and isinstance(r.get("rank"), (int, float))
                  and not isinstance(r.get("rank"), bool) and r.get("role") == "assistant"]
        if node["role"] == "prompter" and len(ranked) >= 2:
            ordered = [r for _, _, r in sorted(ranked, key=lambda t: t[:2])]
            where = f"{rec['_where']}, message {node.get('message_id', trail)}"
            builders.append(functools.partial(_tree_group, where, path, ordered))
        for i, reply in enumerate(replies):
            walk(reply, path, f"{trail}.{i}")

    walk(rec["prompt"], [], "0")
    return builders


def _tree_group(where: str, prompt: list[dict], replies: list[dict]) -> Group:
    responses = [r["text"] for r in replies]
    _check_content(where, "replies", responses)
    return Group(prompt, responses, where)


def _llamafactory(rec: dict) -> Group:
    where = rec["_where"]
    responses = _responses(rec, "output", rec["output"])  # listed best first
    _check_content(where, "output", responses)
    messages = []
    if rec.get("system"):
        messages.append({"role": "system", "content": require_text(rec, "system")})
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise PipelineError(f"{where}: field 'history' must be a list of [user, assistant] string pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    instruction = require_text(rec, "instruction")
    extra = rec.get("input") or ""
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra.strip() else instruction})
    return Group(messages if len(messages) > 1 else messages[0]["content"], responses, where)


def hh_turns(rec: dict, field: str) -> list[dict]:
    """An Anthropic HH transcript as messages: "\\n\\nHuman: a\\n\\nAssistant: b" -> user a, assistant b."""
    parts = HH_TURN.split(require_text(rec, field))
    if parts[0].strip():
        raise PipelineError(f"{rec['_where']}: field '{field}' must start with a \"\\n\\nHuman:\" turn")
    return [{"role": "user" if role == "Human" else "assistant", "content": body.strip()}
            for role, body in zip(parts[1::2], parts[2::2])]


def _hh(rec: dict) -> Group:
    where = rec["_where"]
    chosen, rejected = hh_turns(rec, "chosen"), hh_turns(rec, "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns):
            raise PipelineError(f"{where}: field '{field}' is a transcript without a final Assistant turn after a Human turn")
    if chosen[:-1] != rejected[:-1]:
        raise InvalidGroup(f"{where}: 'chosen' and 'rejected' transcripts differ before the final Assistant turn")
    return _pair_group(where, chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _pair(rec: dict) -> Group:
    where, chosen, rejected = rec["_where"], rec["chosen"], rec["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):  # TRL conversational preference data
        chosen = _messages(rec, "chosen", chosen)
        rejected = _messages(rec, "rejected", rejected)
        for field, turns in (("chosen", chosen), ("rejected", rejected)):
            if not turns or turns[-1]["role"] != "assistant":
                raise PipelineError(f"{where}: field '{field}' must end with an assistant message")
        if rec.get("prompt") is not None:
            prompt = _prompt(rec)
        elif chosen[:-1] != rejected[:-1]:
            raise InvalidGroup(f"{where}: 'chosen' and 'rejected' conversations differ before the final assistant turn")
        else:
            prompt = chosen[:-1]
        return _pair_group(where, prompt, chosen[-1]["content"], rejected[-1]["content"])
    prompt = _prompt(rec, allow_empty=True)
    return _pair_group(where, prompt, require_text(rec, "chosen", allow_empty=True), require_text(rec, "rejected", allow_empty=True))


def _pair_group(where: str, prompt, chosen: str, rejected: str) -> Group:
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise InvalidGroup(f"{where}: field '{field}' is an empty response")
    if chosen.strip() == rejected.strip():
        raise InvalidGroup(f"{where}: 'chosen' is identical to 'rejected'")
    return Group(prompt, [chosen, rejected], where)


def to_group(rec: dict) -> Group:
    """One record of any accepted format as a Group (raises PipelineError naming file/record/field)."""
    rec.setdefault("_where", "record")
    if "responses" in rec and "conversation" in rec:
        return _oasst(rec)
    if "responses" in rec:
        return _kwise(rec)
    if "instruction" in rec and isinstance(rec.get("output"), list):
        return _llamafactory(rec)
    if "chosen" in rec or "rejected" in rec:
        for field in ("chosen", "rejected"):
            if rec.get(field) is None:
                why = "is null" if field in rec else "is missing"
                raise PipelineError(f"{rec['_where']}: field '{field}' {why}, expected a string or a list of messages")
        # Either transcript in HH form makes the pair HH, so one without a final Assistant turn is refused
        # by _hh, not trained as a pair with an empty prompt and whole transcripts for answers.
        hh = [t for t in (rec["chosen"], rec["rejected"])
              if isinstance(t, str) and ("\n\nAssistant:" in t or t.startswith("\n\nHuman:"))]
        if isinstance(rec["chosen"], str) and rec.get("prompt") is None and hh:
            return _hh(rec)
        return _pair(rec)
    fields = ", ".join(sorted(k for k in rec if k != "_where")) or "none"
    raise PipelineError(f"{rec['_where']}: not a comparison record: expected prompt/responses/ranking, chosen/rejected, "
                        f"HH transcripts, conversation/responses/ranks, an OpenAssistant message tree or instruction/output (fields: {fields})")


def _is_tree(rec: dict) -> bool:
    return isinstance(rec.get("prompt"), dict) and "replies" in rec["prompt"]


def is_comparison(rec: dict) -> bool:
    """Whether a record is in one of the comparison formats above (which `to_group` / `group_builders` read)."""
    ranked_list = "instruction" in rec and isinstance(rec.get("output"), list)
    return _is_tree(rec) or ranked_list or "responses" in rec or "chosen" in rec or "rejected" in rec


def group_builders(rec: dict) -> list:
    """What makes the groups of one record: many for an OpenAssistant message tree, else one."""
    rec.setdefault("_where", "record")
    return _oasst_tree_groups(rec) if _is_tree(rec) else [functools.partial(to_group, rec)]


def load_groups(sources: list[str], skip_invalid: bool = False, limit: int = 0) -> list[Group]:
    """Groups from files of any accepted format (mixed freely). `limit` > 0 keeps the first groups."""
    groups, skipped = [], []
    for build in (b for rec in load_records(sources) for b in group_builders(rec)):
        try:
            groups.append(build())
        except InvalidGroup as e:
            if not skip_invalid:
                raise PipelineError(f"{e} (set skip_invalid true to skip such groups)") from None
            skipped.append(str(e))
        if limit and len(groups) >= limit:
            break
    if skipped:
        print(f"[comparisons] skipped {len(skipped)} invalid group(s), first: {skipped[0]}", flush=True)
    if not groups:
        raise PipelineError(f"{', '.join(map(str, sources))}: no comparison groups")
    return groups


# ---- files ------------------------------------------------------------------------------------


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> Path:
    """All records or nothing (the loader's `_where` bookkeeping dropped)."""
    return write_text_atomic(path, "".join(
        json.dumps({k: v for k, v in r.items() if k != "_where"}, ensure_ascii=False, sort_keys=True) + "\n" for r in records))


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import answer
    from pipeline.stage import file_sha256, manifest_hash, portable, read_manifest, require_stage, resolve_init, write_json_atomic
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
            raise PipelineError(f"{r['_where']}: prompt is not part of the world in {world}; the gold judge ranks only "
                                f"world prompts (rank others yourself: export, then import)") from None
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[: args.prompts] if args.prompts else prompts
    if args.k < 2:
        raise PipelineError(f"--k must be >= 2, got {args.k}")
    # Same policy, world, prompts and options as the file on disk: nothing to do (`make all` reruns).
    out_path = Path(args.out or run_dir / "comparisons" / "policy_comparisons.jsonl")
    meta_path = out_path.with_name(out_path.stem + ".meta.json")
    options = {k: getattr(args, k) for k in ("prompts", "k", "temperature", "top_p", "max_new_tokens", "noise", "seed")}
    key = {"model": portable(str(model_dir), run_dir), "model_manifest": manifest_hash(read_manifest(model_dir)),
           "model_weights_mtime": max((p.stat().st_mtime for p in model_dir.glob("*.safetensors")), default=None),
           "truth": file_sha256(world / "truth.json"), "prompts_file": file_sha256(prompts_file), "options": options}
    if not args.force and out_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == key:
        print(f"[comparisons] up to date: {out_path} (same policy, prompts and options; --force resamples)")
        return

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # K samples per prompt in one pass (prompt repeated K times), seeded: the same call gives the same file.
    answers = answer(model, tokenizer, [p for p in prompts for _ in range(args.k)], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    rng = random.Random(f"{args.seed}/labeler")
    out, dropped, labels = [], 0, Counter()
    for n, prompt in enumerate(prompts):
        responses = distinct(answers[n * args.k:(n + 1) * args.k])
        dropped += args.k - len(responses)
        if len(responses) < 2:
            continue
        verdicts = [judge.judge(prompt, r) for r in responses]
        labels.update(v.label for v in verdicts)
        scores = [v.score for v in verdicts]
        out.append({"prompt": prompt, "responses": responses, "family": judge.spec(prompt)["family"],
                    "ranking": judge.order(scores, rng=rng, noise=args.noise),
                    "gold_ranking": judge.order(scores, noise=0)})
    if not out:
        raise PipelineError(f"every prompt got fewer than 2 distinct answers from {model_dir}; raise --temperature or --k")
    meta_path.unlink(missing_ok=True)  # a kill between the two writes leaves no stale "up to date"
    path = write_jsonl_atomic(out_path, out)
    write_json_atomic(meta_path, key)
    k_mean = sum(len(r["responses"]) for r in out) / len(out)
    print(f"[comparisons] {len(out)} groups (mean K {k_mean:.2f}; {dropped} duplicate/empty answers dropped, "
          f"{len(prompts) - len(out)} prompts left with < 2 answers) -> {path}")
    print("[comparisons] gold labels of the samples: " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))


def export(args) -> None:
    source = args.file or str(Path(args.run_dir) / "comparisons" / "policy_comparisons.jsonl")
    out = []
    for rec in load_records(source):
        responses = _responses(rec, "responses", rec.get("responses"))
        out.append({"prompt": _prompt(rec), "responses": responses, "ranking": []})
    path = write_jsonl_atomic(args.out, out)
    print(f"[comparisons] {len(out)} groups to rank -> {path}: fill each 'ranking' with the response indices, best first")


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
    s = sub.add_parser("sample", help="sample K answers per prompt from RUN/sft and rank them with the world's gold labeler")
    s.add_argument("--run_dir", default="runs/default", help="run directory (reads RUN/sft and RUN/world)")
    s.add_argument("--model", default=None, help="policy to sample from (default RUN/sft; e.g. RUN/ppo for another round)")
    s.add_argument("--world", default=None, help="world directory with truth.json (default RUN/world)")
    s.add_argument("--prompts_file", default=None, help="prompts to answer (default RUN/world/comparisons_train.jsonl)")
    s.add_argument("--prompts", type=int, default=200, help="how many prompts (0 = all)")
    s.add_argument("--k", type=int, default=4, help="answers sampled per prompt (duplicates are dropped)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    s.add_argument("--max_new_tokens", type=int, default=48, help="answer length limit")
    s.add_argument("--batch_size", type=int, default=64, help="generation batch size")
    s.add_argument("--noise", type=float, default=None, help="labeler noise (default: the world's)")
    s.add_argument("--seed", type=int, default=0, help="sampling and labeler seed")
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
