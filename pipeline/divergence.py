"""How far a tuned policy moved from its reference (the SFT model), measured on answers it samples.

    kls = sampled_kl(policy, reference, tokenizer, prompts, max_new_tokens=40, temperature=1.0, seed=0)

Per prompt one answer y ~ policy (softmax(logits / temperature)) and the k1 estimate
sum_t log p_policy(y_t | ...) - log p_ref(y_t | ...), both at that temperature: an unbiased Monte-Carlo
estimate of KL(policy || reference) on that prompt, in nats per answer - the quantity the RLHF objective
penalises (Ziegler et al. 2019) and the one DPO's closed form keeps implicit (Rafailov et al. 2023).
PPO penalises it at its sampling temperature, so a stage compared with PPO measures it there too.
"""

from __future__ import annotations

import torch

from pipeline.generation import chat_ids, left_pad, max_prompt_tokens, position_ids


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each answer's tokens up to and including its first EOS, 0 on the padding generate() adds after it."""
    is_eos = (response == eos_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def answer_logprobs(
    model, ids: torch.Tensor, mask: torch.Tensor, start: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) under softmax(logits / temperature) for t >= start, positions counted from
    each row's first real token (left padding must not shift them; generate() counts them the same way)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, start:, None]).squeeze(-1)


@torch.no_grad()
def sampled_kl(
    policy,
    reference,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[float], list[int]]:
    """Per prompt (a string or messages ending in a user turn): the k1 KL estimate of one sampled answer,
    and that answer's length in tokens (module docstring)."""
    torch.manual_seed(seed)
    was_training = policy.training, reference.training
    policy.eval()
    reference.eval()
    device = next(policy.parameters()).device
    limit = max(1, max_prompt_tokens(policy, max_new_tokens))
    kls, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        batch = [chat_ids(tokenizer, p)[-limit:] for p in prompts[i : i + batch_size]]
        ids, mask = (t.to(device) for t in left_pad(batch, tokenizer.pad_token_id))
        out = policy.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        start = ids.shape[1]
        answer_mask = response_mask(out[:, start:], tokenizer.eos_token_id)
        full_mask = torch.cat([mask, answer_mask], 1)
        diff = answer_logprobs(policy, out, full_mask, start, temperature) - answer_logprobs(
            reference, out, full_mask, start, temperature
        )
        kls += (diff * answer_mask).sum(1).tolist()
        lengths += answer_mask.sum(1).tolist()
    policy.train(was_training[0])
    reference.train(was_training[1])
    return kls, lengths
