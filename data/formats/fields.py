"""The field checks every record format shares: a string field, the chat roles, an empty text.

Every problem is one line naming the file, the record and the field (the loader's `_where`).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError

ROLES = ("system", "user", "assistant")


class EmptyField(PipelineError):
    """A well-formed record whose text is empty: nothing to learn from. Stages that may skip such
    records (SFT's skip_invalid) catch this; to everything else it is a PipelineError like any other."""


def require_text(rec: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    """The string in `field`, or a one-line error naming file, record and field."""
    where = rec.get("_where", "record")
    if field not in rec:
        raise PipelineError(f"{where}: missing field '{field}'")
    value = rec[field]
    if value is None:  # JSON null (or an empty parquet/Hub cell): the field is there, its value is not
        raise PipelineError(f"{where}: field '{field}' is null, expected a string")
    if not isinstance(value, str):
        raise PipelineError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise EmptyField(f"{where}: field '{field}' is empty")
    return value
