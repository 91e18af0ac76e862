"""Reward comparisons: every record becomes a `Group`, one prompt and K >= 2 responses ordered best
first (`load_groups` reads files of any of these formats, mixed freely). Accepted formats:

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

import functools
import re
from dataclasses import dataclass

from data.formats.fields import ROLES, require_text
from data.loading import load_records
from pipeline.errors import PipelineError

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
    if (
        not isinstance(value, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        or sorted(value) != list(range(k))
    ):
        raise PipelineError(
            f"{where}: field '{field}' must be a permutation of 0..{k - 1} (the responses, best first), got {value!r}"
        )
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


def _messages(
    rec: dict, field: str, value, role_key: str = "role", text_key: str = "content", rename: dict | None = None
) -> list[dict]:
    where = rec["_where"]
    if not isinstance(value, list):
        raise PipelineError(f"{where}: field '{field}' must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        role = (rename or {}).get(m.get(role_key), m.get(role_key)) if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(m.get(text_key), str):
            raise PipelineError(
                f"{where}: field '{field}' message {i} must be "
                f"{{'{role_key}': one of {'/'.join(ROLES)}, '{text_key}': text}}"
            )
        out.append({"role": role, "content": m[text_key]})
    return out


def _prompt(rec: dict, field: str = "prompt", allow_empty: bool = False) -> str | list[dict]:
    value = rec.get(field)
    if isinstance(value, list):
        messages = _messages(rec, field, value)
        if messages and messages[-1]["role"] != "user":
            raise PipelineError(
                f"{rec['_where']}: field '{field}' must end with a user turn (the response answers it)"
            )
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
    if (
        not isinstance(ranks, list)
        or len(ranks) != len(responses)
        or not all(isinstance(r, (int, float)) for r in ranks)
    ):
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
        if (
            not isinstance(node, dict)
            or node.get("role") not in ("prompter", "assistant")
            or not isinstance(node.get("text"), str)
        ):
            raise PipelineError(
                f"{rec['_where']}: field 'prompt' message {trail} must be "
                "{'role': prompter/assistant, 'text': text, ...}"
            )
        if node.get("deleted") or node.get("review_result") is False:  # withdrawn or failed review: not data
            return
        path = path + [{"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise PipelineError(f"{rec['_where']}: field 'prompt' message {trail}: 'replies' must be a list")
        ranked = [
            (r["rank"], i, r)
            for i, r in enumerate(replies)
            if isinstance(r, dict)
            and not r.get("deleted")
            and r.get("review_result") is not False
            and isinstance(r.get("rank"), (int, float))
            and not isinstance(r.get("rank"), bool)
            and r.get("role") == "assistant"
        ]
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
    if not isinstance(history, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
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
    return [
        {"role": "user" if role == "Human" else "assistant", "content": body.strip()}
        for role, body in zip(parts[1::2], parts[2::2], strict=False)
    ]


def _hh(rec: dict) -> Group:
    where = rec["_where"]
    chosen, rejected = hh_turns(rec, "chosen"), hh_turns(rec, "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns):
            raise PipelineError(
                f"{where}: field '{field}' is a transcript without a final Assistant turn after a Human turn"
            )
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
            raise InvalidGroup(
                f"{where}: 'chosen' and 'rejected' conversations differ before the final assistant turn"
            )
        else:
            prompt = chosen[:-1]
        return _pair_group(where, prompt, chosen[-1]["content"], rejected[-1]["content"])
    prompt = _prompt(rec, allow_empty=True)
    return _pair_group(
        where, prompt, require_text(rec, "chosen", allow_empty=True), require_text(rec, "rejected", allow_empty=True)
    )


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
        hh = [
            t
            for t in (rec["chosen"], rec["rejected"])
            if isinstance(t, str) and ("\n\nAssistant:" in t or t.startswith("\n\nHuman:"))
        ]
        if isinstance(rec["chosen"], str) and rec.get("prompt") is None and hh:
            return _hh(rec)
        return _pair(rec)
    fields = ", ".join(sorted(k for k in rec if k != "_where")) or "none"
    raise PipelineError(
        f"{rec['_where']}: not a comparison record: expected prompt/responses/ranking, "
        f"chosen/rejected, HH transcripts, conversation/responses/ranks, an OpenAssistant message "
        f"tree or instruction/output (fields: {fields})"
    )


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


# ---- K-wise rankings as preference pairs (DPO) ------------------------------------------------

# How a ranking of K answers becomes (chosen, rejected) pairs: "all" C(K,2) pairs, as InstructGPT's
# reward loss compares them; "top", the labeler's favourite against each of the K - 1 others.
PAIR_MODES = ("top", "all")


def pair_indices(k: int, mode: str) -> list[tuple[int, int]]:
    """(better, worse) indices into a group's responses, ordered best first: every pair (i, j) with
    i < j for "all", (0, j) for "top". K = 2 gives [(0, 1)] either way."""
    if mode not in PAIR_MODES:
        raise PipelineError(f"pair mode must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    if mode == "top":
        return [(0, j) for j in range(1, k)]
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def preference_pairs(group: Group, mode: str) -> list[tuple[str, str]]:
    """A group's (chosen, rejected) answers under `mode` (pair_indices)."""
    return [(group.responses[i], group.responses[j]) for i, j in pair_indices(len(group.responses), mode)]
