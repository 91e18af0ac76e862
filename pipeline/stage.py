"""Stage directories: the contract between stages.

A finished stage directory is a plain Hugging Face checkpoint plus `manifest.json`, written last and
atomically. No manifest means unfinished: downstream stages refuse it. Work in progress lives in
`checkpoints/` inside the directory, and `run.json` records which config the checkpoints belong to,
so a rerun with the same config resumes and a rerun with another one starts over (and says why).
One run at a time: the main process holds an flock on `.lock` in the directory while it runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
LOCK = ".lock"
# The make target that produces each stage, named in errors about a missing parent.
MAKE_TARGET = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "ppo": "ppo"}
# Config keys that do not change what a stage produces: changing them neither redoes a finished
# stage nor discards checkpoints. A thread count changes only the order of float sums, so a stage made
# on two threads is up to date for a rerun on one (`make methods` runs its jobs side by side on one each).
RUNTIME_KEYS = {"save_every", "log_every", "keep_checkpoints", "report_to", "progress", "threads"}
# Options added after runs were made, with the value every earlier run implicitly had: hashed only
# away from it, so stages finished before the option existed stay up to date.
LATER_KEYS = {"compile": False}


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


def append_jsonl_line(path: str | Path, record: dict) -> None:
    """Append one JSON line durably: one write() of the whole line on an O_APPEND descriptor, then fsync,
    so a killed writer leaves the line whole or absent. A torn last line (power loss mid-write) is cut
    off first, so the file stays a list of complete records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            with open(path, "rb") as f:
                os.ftruncate(fd, f.read().rfind(b"\n") + 1)
        written = os.write(fd, line)
        if written != len(line):  # a short write (disk full): take the partial line back out
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"{path}: disk full? wrote {written} of {len(line)} bytes; the record was not saved")
        os.fsync(fd)
    finally:
        os.close(fd)


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
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
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


