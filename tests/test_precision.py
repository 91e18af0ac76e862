"""mixed_precision: auto picks bf16 autocast where the hardware multiplies bf16 (AMX, AVX-512 BF16, a GPU
with bf16) and fp32 elsewhere; a stage under bf16 autocast on a CPU still saves fp32 weights that plain
transformers loads."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.config import config_dict, parse_config
from pipeline.errors import PipelineError
from pipeline.runtime import bf16_hardware, cpu_model, precision_facts, precision_line, resolve_precision
from pipeline.stage import read_manifest
from stages.pretrain.config import PretrainConfig
from tests.conftest import make_corpus, read_jsonl, tiny_args, write_jsonl


@pytest.fixture
def cpu_with(monkeypatch):
    """Stub what torch reports of the CPU (and no GPU): cpu_with(amx=..., avx512_bf16=...)."""

    def stub(amx: bool = False, avx512_bf16: bool = False, cuda: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)

    return stub


def test_auto_is_bf16_where_the_cpu_multiplies_bf16_and_fp32_elsewhere(cpu_with):
    cpu_with(amx=True, avx512_bf16=True)
    assert bf16_hardware() == "AMX" and resolve_precision("auto") == "bf16"
    cpu_with(avx512_bf16=True)
    assert bf16_hardware() == "AVX512-BF16" and resolve_precision("auto") == "bf16"
    cpu_with()  # AVX2 only: bf16 would be emulated, slower than fp32
    assert bf16_hardware() is None and resolve_precision("auto") == "no"
    cpu_with(cuda=True)
    assert resolve_precision("auto") == "bf16"


def test_fp32_and_bf16_force_either_and_anything_else_is_refused(cpu_with):
    cpu_with(amx=True)
    assert resolve_precision("fp32") == "no" and resolve_precision("no") == "no"
    cpu_with()
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp16") == "fp16"
    with pytest.raises(PipelineError, match="mixed_precision must be one of auto, fp32, no, bf16, fp16, got 'half'"):
        resolve_precision("half")


def test_a_stage_config_holds_what_runs_so_auto_on_avx2_keys_as_fp32_did(cpu_with):
    cpu_with()
    auto = parse_config(PretrainConfig, "pretrain", ["--profile", "default", "--mixed_precision", "auto"])
    fp32 = parse_config(PretrainConfig, "pretrain", ["--profile", "default", "--mixed_precision", "no"])
    assert auto.mixed_precision == "no" and config_dict(auto) == config_dict(fp32)
    cpu_with(amx=True)
    assert parse_config(PretrainConfig, "pretrain", ["--profile", "default"]).mixed_precision == "bf16"
    # The tiny profile (tests, smoke runs) stays fp32 on any CPU, so results do not depend on the machine.
    assert parse_config(PretrainConfig, "pretrain", ["--profile", "tiny"]).mixed_precision == "no"
    with pytest.raises(PipelineError, match="got 'bf17'"):
        parse_config(PretrainConfig, "pretrain", ["--mixed_precision", "bf17"])


def test_the_header_and_manifest_say_what_ran_on_which_cpu(cpu_with):
    cpu_with(amx=True)
    facts = precision_facts("bf16")
    assert facts["mixed_precision"] == "bf16" and facts["cpu_bf16_hardware"] == "AMX" and facts["cpu"]
    assert "bf16 autocast, fp32 weights" in precision_line("bf16") and "AMX" in precision_line("bf16")
    cpu_with()
    assert precision_facts("no") == {"mixed_precision": "fp32", "cpu": cpu_model(), "cpu_bf16_hardware": "none"}
    assert "no bf16 hardware" in precision_line("no")


def test_pretraining_under_bf16_autocast_saves_fp32_weights_plain_transformers_loads(tmp_path, capsys, own_precision):
    from stages.pretrain.run import main as pretrain_main

    run = tmp_path / "run"
    args = tiny_args(run, make_corpus(tmp_path), "--max_steps", "4", "--threads", "1", "--mixed_precision", "bf16")
    pretrain_main(args)
    assert "precision bf16 autocast, fp32 weights" in capsys.readouterr().out
    manifest = read_manifest(run / "pretrain")
    assert manifest["precision"]["mixed_precision"] == "bf16" and manifest["config"]["mixed_precision"] == "bf16"
    with safe_open(run / "pretrain" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    model = AutoModelForCausalLM.from_pretrained(run / "pretrain")
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert manifest["metrics"]["val_loss"] < 20  # it trained: a loss, not NaN


def test_sft_under_bf16_autocast_trains_through_trl_and_saves_fp32(tmp_path, pretrained_run, world_dir, own_precision):
    from stages.sft.run import main as sft_main

    run = tmp_path / "run"
    run.mkdir()
    os.symlink(pretrained_run / "world", run / "world")
    os.symlink(pretrained_run / "pretrain", run / "pretrain")
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(world_dir / "sft_train.jsonl")[:24])
    sft_main(
        ["--profile", "tiny", "--run_dir", str(run), "--threads", "1", "--train_files", str(train)]
        + ["--max_steps", "3", "--mixed_precision", "bf16"]
    )
    manifest = read_manifest(run / "sft")
    assert manifest["precision"]["mixed_precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(run / "sft")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
