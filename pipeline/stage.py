"""Stage directories: the contract between stages.

A finished stage directory is a plain Hugging Face checkpoint plus `manifest.json`, written last and
atomically. No manifest means unfinished: downstream stages refuse it. Work in progress lives in
`checkpoints/` inside the directory, and `run.json` records which config the checkpoints belong to,
so a rerun with the same config resumes and a rerun with another one starts over (and says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
# The make target that produces each stage, named in errors about a missing parent.
MAKE_TARGET = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "ppo": "ppo"}
# Config keys that do not change what a stage produces: changing them neither redoes a finished
# stage nor discards checkpoints.
RUNTIME_KEYS = {"save_every", "log_every", "keep_checkpoints", "report_to", "progress"}


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(paths: list[str]) -> dict[str, str]:
    """sha256 of each local data file (Hub ids are recorded by name)."""
    return {p: (file_sha256(p) if Path(p).is_file() else "hub-or-dir") for p in paths}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def require_stage(stage_dir: str | Path, stage: str, run_dir: str | Path | None = None) -> dict:
    """Return the manifest of a finished parent stage, or stop with the command that makes it."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        run = f" RUN={run_dir}" if run_dir else ""
        what = "is not a finished stage (no complete manifest.json)" if Path(stage_dir).exists() else "does not exist"
        raise PipelineError(f"{stage_dir} {what}: run `make {MAKE_TARGET.get(stage, stage)}{run}` first")
    return manifest


def resolve_init(path_or_id: str) -> tuple[str, dict | None]:
    """A model to start from: a finished stage dir (with manifest), a plain HF checkpoint dir, or a
    Hub id. Returns (path, manifest or None)."""
    p = Path(path_or_id)
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest is not None:
            return str(p), manifest
        if (p / "run.json").exists() or (p / "checkpoints").exists():
            raise PipelineError(f"{p} is an unfinished stage directory (no manifest.json): rerun that stage first")
        if not (p / "config.json").is_file():
            raise PipelineError(f"{p}: neither a finished stage (manifest.json) nor a Hugging Face checkpoint (config.json)")
        return str(p), None
    if p.exists() or path_or_id.startswith((".", "/")) or path_or_id.count("/") > 1:
        raise PipelineError(f"{path_or_id}: no such model directory")
    return path_or_id, None  # a Hub id; loading it reports its own errors


def manifest_hash(manifest: dict | None) -> str | None:
    if manifest is None:
        return None
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trains_on_world(files: list[str], world_dir: str | Path) -> bool:
    """Whether a stage's training files include the embedded world's (RUN/world/...). Only then do the
    world's other files (validation splits, evaluation prompts, its gold judge) describe what the stage
    learns; `make` writes the world into every run, so a run on your own data has one too."""
    world = Path(world_dir).resolve()
    return any(Path(f).resolve().parent == world for f in files)


def portable(value: Any, run_dir: str | Path) -> Any:
    """`value` with every path inside `run_dir` written relative to it ("{run_dir}/world/..."): a run
    moved, copied or named by another path (absolute, relative) holds the same work, so run keys built
    from this do not send every stage round again."""
    prefix = str(run_dir).rstrip("/")
    if isinstance(value, str) and prefix and (value == prefix or value.startswith(prefix + "/")):
        rest = value[len(prefix):].lstrip("/")
        return "{run_dir}/" + os.path.normpath(rest) if rest else "{run_dir}"
    if isinstance(value, (list, tuple)):
        return [portable(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {portable(k, run_dir): portable(v, run_dir) for k, v in value.items()}
    return value


def _run_key(config: dict, parent_hash: str | None, data: dict) -> str:
    run_dir = config.get("run_dir", "")
    stable = {k: portable(v, run_dir) for k, v in config.items() if k not in RUNTIME_KEYS}
    blob = json.dumps({"config": stable, "parent": parent_hash, "data": portable(data, run_dir)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff(old: dict, new: dict) -> str:
    old, new = portable(old, old.get("run_dir", "")), portable(new, new.get("run_dir", ""))
    keys = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "parent or data changed"


class StageRun:
    """One execution of a stage in `run_dir/stage`.

    `begin()` decides: already finished with this config (skip), resumable checkpoints (resume), or a
    fresh start; `finish()` writes the manifest last.
    """

    def __init__(self, stage: str, stage_dir: str | Path, config: dict, parent: dict | None,
                 parent_path: str | None, data_files: list[str], is_main: bool = True):
        self.stage, self.dir, self.config = stage, Path(stage_dir), config
        self.parent_path, self.parent_hash = parent_path, manifest_hash(parent)
        # Every rank computes the same key, so all of them agree on "up to date" and none hangs.
        self.data = data_fingerprint(data_files)
        self.is_main = is_main
        self.key = _run_key(config, self.parent_hash, self.data)
        self.started = time.time()
        self.checkpoints = self.dir / "checkpoints"

    def begin(self, force: bool = False) -> bool:
        """Return False when the stage is already finished with this exact config and parent."""
        old = read_manifest(self.dir)
        if old is not None and old.get("run_key") == self.key and not force:
            print(f"[{self.stage}] up to date: {self.dir}/{MANIFEST} (same config, parent and data); "
                  f"pass --force true to redo", flush=True)
            return False
        if not self.is_main:
            return True
        if old is not None:
            why = "--force" if force else _diff(old.get("config", {}), self.config)
            print(f"[{self.stage}] redoing {self.dir}: {why}", flush=True)
            (self.dir / MANIFEST).unlink()
        run = self.dir / "run.json"
        previous = json.loads(run.read_text()) if run.is_file() else None
        if previous is None or previous.get("run_key") != self.key or force:
            if self.checkpoints.exists():
                print(f"[{self.stage}] discarding checkpoints of a different config", flush=True)
                shutil.rmtree(self.checkpoints)
            write_json_atomic(run, {"run_key": self.key, "config": self.config, "started": self.started})
        return True

    def latest_checkpoint(self) -> Path | None:
        """Newest complete checkpoint (`step_N`; `*.tmp` dirs are saves a kill interrupted)."""
        if not self.checkpoints.is_dir():
            return None
        done = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
        return max(done, key=lambda p: int(p.name[5:]), default=None)

    def finish(self, metrics: dict, extra: dict | None = None) -> dict:
        """Write manifest.json (last, atomically) and drop the work-in-progress checkpoints."""
        manifest = {
            "stage": self.stage,
            "run_key": self.key,
            "parent": {"path": self.parent_path, "manifest_hash": self.parent_hash},
            "config": self.config,
            "data": self.data,
            "metrics": metrics,
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "started": self.started,
            "finished": time.time(),
            "seconds": round(time.time() - self.started, 1),
            **(extra or {}),
        }
        write_json_atomic(self.dir / MANIFEST, manifest)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        return manifest
