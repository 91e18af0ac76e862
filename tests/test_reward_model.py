"""reward.model.fold_offset: a saved reward model whose plain transformers logits are the pipeline's reward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from data.tokenizer import train_tokenizer
from reward.model import encode, fold_offset, load_reward_model, right_pad, score

PROMPTS = ["What is two plus two?", "Name a colour.", "Say hello."]
ANSWERS = ["Four, of course.", "Blue", "Hello there, how are you today?"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = PROMPTS + ANSWERS + ["the quick brown fox jumps over the lazy dog"] * 5
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def gpt2(tok):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2ForSequenceClassification(config).eval()


def plain_logits(path, tok) -> torch.Tensor:
    """What a user without this project gets: transformers' own class on the saved directory."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids, mask = right_pad([encode(tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=False)], tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_folded_offset_is_in_plain_transformers_logits_and_added_once(tokenizer, tmp_path):
    model = gpt2(tokenizer)
    model.config.reward_bias = 1.75
    reward = score(model, tokenizer, PROMPTS, ANSWERS)  # the pipeline's reward: head + stored offset

    assert fold_offset(model)  # GPT-2: bias-free score head behind ln_f, a LayerNorm with a bias
    assert model.config.reward_bias == 0.0 and model.config.reward_bias_folded == 1.75
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    assert torch.allclose(plain_logits(tmp_path, tokenizer), reward, atol=1e-5)
    assert torch.allclose(score(*load_reward_model(tmp_path), PROMPTS, ANSWERS), reward, atol=1e-5)  # not twice


def test_fold_offset_prefers_the_heads_own_bias(tokenizer):
    model = gpt2(tokenizer)
    torch.manual_seed(1)
    model.score = torch.nn.Linear(32, 1, bias=True)
    model.config.reward_bias = -0.5
    reward = score(model, tokenizer, PROMPTS, ANSWERS)
    norm_bias = model.transformer.ln_f.bias.clone()
    head_bias = model.score.bias.item()

    assert fold_offset(model)
    assert model.score.bias.item() == pytest.approx(head_bias - 0.5)
    assert torch.equal(model.transformer.ln_f.bias, norm_bias)
    assert torch.allclose(score(model, tokenizer, PROMPTS, ANSWERS), reward, atol=1e-5)


def test_llama_keeps_the_offset_in_its_config_and_one_line_applies_it(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config).eval()
    model.config.reward_bias = -0.8
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    assert not fold_offset(model)  # bias-free head behind an RMSNorm: nowhere to put a constant
    assert model.config.reward_bias == -0.8 and not hasattr(model.config, "reward_bias_folded")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reward = score(*load_reward_model(tmp_path), PROMPTS, ANSWERS)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    # The README's line for a plain transformers load; on a folded model it adds 0.
    assert torch.allclose(
        plain_logits(tmp_path, tokenizer) + getattr(plain.config, "reward_bias", 0.0), reward, atol=1e-5
    )
