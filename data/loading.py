"""Load records from local files (.txt .jsonl .jsonl.gz .json .parquet .csv) or a Hub dataset id.

Every problem is reported as one line naming the file, the record (1-based line or index) and the
field, because that is what a user needs to fix their data. What a stage makes of the records (the
fields each accepts) is data.formats.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
TEXT_SEPARATOR = "<|endoftext|>"


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream, EOFError
            raise PipelineError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PipelineError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None


def _local_records(path: Path) -> list[dict[str, Any]]:
    name = path.name
    if name.endswith(".txt"):
        # A plain-text corpus: one document per blank-line-separated paragraph block, or, where the file
        # marks documents with <|endoftext|> (TinyStories, GPT-2-era dumps), per marked document: the
        # marker is a separator, not text to learn.
        text = _read_text(path).replace("\r\n", "\n")
        docs = [d.strip() for d in text.split(TEXT_SEPARATOR if TEXT_SEPARATOR in text else "\n\n")]
        return [{"text": d} for d in docs if d]
    if name.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
            records.append(_as_record(rec, path, f"line {i}"))
        return records
    if name.endswith(".json"):
        try:
            obj = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict):  # {"train": [...]} or {"data": [...]}: take the only list
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise PipelineError(f"{path}: expected a JSON array of records")
            obj = lists[0]
        if not isinstance(obj, list):
            raise PipelineError(f"{path}: expected a JSON array of records")
        return [_as_record(r, path, f"record {i}") for i, r in enumerate(obj, 1)]
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(_read_text(path)))
        return [dict(r) for r in reader]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise PipelineError(f"{path}: not a readable parquet file ({e})") from None
    raise PipelineError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")


def _as_record(rec: Any, path: Path, where: str) -> dict[str, Any]:
    if isinstance(rec, str):  # a bare JSON string per line: a text to pretrain on, or a prompt
        return {"text": rec, "prompt": rec, "_where": f"{path}: {where}"}
    if not isinstance(rec, dict):
        raise PipelineError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
    rec["_where"] = f"{path}: {where}"
    return rec


def load_records(sources: str | Iterable[str], split: str = "train") -> list[dict[str, Any]]:
    """Records from one or more sources. Each record carries `_where` ("file: line N") for errors."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = [str(s) for s in sources]
    records: list[dict[str, Any]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
            if not files:
                raise PipelineError(f"{path}: directory holds no data files ({', '.join(LOCAL_SUFFIXES)})")
            for f in files:
                records += _local_records(f)
        elif path.is_file():
            records += _local_records(path)
        elif source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise PipelineError(f"{source}: no such file")
        else:
            records += _hub_records(source, split)
    for i, rec in enumerate(records):
        rec.setdefault("_where", f"{', '.join(sources)}: record {i + 1}")
    return records


def _hub_records(dataset_id: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, missing, private: one line is all the user needs
        raise PipelineError(
            f"{dataset_id}: could not load Hub dataset split '{split}' "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return [dict(r, _where=f"{dataset_id}[{split}]: record {i + 1}") for i, r in enumerate(ds)]


def split_holdout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded `fraction` of whole records (at least one, never all) held out for validation when no
    validation file is given: (kept, held out)."""
    if len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]
