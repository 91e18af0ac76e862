"""Prompts (PPO's prompt sets, `make eval`'s own prompt files): a string in `prompt` (`--prompt_field`
another; of a list of turns such as MT-Bench's `turns`, the first), chat `messages` ending in a user
turn, or a bare JSON string per line (data.loading reads it as a `prompt`).

A prompt is a string (one user turn) or a list of {role, content} messages ending in a user turn.
"""

from __future__ import annotations

from data.formats.fields import require_text
from pipeline.errors import PipelineError


def prompt_of(rec: dict, field: str = "prompt") -> str | list[dict]:
    """The prompt string in `field` (of a list of turns, the first: later turns of a multi-turn
    benchmark follow the model's own answers), or chat `messages` ending in a user turn."""
    where = rec.get("_where", "record")
    if isinstance(rec.get(field), list):
        turns = rec[field]
        if not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise PipelineError(
                f"{where}: field '{field}' must be a string or a list of strings starting with a non-empty turn"
            )
        return turns[0]
    if field in rec or "messages" not in rec:
        return require_text(rec, field)
    messages = rec["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise PipelineError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
    if messages[-1]["role"] != "user":
        raise PipelineError(f"{where}: field 'messages' must end in a user turn (got '{messages[-1]['role']}')")
    return messages


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string is one user turn (an empty string: no turn at all)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt else []
    return list(prompt)