def check_run_dir(path: str | Path) -> None:
    """A run or stage directory must be a directory, or not exist yet (it is made): a file where one
    should be, or above it, is one line instead of NotADirectoryError from deep inside a save."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise PipelineError(f"{p} is a file, not a directory: give --run_dir a directory (made if missing)")
            return


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _rerun(stage_dir: Path, stage: str | None) -> str:
    """What to do about a stage directory whose weights are broken."""
    if stage and stage_dir.name == stage:  # RUN/<stage>: the make target that wrote it rewrites it
        return f"rerun that stage (`make {MAKE_TARGET.get(stage, stage)} RUN={stage_dir.parent}`)"
    return f"rerun the {stage} stage that wrote it" if stage else "save or download that checkpoint again"


def weights_problem(model_dir: str | Path) -> str | None:
    """Why the weights in `model_dir` cannot be loaded (a safetensors file cut short or corrupt, a shard
    its index names missing), or None. Parses headers and checks sizes (safe_open: no tensor is read),
    so a truncated copy or a disk that filled up is named here, not as a traceback in from_pretrained."""
    from safetensors import safe_open

    d = Path(model_dir)
    for index in sorted(d.glob("*.safetensors.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index}: not a readable safetensors index ({type(e).__name__})"
        missing = [name for name in shards if not (d / name).is_file()]
        if missing:
            return f"{d / missing[0]}: missing (named in {index.name})"
    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # SafetensorError, OSError: the library's message says which
            return f"{f}: truncated or corrupt ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    return None


def check_weights(model_dir: str | Path, stage: str | None) -> None:
    problem = weights_problem(model_dir)
    if problem:
        raise PipelineError(f"{problem}: {_rerun(Path(model_dir), stage)}")


def require_stage(stage_dir: str | Path, stage: str, run_dir: str | Path | None = None) -> dict:
    """Return the manifest of a finished parent stage (its weights loadable), or stop with what to do:
    the command that makes RUN/<stage>, or for a path given elsewhere, that it is not a finished stage."""
    if run_dir is not None:
        check_run_dir(run_dir)
    manifest = read_manifest(stage_dir)
    p = Path(stage_dir)
    if manifest is None:
        what = (
            "is a file"
            if p.is_file()
            else "is not a finished stage (no complete manifest.json)"
            if p.exists()
            else "does not exist"
        )
        if run_dir is None or _same_path(p, Path(run_dir) / stage):
            run = f" RUN={run_dir}" if run_dir else ""
            raise PipelineError(f"{stage_dir} {what}: run `make {MAKE_TARGET.get(stage, stage)}{run}` first")
        # A path given in place of RUN/<stage>: `make` would not write there, so do not suggest it.
        raise PipelineError(f"{stage_dir} {what}, so it is not a finished {stage} stage: give the directory of one")
    check_weights(p, manifest.get("stage", stage))
    return manifest


def resolve_init(path_or_id: str) -> tuple[str, dict | None]:
    """A model to start from: a finished stage dir (with manifest), a plain HF checkpoint dir, or a
    Hub id. Returns (path, manifest or None)."""
    p = Path(path_or_id)
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest is not None:
            check_weights(p, manifest.get("stage"))
            return str(p), manifest
        if (p / "run.json").exists() or (p / "checkpoints").exists():
            raise PipelineError(f"{p} is an unfinished stage directory (no manifest.json): rerun that stage first")
        if not (p / "config.json").is_file():
            raise PipelineError(
                f"{p}: neither a finished stage (manifest.json) nor a Hugging Face checkpoint (config.json)"
            )
        check_weights(p, None)
        return str(p), None
    if p.is_file():
        raise PipelineError(f"{path_or_id} is a file, not a model directory")
    if p.exists() or path_or_id.startswith((".", "/")) or path_or_id.count("/") > 1:
        raise PipelineError(f"{path_or_id}: no such model directory")
    return path_or_id, None  # a Hub id; loading it reports its own errors


# Stage directories whose lock this process holds: real path -> the open lock file.
_LOCKS: dict[str, Any] = {}


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def lock_stage_dir(stage_dir: str | Path, stage: str) -> None:
    """Hold an exclusive flock on stage_dir/.lock until release_stage_locks() or the process ends, or
    stop with one line naming the holder. The kernel drops an flock when its holder dies, even by
    SIGKILL, so the file a killed run leaves behind blocks nothing."""
    d = Path(stage_dir)
    key = os.path.realpath(d)
    if key in _LOCKS:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        f = open(d / LOCK, "a+", encoding="utf-8")
    except OSError as e:  # a read-only or foreign directory
        raise PipelineError(f"{d / LOCK}: cannot create the stage's lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: another open file holds it
        f.seek(0)
        holder = _holder(f.read())
        f.close()
        raise PipelineError(
            f"{d} is in use by another run of the {stage} stage ({holder}): wait for it to end, or stop it"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        + "\n"
    )
    f.flush()
    _LOCKS[key] = f


def held_stage_locks() -> set[str]:
    return set(_LOCKS)


def release_stage_locks(keep: set[str] = frozenset()) -> None:
    """Let go of the stage directories this process locked (but those in `keep`). The lock file stays:
    deleting it could let a run that opened it just before lock a file no one else can see."""
    for key in [k for k in _LOCKS if k not in keep]:
        _LOCKS.pop(key).close()


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
        rest = value[len(prefix) :].lstrip("/")
        return "{run_dir}/" + os.path.normpath(rest) if rest else "{run_dir}"
    if isinstance(value, (list, tuple)):
        return [portable(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {portable(k, run_dir): portable(v, run_dir) for k, v in value.items()}
    return value


def _run_key(config: dict, parent_hash: str | None, data: dict) -> str:
    run_dir = config.get("run_dir", "")
    stable = {
        k: portable(v, run_dir)
        for k, v in config.items()
        if k not in RUNTIME_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])
    }
    if "threads" in config:  # hashed at its default, so stages finished before it was a runtime key stay up to date
        stable["threads"] = 0
    blob = json.dumps(
        {"config": stable, "parent": parent_hash, "data": portable(data, run_dir)}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff(old: dict, new: dict) -> str:
    old, new = portable(old, old.get("run_dir", "")), portable(new, new.get("run_dir", ""))
    keys = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "parent or data changed"


# What a complete checkpoint holds besides its state file: the weights, whole, sharded (index; FSDP's
# pytorch_model_fsdp_0/, DeepSpeed's global_stepN/) or LoRA adapters.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step of a complete checkpoint, None for a save a kill or a full disk cut short. Two layouts:
    `step_N` (accelerate's state, pretrain and ppo: extra.json, written last, parses) and `checkpoint-N`
    (HF Trainer, sft and reward: trainer_state.json, written last, parses, and the weights are there)."""
    try:
        if checkpoint.name.startswith("step_"):
            step = json.loads((checkpoint / "extra.json").read_text(encoding="utf-8"))["step"]
            return step if isinstance(step, int) else None
        step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        names = {p.name for p in checkpoint.iterdir()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    weights = names & set(WEIGHT_FILES) or any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)
    return step if isinstance(step, int) and weights else None


