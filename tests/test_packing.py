"""varlen_sdpa (pipeline/packing.py): packed rows give every sequence what it gets alone, in the
forward and the backward; padded inputs and generation are unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.packing import VARLEN, keeps_packed_sequences_apart, pack_rows, packs_sequences, use_varlen_attention

SEQS = [[1, 5, 7, 9, 3], [4, 4, 2], [8, 9, 10, 11, 12, 13, 14], [6]]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # 4 query heads over 2 key/value heads: the grouped-query path too
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
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
    for a, b in zip(packed_grads, (p.grad for p in model.parameters()), strict=False):
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


GROUPS = [[[1, 2, 3, 4], [1, 2, 3, 9, 8], [1, 2, 7]], [[5, 6], [7, 8, 9]], [[3, 3, 3], [3, 3, 3, 4]]]


def test_pack_rows_writes_a_shared_prefix_once():
    ids, positions, where = pack_rows(GROUPS, share_prefix=True)
    # [1, 2] once, then each answer continuing at position 2; no common start: plain packing;
    # a sequence keeps at least its last token of its own ([3, 3] shared, not [3, 3, 3]).
    assert ids == [1, 2, 3, 4, 3, 9, 8, 7, 5, 6, 7, 8, 9, 3, 3, 3, 3, 4]
    assert positions == [0, 1, 2, 3, 2, 3, 4, 2, 0, 1, 0, 1, 2, 0, 1, 2, 2, 3]
    assert [[ids[i] for i in at] for at in where] == [s for g in GROUPS for s in g]
    plain = pack_rows(GROUPS)
    assert plain[0] == sum((s for g in GROUPS for s in g), []) and plain[1] == [
        i for g in GROUPS for s in g for i in range(len(s))
    ]


def test_branches_off_a_shared_prefix_equal_each_sequence_alone_forward_and_backward():
    model = tiny_llama()
    use_varlen_attention(model)
    seqs = [s for g in GROUPS for s in g]
    ids, positions, where = pack_rows(GROUPS, share_prefix=True)
    logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=False).logits[0]
    alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
    for at, expected in zip(where, alone, strict=False):
        torch.testing.assert_close(logits[at], expected, atol=1e-5, rtol=1e-4)
    # The gradients of a loss on each sequence's last token (a reward model's) match too.
    last = torch.tensor([at[-1] for at in where])
    logits[last, 3].sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(input_ids=torch.tensor([s]), use_cache=False).logits[0, -1, 3] for s in seqs).backward()
    for a, b in zip(shared_grads, (p.grad for p in model.parameters()), strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert keeps_packed_sequences_apart(model, GROUPS[0], share_prefix=True) and packs_sequences(
        model, share_prefix=True
    )


def test_a_branch_without_its_prefix_is_an_error():
    model = tiny_llama()
    use_varlen_attention(model)
    with pytest.raises(ValueError, match="prefix that its row does not hold"):  # branches at 3, the row holds 2
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), position_ids=torch.tensor([[0, 1, 3, 4]]), use_cache=False)


def test_a_model_that_cannot_branch_fails_the_check():
    """Plain sdpa reads position ids only for RoPE: every token sees the whole row before it."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    assert not keeps_packed_sequences_apart(model, GROUPS[0], share_prefix=True)


def test_packed_forwards_in_inference_mode_and_autograd_after_them():
    """PPO samples in inference mode; a rollout whose prompts all have one length gives generation's
    first forward no padding mask, so it takes the packed path with position ids made in inference
    mode (they track no version: 'Inference tensors do not track version counter'). Position ids made
    outside and read there first must not leave a layout that a later forward with gradients reuses."""
    model = tiny_llama()
    use_varlen_attention(model)
    ids, pos = packed_row(SEQS)
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    for made_in_inference_mode in (True, False):
        with torch.inference_mode():
            p = pos.clone() if made_in_inference_mode else pos
            got = model(input_ids=ids, position_ids=p, use_cache=False).logits
        assert torch.equal(got, want)
        model(input_ids=ids, position_ids=pos, use_cache=False).logits.sum().backward()
        model.zero_grad()


def test_one_layout_per_forward(monkeypatch):
    """Every layer of a forward reads the same position ids: their layout is computed once."""
    import pipeline.packing as packing

    model = tiny_llama()
    use_varlen_attention(model)
    ids, pos = packed_row(SEQS)
    layouts, segments = [], packing._segments
    monkeypatch.setattr(packing, "_segments", lambda p: layouts.append(segments(p)) or layouts[-1])
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False)
    assert len(layouts) == model.config.num_hidden_layers == 2 and layouts[1] is layouts[0]
