"""Pretraining text: one document per record, in the `text` field (`--text_field` another).

`.txt` files hold the documents themselves (blank-line or `<|endoftext|>`-separated: data.loading
reads them as `text` records), and a bare JSON string per line is a document too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data.formats.fields import require_text
from data.loading import load_records
from pipeline.errors import PipelineError


def load_texts(sources: str | Iterable[str], field: str = "text", split: str = "train") -> list[str]:
    """A pretraining corpus: the `field` of every record, validated."""
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    records = load_records(sources, split)
    if not records:
        raise PipelineError(f"{', '.join(sources)}: corpus is empty")
    return [require_text(r, field) for r in records]
