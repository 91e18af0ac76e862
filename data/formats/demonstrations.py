"""SFT demonstrations: every record becomes TRL's conversational prompt/completion pair (prompt = the
turns before the final assistant turn, completion = that turn). Accepted formats:

- prompt/completion (canonical): `prompt`, `completion` strings, optional `system`; or TRL's
  conversational form (`prompt` messages ending in a user turn, `completion` one assistant turn).
- chat: `messages` [{role, content}] ending in an assistant turn, with a user turn before it.
- Dolly: `instruction`, `context` (appended to the instruction), `response`.
- Alpaca, LIMA, oasst in LLaMA-Factory form: `instruction`, `input` (appended), `output`, `history`
  ([user, assistant] pairs), optional `system`.
- other field names: `--columns role=field` (roles: prompt, completion, messages, system, context,
  history; `column_map`).
- any reward comparison format (data.formats.comparisons): its top-ranked answer, one per group.
"""

from __future__ import annotations

from accelerate import PartialState

from data.formats.comparisons import InvalidGroup, group_builders, is_comparison
from data.formats.fields import ROLES, EmptyField, require_text
from data.formats.prompts import as_messages
from data.loading import load_records
from pipeline.errors import PipelineError

# The roles a `--columns role=field` entry may name: what each field of a record means.
COLUMN_ROLES = ("prompt", "completion", "messages", "system", "context", "history")


def column_map(columns: list[str]) -> dict[str, str]:
    """`["prompt=question", "completion=answer"]` -> {"prompt": "question", "completion": "answer"}."""
    mapping = {}
    for entry in columns:
        role, sep, source = entry.partition("=")
        if not sep or not role or not source:
            raise PipelineError(f"columns: '{entry}' is not role=field (e.g. prompt=question)")
        if role not in COLUMN_ROLES:
            raise PipelineError(f"columns: unknown role '{role}' in '{entry}' (roles: {', '.join(COLUMN_ROLES)})")
        mapping[role] = source
    return mapping


# Field names of the formats recognised without --columns (role -> field). Dolly's `context` and Alpaca's
# `input` are appended to the instruction; Alpaca's `history` holds earlier [user, assistant] turns.
DOLLY = {"prompt": "instruction", "context": "context", "completion": "response"}
ALPACA = {
    "prompt": "instruction",
    "context": "input",
    "completion": "output",
    "history": "history",
    "system": "system",
}
PROMPT_COMPLETION = {"prompt": "prompt", "completion": "completion", "system": "system"}


# ---- demonstrations -> conversational prompt/completion ------------------------------------------


def detect_columns(rec: dict, columns: dict[str, str]) -> dict[str, str]:
    """Which field plays which role in this record: the user's --columns, else the format it looks like."""
    if columns:
        return columns if "messages" in columns else {**PROMPT_COMPLETION, **columns}
    if "messages" in rec:
        return {"messages": "messages"}
    if "instruction" in rec:
        return DOLLY if "response" in rec else ALPACA
    if "prompt" in rec or "completion" in rec:
        return PROMPT_COMPLETION
    found = ", ".join(sorted(k for k in rec if k != "_where")) or "none"
    raise PipelineError(
        f"{rec.get('_where', 'record')}: missing field 'completion' or 'messages' (found: {found}); expected "
        "prompt+completion, messages, instruction+response or instruction+output, or map yours with "
        "--columns prompt=FIELD completion=FIELD"
    )


