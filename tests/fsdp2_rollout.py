"""Worker of test_ppo.py::test_ppo_under_fsdp2 (run under torchrun, 2 processes, gloo on CPU).

accelerate forms no FSDP group without GPUs, so this applies accelerate's own FSDP2 preparation
(`fsdp2_prepare_model`, transformer-based wrapping) to the PPO stage's policy + critic pair by hand,
then runs the stage's pieces on it against an unsharded copy: under `gathered`, sampling (in
inference mode), packed response logits and values match while the ranks sample different
lengths (without it FSDP2 unshards per forward, inside inference mode, and fails); afterwards the
weights are sharded again and a training forward/backward of the pair gives the unsharded gradients
averaged over the ranks; a second rollout after an optimizer step matches again; the full state
dict the stage saves and the manifest's weight checksums are right, and so is a LoRA policy merged
from the gathered state dict. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.packing import use_varlen_attention
from pipeline.runtime import merged_from_state_dict, weights_checksum
from stages.ppo.math import truncate_after_eos
from stages.ppo.run import ActorCritic, Critic, episodes, gathered, response_logits, sample, with_lora

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    eos_token_id=1,
    num_labels=1,
)


def actor_critic(lora=None) -> ActorCritic:
    torch.manual_seed(0)
    policy, reward = LlamaForCausalLM(LlamaConfig(**CONFIG)), LlamaForSequenceClassification(LlamaConfig(**CONFIG))
    for model in (policy, reward):
        assert use_varlen_attention(model)
    if lora is not None:
        policy = with_lora(policy, lora)
        for name, p in policy.named_parameters():  # adapters as after training (B starts at 0)
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return ActorCritic(policy.eval(), Critic(reward.eval()))


def accelerate_fsdp2(pair: ActorCritic, rank: int):
    """The pair prepared by accelerate's FSDP2 code, and the stand-in accelerator `gathered` reads."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=False,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None),
        is_fsdp2=True,
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, pair), accelerator


def full_state_dict(model) -> dict:
    """What accelerate's get_state_dict returns under FSDP2."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    )


def check_lora_save(rank: int, tmp: str) -> None:
    """The stage's save of a LoRA policy: from the gathered state dict, merged into a fresh copy."""
    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    if rank == 0:
        actor_critic().policy.save_pretrained(tmp)  # the SFT checkpoint the stage starts from (same seed)
    plain = actor_critic(lora)
    model, _ = accelerate_fsdp2(actor_critic(lora), rank)
    state_dict = {k.removeprefix("policy."): v for k, v in full_state_dict(model).items() if k.startswith("policy.")}
    dist.barrier()
    if rank == 0:
        fresh = with_lora(LlamaForCausalLM.from_pretrained(tmp), lora)  # as the stage builds it from the SFT model
        merged, want = (
            merged_from_state_dict(fresh, state_dict).state_dict(),
            plain.policy.merge_and_unload().state_dict(),
        )
        assert merged.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                merged[key], want[key], atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
            )


def sharded_q_proj(pair: ActorCritic) -> bool:
    weight = pair.policy.model.layers[0].self_attn.q_proj.weight
    return isinstance(weight, DTensor) and weight.to_local().shape[0] == CONFIG["hidden_size"] // 2


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain = actor_critic()
    model, accelerator = accelerate_fsdp2(actor_critic(), rank)
    units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    assert units.count("FSDPLlamaDecoderLayer") == 4, f"decoder layers not wrapped on their own: {units}"
    assert sharded_q_proj(model), "not sharded"

    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (prompts != 0).long()
    new_tokens = 3 if rank == 0 else 9  # the ranks stop at different lengths
    optimizers = [torch.optim.SGD(pair.parameters(), lr=0.5) for pair in (model, plain)]
    for update in range(2):  # rollout, training step, and a second rollout on the new weights
        with torch.no_grad(), gathered(accelerator, model):  # as the stage's rollout: the policy called directly
            tokens, logprobs = sample(model.policy, prompts, mask, new_tokens, 0.0, 1, 0)
            responses, resp_mask, _ = truncate_after_eos(tokens, 1, 0)
            ep = episodes(torch.cat([prompts, responses], 1), torch.cat([mask, resp_mask], 1), resp_mask, packed=True)
            logits, values = response_logits(model.policy, ep, 0.7), model.critic(ep)
        want_tokens, want_logprobs = sample(plain.policy, prompts, mask, new_tokens, 0.0, 1, 0)
        assert torch.equal(tokens, want_tokens), f"sharded sampling differs at update {update}"
        torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(logits, response_logits(plain.policy, ep, 0.7), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, plain.critic(ep), atol=1e-5, rtol=1e-5)
        assert sharded_q_proj(model), "not resharded after the rollout"

        # A training step on each rank's own episodes: FSDP2's gradients are the unsharded pair's
        # averaged over the ranks, as data parallelism's are.
        for pair in (model, plain):
            pair.train()
            logits, values, _ = pair(ep, 0.7)
            (logits.logsumexp(-1).sum() + values.sum()).backward()
            pair.eval()
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=False):
            dist.all_reduce(q.grad)
            q.grad /= dist.get_world_size()
            torch.testing.assert_close(
                p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    # What the stage saves: accelerate's full state dict of the pair (FSDP2 branch of get_state_dict),
    # the policy's half; and the per-rank checksums of the manifest (shard sums, adding up to the whole).
    full = full_state_dict(model)
    if rank == 0:
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(full[key], value, atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    shard_sum = weights_checksum(model.policy)
    dist.all_reduce(shard_sum)
    torch.testing.assert_close(shard_sum, weights_checksum(plain.policy))
    with tempfile.TemporaryDirectory() as tmp:
        check_lora_save(rank, tmp)
        dist.barrier()
    print(f"rank {rank}: ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
