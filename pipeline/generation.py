"""Answering prompts with a chat model: left-padded batches through the chat template.

Used wherever a stage or the evaluation needs a model's answers (SFT and PPO evaluation, comparison
collection, chat). Left padding keeps every prompt's last token next to the first generated one.
"""

from __future__ import annotations

import torch


def chat_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a user prompt (or a conversation ending in a user turn) ready for the answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt sits where it would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def max_prompt_tokens(model, max_new_tokens: int) -> int:
    return getattr(model.config, "max_position_embeddings", 2048) - max_new_tokens


@torch.no_grad()
def answer(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int | None = None,
) -> list[str]:
    """One answer per prompt (a string, or messages ending in a user turn). temperature 0 = greedy.

    Prompts longer than the model's context allows are cut from the left (the end of a prompt,
    next to the answer, matters most).
    """
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    limit = max(1, max_prompt_tokens(model, max_new_tokens))
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [chat_ids(tokenizer, p)[-limit:] for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(batch, tokenizer.pad_token_id)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return [a.strip() for a in answers]
