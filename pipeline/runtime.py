"""Process setup shared by the stages: accelerate and DeepSpeed settings, seeding, progress, checkpoints."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from pipeline.errors import PipelineError


def deepspeed_launched() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def stage_decides_training_settings() -> None:
    """Drop what `accelerate launch` passes down from its config about mixed precision, gradient
    accumulation, clipping and torch.compile (configs written by `accelerate config` carry them):
    each stage's own config decides them (the `gpu` profiles: bf16; `--compile`). Left in place they
    would silently replace the stage's settings (our loops) or stop the run over the mismatch
    (transformers' Trainer). A dynamo backend would also compile the models whole when prepared,
    and transformers' torch_compile leaves one behind in this process for every later stage."""
    for name in (
        "ACCELERATE_MIXED_PRECISION",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "ACCELERATE_GRADIENT_CLIPPING",
        *[name for name in os.environ if name.startswith("ACCELERATE_DYNAMO_")],
    ):
        os.environ.pop(name, None)


def cpu_and_backend() -> tuple[bool, str | None]:
    """accelerate's `cpu` flag and process-group backend for this machine. Without a GPU accelerate
    forms a multi-process (gloo) group only when told it runs on CPU. DeepSpeed brings its own CPU
    accelerator (DS_ACCELERATOR=cpu) and must not be bypassed; accelerate then needs the backend
    named, or it counts one process while DeepSpeed counts them all."""
    if torch.accelerator.is_available():
        return False, None
    return (False, "gloo") if deepspeed_launched() else (True, None)


# Ranks' seeds lie this far apart, so run seed s's rank r never replays another small run seed's rank 0
# (with seed + rank, seed 0's rank 1 drew exactly what seed 1's rank 0 drew).
RANK_SEED_STRIDE = 1_000_003


def process_seed(seed: int, rank: int) -> int:
    """The seed of one process of a run: distinct across ranks, reproducible, rank 0 keeps `seed`."""
    return seed + rank * RANK_SEED_STRIDE


def set_threads(requested: int = 0) -> int:
    """torch's CPU thread count for this process, returned for the stage's header and manifest.

    0 shares the machine's cores among the processes launched on it (LOCAL_WORLD_SIZE, set by
    torchrun and accelerate): torch's own default gives every process all cores, so two processes
    on a 2-core machine fight over them."""
    if requested <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        requested = max(
            1,
            (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
            // max(local, 1),
        )
    if requested != torch.get_num_threads():
        torch.set_num_threads(requested)
    return torch.get_num_threads()


# ---- precision ------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "no", "bf16", "fp16")


def bf16_hardware() -> str | None:
    """What multiplies bf16 natively on this CPU: "AMX" (Intel Sapphire Rapids and later), "AVX512-BF16"
    (Cooper Lake, AMD Zen 4 and later), or None where bf16 would be emulated (AVX2 only: slower than fp32)."""
    # torch's own probes (private, so looked up: a torch without them reports no bf16 hardware).
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def resolve_precision(setting: str) -> str:
    """accelerate's mixed_precision ("no", "bf16", "fp16") for a stage's `mixed_precision` setting. auto:
    bf16 autocast over fp32 master weights where bf16 is fast - a GPU that has it, a CPU with AMX or
    AVX-512 BF16 (a 1.7-2.9x faster training step on such a Xeon) - and fp32 elsewhere; fp32 or bf16
    force either."""
    if setting not in PRECISIONS:
        raise PipelineError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting in ("fp32", "no"):
        return "no"
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if bf16_hardware() else "no"


def precision_facts(resolved: str) -> dict:
    """What the stage header prints and the manifest records about precision."""
    return {
        "mixed_precision": "fp32" if resolved == "no" else resolved,
        "cpu": cpu_model(),
        "cpu_bf16_hardware": bf16_hardware() or "none",
    }


def precision_line(resolved: str) -> str:
    facts = precision_facts(resolved)
    hardware = "no bf16 hardware" if facts["cpu_bf16_hardware"] == "none" else facts["cpu_bf16_hardware"]
    what = "fp32" if resolved == "no" else f"{resolved} autocast, fp32 weights"
    return f"precision {what} ({facts['cpu']}: {hardware})"


def precision_autocast(resolved: str, device: torch.device | str = "cpu"):
    """Passes outside a training loop (sampling comparisons, `make eval`) at a resolved precision: autocast
    to bf16 / fp16 with the weights as they are, or nothing for fp32 ("no")."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def setup(
    seed: int, mixed_precision: str = "no", gradient_accumulation_steps: int = 1, threads: int = 0
) -> Accelerator:
    """An Accelerator for whatever launched us (python, torchrun, accelerate launch), seeded, with
    `threads` CPU threads (0: this process's share of the cores, see set_threads).

    Each process gets its own seed (process_seed) so data sampling differs across ranks but the run is
    reproducible.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_threads(threads)
    stage_decides_training_settings()
    cpu, backend = cpu_and_backend()
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        kwargs_handlers=handlers,
    )
    if deepspeed_launched():
        # ZeRO-3 shards the trained models when they are prepared; the frozen ones must stay whole.
        load_models_whole()
    set_seed(process_seed(seed, accelerator.process_index))
    return accelerator


def run_as_process(main) -> None:
    """Run a stage's `main` as this process's whole job, then destroy the torch.distributed process
    group (if the launch made one), also when `main` raised. Left to interpreter exit, gloo's worker
    threads can outlive Python and abort a process whose run has finished and saved (SIGABRT,
    "terminate called without an active exception"): 5 of 30 two-process gloo runs here."""
    # One progress bar per stage, its own: not transformers' bars for loading and writing weights.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def load_models_whole() -> None:
    """Models loaded from here on load whole, also under DeepSpeed ZeRO-3, where transformers would
    partition them as they load (zero.Init): a collective, which a load on the main process alone
    (evaluation, a LoRA merge) would wait on forever, and which leaves a model that no engine
    manages without weights for its forwards."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def compile_blocks(model) -> int:
    """torch.compile each transformer block of `model` in place; returns how many were compiled.

    Regional compilation: the blocks are identical, so one compiled graph serves them all and the
    compile time is that of one block whatever the depth (a whole-model graph grows with it). The
    blocks are the classes transformers itself keeps whole (`_no_split_modules`); a model naming none
    is compiled whole. Parameter names do not change, so checkpoints save and load as before."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    compiled = 0
    for module in model.modules():
        if type(module).__name__ in blocks:
            module.compile()
            compiled += 1
    if not compiled:
        model.compile()
    return max(compiled, 1)


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, grad_clip: float) -> None:
    """What DeepSpeed reads from its config, set from the stage's own before prepare(): the
    micro-batch size (a loop without a dataloader gives accelerate none to read it from), the
    gradient accumulation steps (DeepSpeed's engine decides when the optimizer steps) and the
    gradient clipping bound, which the engine applies to the norm of all the gradients it holds
    (the stage's clip_grad_norm_ calls do nothing under DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_batch,
            gradient_clipping=grad_clip,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
        )


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar on the main process only; silent when stderr is not a terminal and CI is set."""
    disable = not enabled or (os.environ.get("CI") and not sys.stderr.isatty())
    return tqdm(total=total, initial=initial, desc=desc, disable=bool(disable), dynamic_ncols=True)


def weights_checksum(model) -> torch.Tensor:
    """A float64 sum over all parameters (tied ones counted once): a cheap fingerprint of the weights.
    Of sharded parameters (FSDP2's DTensors, ZeRO-3's partitions) it sums this process's shard."""
    local = [p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p) for p in model.parameters()]
    return torch.stack([p.detach().double().sum() for p in local]).sum().cpu()