def chat_turns(rec: dict, field: str, value) -> list[dict]:
    """Validate a list of {role, content} messages."""
    where = rec.get("_where", "record")
    if not isinstance(value, list) or not value:
        raise PipelineError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise PipelineError(
                f"{where}: field '{field}' message {i + 1} must be an object with 'role' and string 'content'"
            )
        if m["role"] not in ROLES:
            raise PipelineError(
                f"{where}: field '{field}' message {i + 1} has unknown role '{m['role']}' (use {', '.join(ROLES)})"
            )
        if not m["content"].strip():
            raise EmptyField(f"{where}: field '{field}' message {i + 1} ({m['role']}) is empty")
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def history_turns(rec: dict, field: str) -> list[dict]:
    """Alpaca/LIMA/oasst style earlier turns: [[user, assistant], ...]."""
    where, value = rec.get("_where", "record"), rec.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PipelineError(f"{where}: field '{field}' must be a list of [user, assistant] pairs")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise PipelineError(f"{where}: field '{field}' item {i + 1} must be a [user, assistant] pair of strings")
        if not all(t.strip() for t in pair):
            raise EmptyField(f"{where}: field '{field}' item {i + 1} holds an empty turn")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def to_conversation(rec: dict, columns: dict[str, str]) -> dict:
    """One demonstration as TRL's conversational prompt/completion: prompt = every turn before the final
    assistant turn, completion = that turn (the only tokens with a loss)."""
    where = rec.get("_where", "record")
    fields = detect_columns(rec, columns)
    if "messages" in fields:
        turns = chat_turns(rec, fields["messages"], rec.get(fields["messages"]))
        if turns[-1]["role"] != "assistant":
            raise PipelineError(
                f"{where}: field '{fields['messages']}': conversation must end with an assistant "
                f"turn (last turn is '{turns[-1]['role']}')"
            )
        if not any(t["role"] == "user" for t in turns[:-1]):
            raise PipelineError(
                f"{where}: field '{fields['messages']}': no user turn before the final assistant turn (empty prompt)"
            )
        return {"prompt": turns[:-1], "completion": turns[-1:]}
    if isinstance(rec.get(fields["prompt"]), list):  # already TRL's conversational prompt/completion
        prompt = chat_turns(rec, fields["prompt"], rec[fields["prompt"]])
        completion = chat_turns(rec, fields["completion"], rec.get(fields["completion"]))
        if prompt[-1]["role"] != "user" or [t["role"] for t in completion] != ["assistant"]:
            raise PipelineError(
                f"{where}: conversational '{fields['prompt']}' must end with a user turn and "
                f"'{fields['completion']}' must be one assistant turn"
            )
        return {"prompt": prompt, "completion": completion}

    prompt = require_text(rec, fields["prompt"])
    context = rec.get(fields["context"]) if "context" in fields else None
    if context is not None and not isinstance(context, str):
        raise PipelineError(f"{where}: field '{fields['context']}' must be a string, got {type(context).__name__}")
    if context and context.strip():
        prompt = f"{prompt}\n\n{context}"
    completion = require_text(rec, fields["completion"])
    system = rec.get(fields["system"]) if "system" in fields else None
    turns = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    turns += history_turns(rec, fields["history"]) if "history" in fields else []
    return {
        "prompt": turns + [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
    }


def best_answers(rec: dict) -> list[dict]:
    """Comparison data (K-wise rankings, OpenAssistant replies or message trees, chosen/rejected pairs,
    HH transcripts, ranked output lists): one demonstration per group, its prompt and top-ranked answer."""
    out = []
    for build in group_builders(rec):
        group = build()
        out.append(
            {
                "prompt": as_messages(group.prompt),
                "completion": [{"role": "assistant", "content": group.responses[0]}],
                "_where": group.where,
            }
        )
    return out


def load_demonstrations(
    sources: list[str], columns: dict[str, str], skip_invalid: bool = False
) -> tuple[list[dict], int]:
    """Demonstrations as prompt/completion conversations, and how many empty ones were skipped."""
    records = load_records(sources)
    if not records:
        raise PipelineError(f"{', '.join(sources)}: no demonstrations")
    examples, skipped = [], []
    for r in records:
        try:
            if not columns and is_comparison(r):
                examples += best_answers(r)
            else:
                examples.append({**to_conversation(r, columns), "_where": r.get("_where", "record")})
        except (EmptyField, InvalidGroup) as e:
            if not skip_invalid:
                raise PipelineError(f"{e} (set skip_invalid true to skip such records)") from None
            skipped.append(str(e))
    if skipped:
        PartialState().print(
            f"[sft] warning: skipped {len(skipped)} unusable record(s), first: {skipped[0]}", flush=True
        )
    if not examples:
        raise PipelineError(f"{', '.join(sources)}: no usable demonstrations")
    return examples, len(skipped)
