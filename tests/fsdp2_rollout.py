"""Worker of test_ppo.py::test_rollouts_under_fsdp2 (run under torchrun, 2 processes, gloo on CPU).

accelerate forms no FSDP group without GPUs, so this shards a tiny Llama with torch's own
`fully_shard` (FSDP2, what accelerate's FSDP2 plugin applies) and checks the PPO stage's rollout
pieces on it: under `gathered`, sampling and packed (varlen) forwards match the unsharded model while
the ranks sample different lengths (without it FSDP2 unshards per forward, inside inference mode,
and fails); after it,
the parameters are sharded again and a packed backward gives the unsharded gradients (averaged
over the ranks). Exits non-zero on any mismatch.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.packing import use_varlen_attention
from stages.ppo.math import truncate_after_eos
from stages.ppo.run import episodes, gathered, response_logits, sample


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    plain = LlamaForCausalLM(config).eval()
    sharded = LlamaForCausalLM(config.__class__(**config.to_dict())).eval()  # its own config
    sharded.load_state_dict(plain.state_dict())
    for model in (plain, sharded):
        assert use_varlen_attention(model)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    weight = sharded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] == 16, "not sharded"

    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), is_fsdp2=True)
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (prompts != 0).long()
    new_tokens = 3 if rank == 0 else 9  # the ranks stop at different lengths
    with gathered(accelerator, sharded):
        tokens, logprobs = sample(sharded, prompts, mask, new_tokens, 0.0, 1, 0)
        responses, resp_mask, _ = truncate_after_eos(tokens, 1, 0)
        ep = episodes(torch.cat([prompts, responses], 1), torch.cat([mask, resp_mask], 1), resp_mask, packed=True)
        logits = response_logits(sharded, ep, 0.7)
    want_tokens, want_logprobs = sample(plain, prompts, mask, new_tokens, 0.0, 1, 0)
    assert torch.equal(tokens, want_tokens), "sharded sampling differs"
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, response_logits(plain, ep, 0.7), atol=1e-5, rtol=1e-5)

    weight = sharded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] == 16, "not resharded after the rollout"
    # A training step's backward on the packed episodes (different on each rank): FSDP2's gradients
    # are the unsharded model's averaged over the ranks, as data parallelism's are.
    for model in (sharded, plain):
        model.train()
        response_logits(model, ep, 0.7).logsumexp(-1).sum().backward()
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        dist.all_reduce(q.grad)
        torch.testing.assert_close(p.grad.full_tensor(), q.grad / dist.get_world_size(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    dist.barrier()
    print(f"rank {rank}: ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
