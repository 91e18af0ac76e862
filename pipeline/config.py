"""Stage configuration: one dataclass per stage, a YAML profile, then `--key value` overrides.

The convention is TRL's `TrlParser`: the profile sets defaults, the command line wins. YAML values go
through the same argparse types as command-line values, so a bad type in either place fails the same
way, with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from pipeline.errors import PipelineError
from pipeline.runtime import resolve_precision

T = TypeVar("T")
STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"


class _Parser(HfArgumentParser):
    """argparse prints a usage block and exits 2; we want one line and our own exit path."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise PipelineError(f"bad option: {message}")


def profile_path(stage: str, profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    return STAGES_DIR / stage / "profiles" / f"{profile}.yaml"


def _to_argv(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_config(cls: type[T], stage: str, argv: list[str] | None = None) -> T:
    """Build `cls` from `--profile NAME|file.yaml` (default: `default`) plus CLI overrides.

    String fields may say `{run_dir}`; it is replaced by the resolved `run_dir`. A list option whose
    first value is `+` adds to the profile's list instead of replacing it (`--train_files + mine.jsonl`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", default=os.environ.get("PROFILE", "default"))
    known, rest = pre.parse_known_args(argv)

    path = profile_path(stage, known.profile)
    if not path.is_file():
        available = sorted(p.stem for p in (STAGES_DIR / stage / "profiles").glob("*.yaml"))
        raise PipelineError(f"{path}: no such profile for stage '{stage}' (available: {', '.join(available)})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise PipelineError(f"{path}: unknown config key '{unknown[0]}' for stage '{stage}'")

    parser = _Parser(cls)
    cfg, remaining = parser.parse_args_into_dataclasses(_to_argv(values) + rest, return_remaining_strings=True)
    if remaining:
        raise PipelineError(f"unknown option '{remaining[0]}' for stage '{stage}' (see --help)")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, list) and value[:1] == ["+"]:
            if f.name in values:
                base = values[f.name]
            else:
                base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(cfg, f.name, list(base) + value[1:])
    run_dir = str(getattr(cfg, "run_dir", ""))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str):
            setattr(cfg, f.name, value.replace("{run_dir}", run_dir))
        elif isinstance(value, list):
            setattr(cfg, f.name, [v.replace("{run_dir}", run_dir) if isinstance(v, str) else v for v in value])
    if isinstance(getattr(cfg, "mixed_precision", None), str):
        # auto/fp32 become what accelerate runs ("no", "bf16"), so the run key and manifest say what ran.
        cfg.mixed_precision = resolve_precision(cfg.mixed_precision)
    check = getattr(cfg, "validate", None)
    if check:
        check()
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