def one_entry_per_parameter(model, state_dict: dict) -> dict:
    """`state_dict` without the second names of tied parameters (an embedding shared with the LM
    head), as the model ties them. Gathered state dicts (DeepSpeed ZeRO-1/2 clones, FSDP2's full
    state dict) no longer share memory between tied names, and transformers would save both."""
    seen, out = set(), dict(state_dict)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            out.pop(name, None)
        seen.add(id(param))
    return out


def merged_from_state_dict(model, state_dict: dict):
    """A plain model: `model` (a fresh peft model, built as the trained one was) given the trained
    model's full state dict, gathered from every process, its LoRA adapters merged in. Stages merge
    such a copy on the main process, never their live model: FSDP or ZeRO-3 may hold that one sharded,
    and merging it on one process alone would wait for the others forever."""
    model.load_state_dict(state_dict)
    return model.merge_and_unload()


def rank_checksums(accelerator, model) -> list[float]:
    """Every process's weights_checksum, gathered: equal on all ranks iff data parallelism kept the
    replicas in sync. (Sharded engines - FSDP, ZeRO-3 - hold different shards; compare under DDP.)"""
    local = weights_checksum(accelerator.unwrap_model(model)).to(accelerator.device)
    return accelerator.gather(local[None]).tolist()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (GPU), in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir, step: int, keep: int = 2, extra: dict | None = None
) -> None:
    """accelerate's full training state (model, optimizer, scheduler, RNG) in `step_N`, written to
    `step_N.tmp` first and renamed, so a kill mid-save never leaves a checkpoint that looks complete."""
    import json
    import shutil
    from pathlib import Path

    final = Path(checkpoints_dir) / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "extra.json").write_text(json.dumps({"step": step, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        steps = sorted(
            (p for p in Path(checkpoints_dir).glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
        )
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, path) -> dict:
    """Restore what save_checkpoint wrote; returns its extra dict (with `step`)."""
    import json
    from pathlib import Path

    accelerator.load_state(str(path))
    return json.loads((Path(path) / "extra.json").read_text())