def last_complete_checkpoint(checkpoints: str | Path, remove_incomplete: bool = False) -> tuple[str | None, int]:
    """(path, step) of the newest complete checkpoint in `checkpoints`, or (None, 0): the one rule every
    stage resumes by. Newer incomplete ones are passed over; with `remove_incomplete` (the main process)
    they are deleted too: the resumed run redoes their steps, and a half-written folder must not outlive
    it. (`step_N.tmp`, a save in progress, is no checkpoint at all.)"""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return None, 0
    number = {
        p: p.name.split("_" if p.name.startswith("step_") else "-")[-1]
        for p in checkpoints.iterdir()
        if p.is_dir() and p.name.startswith(("step_", "checkpoint-"))
    }
    for checkpoint in sorted(
        (p for p, n in number.items() if n.isdigit()), key=lambda p: int(number[p]), reverse=True
    ):
        step = checkpoint_step(checkpoint)
        if step is not None:
            return str(checkpoint), step
        if remove_incomplete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None, 0


class StageRun:
    """One execution of a stage in `run_dir/stage`.

    `begin()` decides: already finished with this config (skip), resumable checkpoints (resume), or a
    fresh start; `finish()` writes the manifest last.
    """

    def __init__(
        self,
        stage: str,
        stage_dir: str | Path,
        config: dict,
        parent: dict | None,
        parent_path: str | None,
        data_files: list[str],
        is_main: bool = True,
    ):
        check_run_dir(stage_dir)
        self.stage, self.dir, self.config = stage, Path(stage_dir), config
        self.parent_path, self.parent_hash = parent_path, manifest_hash(parent)
        # Every rank computes the same key, so all of them agree on "up to date" and none hangs.
        self.data = data_fingerprint(data_files)
        self.is_main = is_main
        self.key = _run_key(config, self.parent_hash, self.data)
        self.started = time.time()
        self.checkpoints = self.dir / "checkpoints"

    def begin(self, force: bool = False) -> bool:
        """Return False when the stage is already finished with this exact config and parent. The main
        process first locks the directory: a second run of the stage at once stops here, in one line."""
        if self.is_main:
            lock_stage_dir(self.dir, self.stage)
        old = read_manifest(self.dir)
        # Finished, but its weights since cut short (a disk that filled up, a bad copy): redo, rather than
        # call it up to date and leave the next stage to find it broken.
        same = old is not None and old.get("run_key") == self.key and not force
        broken = weights_problem(self.dir) if same else None
        if same and broken is None:
            print(
                f"[{self.stage}] up to date: {self.dir}/{MANIFEST} (same config, parent and data); "
                f"pass --force true to redo",
                flush=True,
            )
            return False
        if not self.is_main:
            return True
        if old is not None:
            why = "--force" if force else broken or _diff(old.get("config", {}), self.config)
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
        """Newest complete checkpoint in checkpoints/ (last_complete_checkpoint), or None."""
        path, _ = last_complete_checkpoint(self.checkpoints, remove_incomplete=self.is_main)
        return None if path is None else Path(path)

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
