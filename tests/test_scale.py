"""Scaling out without GPUs: the shipped accelerate configs parse and select the intended engine, and
every stage's `gpu` profile loads and validates."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from pipeline.config import parse_config
from tests.conftest import ROOT

CONFIGS = {
    "ddp.yaml": ("MULTI_GPU", None),
    "fsdp.yaml": ("FSDP", None),
    "zero2.yaml": ("DEEPSPEED", 2),
    "zero2_offload.yaml": ("DEEPSPEED", 2),
    "zero3.yaml": ("DEEPSPEED", 3),
    "zero3_offload.yaml": ("DEEPSPEED", 3),
}
STAGES = ["pretrain", "sft", "reward", "ppo", "dpo"]


def stage_config_class(stage: str):
    """The one config dataclass a stage's config.py defines."""
    module = importlib.import_module(f"stages.{stage}.config")
    found = [
        c
        for c in vars(module).values()
        if dataclasses.is_dataclass(c) and isinstance(c, type) and c.__module__ == module.__name__
    ]
    assert len(found) == 1, f"stages/{stage}/config.py should define one config dataclass, found {found}"
    return found[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_selects_intended_engine(name):
    cfg = load_config_from_file(str(ROOT / "pipeline" / "accelerate" / name))
    kind, zero = CONFIGS[name]
    assert str(cfg.distributed_type).split(".")[-1] == kind
    # Precision, accumulation and clipping are the stage config's (PROFILE=gpu: bf16), not the launcher's.
    assert cfg.mixed_precision in (None, "no") and not cfg.use_cpu
    if zero is not None:
        assert cfg.deepspeed_config["zero_stage"] == zero
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(cfg.deepspeed_config)
        offload = "offload" in name
        assert (cfg.deepspeed_config["offload_optimizer_device"] == "cpu") == offload


def test_every_accelerate_config_is_covered():
    shipped = {p.name for p in (ROOT / "pipeline" / "accelerate").glob("*.yaml")}
    assert shipped == set(CONFIGS)


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_profile_loads_and_validates(stage, tmp_path):
    if not (ROOT / "stages" / stage / "profiles" / "gpu.yaml").exists():
        pytest.fail(f"stages/{stage}/profiles/gpu.yaml is missing")
    cfg = parse_config(stage_config_class(stage), stage, ["--profile", "gpu", "--run_dir", str(tmp_path)])
    assert cfg.run_dir == str(tmp_path)


@pytest.mark.parametrize("stage", STAGES)
def test_every_config_field_has_help(stage):
    for f in dataclasses.fields(stage_config_class(stage)):
        assert f.metadata.get("help"), f"stages/{stage}/config.py: field '{f.name}' has no help"


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_field(stage, capsys):
    # argparse %-formats each help line, so a bare "%" in a help text breaks `--help` for the whole stage.
    with pytest.raises(SystemExit) as exit_info:
        parse_config(stage_config_class(stage), stage, ["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for f in dataclasses.fields(stage_config_class(stage)):
        assert f"--{f.name}" in shown
