"""varlen_sdpa (pipeline/packing.py): packed rows give every sequence what it gets alone, in the
forward and the backward; padded inputs and generation are unchanged."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.packing import VARLEN, keeps_packed_sequences_apart, packs_sequences, use_varlen_attention

SEQS = [[1, 5, 7, 9, 3], [4, 4, 2], [8, 9, 10, 11, 12, 13, 14], [6]]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # 4 query heads over 2 key/value heads: the grouped-query path too
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def packed_row(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([sum(seqs, [])]), torch.cat([torch.arange(len(s)) for s in seqs])[None]


def test_packed_rows_equal_each_sequence_alone_forward_and_backward():
    model = tiny_llama()
    assert use_varlen_attention(model) and model.config._attn_implementation == VARLEN
    ids, pos = packed_row(SEQS)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in SEQS])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-4)

    logits.log_softmax(-1)[:, 3].sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    width = max(map(len, SEQS))  # the same sequences right-padded, with a mask
    padded = torch.tensor([s + [0] * (width - len(s)) for s in SEQS])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQS])
    out = model(input_ids=padded, attention_mask=mask, use_cache=False).logits
    (out.log_softmax(-1)[..., 3] * mask).sum().backward()
    for a, b in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_several_packed_rows_and_the_packing_check():
    model = tiny_llama()
    use_varlen_attention(model)
    assert keeps_packed_sequences_apart(model, SEQS[:3])
    rows = [SEQS[0] + SEQS[1], SEQS[2] + SEQS[3]]  # two rows of 8 tokens, two sequences each
    ids = torch.tensor(rows)
    pos = torch.tensor([list(range(5)) + list(range(3)), list(range(7)) + [0]])
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in SEQS]
    torch.testing.assert_close(logits[0], torch.cat(alone[:2]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], torch.cat(alone[2:]), atol=1e-5, rtol=1e-4)


def test_half_precision_weights_pack_too():
    """GPU profiles train in bf16: the packed path and the stages' packing check must hold there too
    (CPU kernels here; the same torch ops run on CUDA)."""
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_llama().to(dtype)
        assert packs_sequences(model) and model.config._attn_implementation == VARLEN
        ids, pos = packed_row(SEQS)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in SEQS])
        assert logits.dtype == dtype
        torch.testing.assert_close(logits.float(), alone.float(), atol=2e-2, rtol=2e-2)


def test_padded_inputs_and_generation_are_plain_sdpa():
    model = tiny_llama()
    prompts = torch.tensor([[0, 0, 1, 5], [1, 5, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=prompts, attention_mask=mask).logits
        sampled = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)
        use_varlen_attention(model)
        torch.testing.assert_close(model(input_ids=prompts, attention_mask=mask).logits, before)
        assert torch.equal(model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False), sampled)


def test_models_with_sliding_windows_keep_their_attention():
    model = tiny_llama()
    model.config.sliding_window = 4  # a window the packed path does not model
    assert not use_varlen_attention(model) and model.config._attn_implementation == "sdpa"
