"""The reward model as a library: load one, score (prompt, response) batches.

    model, tokenizer = load_reward_model("runs/default/reward")
    rewards = score(model, tokenizer, prompts, responses)      # float32 tensor, one per pair

A reward model is a plain `AutoModelForSequenceClassification` with one label. The reward of a
response is read at the LAST token of prompt + response rendered with the chat template the SFT model
was trained on: the prompt as the user turn(s), the response as the assistant turn including its EOS
(Huang et al. 2024, "extract the reward from the EOS token"). Padding is on the right and
`config.pad_token_id` is distinct from EOS, so the head finds the last non-pad token, i.e. the EOS.

Normalisation (Ouyang et al. 2022; Huang et al. 2024): after training, the reward stage shifts the
rewards so the reference demonstrations average 0. The offset is stored as `reward_bias` in
config.json (a plain config attribute: it survives save/load in transformers) and added here, by the
PPO stage and by anyone who loads the model with plain transformers:

    reward = model(**inputs).logits[:, 0] + getattr(model.config, "reward_bias", 0.0)

`fold_offset` moves it into the weights where the architecture allows: into the score head's bias,
or, with a bias-free head (every transformers `...ForSequenceClassification.score`), into the bias of
a final LayerNorm in front of it (GPT-2, OPT, Pythia, Phi, BLOOM). Then `reward_bias` is 0 and
`reward_bias_folded` records the amount, so the line above and this module add nothing twice.
Llama-style models (Llama, Qwen2, Mistral, Gemma) cannot hold it: the head has no bias, transformers
builds it without one whatever the checkpoint holds, and the final RMSNorm in front of it has no bias
and rescales away any constant added before it. Raw and normalised scores differ by one constant, so
rankings and accuracies are identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from data.formats.prompts import as_messages
from data.tokenizer import turn_end
from pipeline.errors import PipelineError

BIAS_KEY = "reward_bias"


def reward_offset(config) -> float:
    """The normalising offset a reward model's config keeps (0 where none, or where it is folded in)."""
    return float(getattr(config, BIAS_KEY, 0.0) or 0.0)


FOLDED_KEY = "reward_bias_folded"  # the part of the offset `fold_offset` moved into the weights


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], response: str, max_length: int | None = None
) -> list[int]:
    """Token ids of prompt + response through the chat template, ending with the token that closes the
    answer: what a template writes after it (Qwen's newline after <|im_end|>) is left off, so the reward
    is read where PPO's responses end. Too long: keep the END (the response and its EOS, where the reward
    is read) and drop the start of the prompt."""
    messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    _, trailing = turn_end(tokenizer)
    if trailing and text.endswith(trailing):
        text = text[: -len(trailing)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def check_reward_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """The reward must read conversations exactly as the policy writes them: demand a chat template
    that renders a user turn and an assistant turn, and a pad token distinct from EOS."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"{where}: tokenizer has no chat template; the reward model must read prompt+response "
            f"in the SFT model's chat format (train the parent with the pipeline or add its template)"
        )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}], tokenize=False
        )
    except Exception as e:  # jinja raises many types; the user needs the one line
        raise PipelineError(
            f"{where}: chat template cannot render a user+assistant conversation ({type(e).__name__}: {e})"
        ) from None
    if "ping" not in text or "pong" not in text:
        raise PipelineError(
            f"{where}: chat template does not render both the prompt and the response (mismatched template)"
        )


def load_reward_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a reward model directory, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"{path}: not a reward model (no config.json); run `make reward` first")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or torch.float32)
    if model.config.num_labels != 1:
        raise PipelineError(
            f"{path}: a reward model has one output, this one has num_labels={model.config.num_labels}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_reward_tokenizer(tokenizer, str(path))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def score(
    model, tokenizer, prompts: list, responses: list[str], batch_size: int = 32, max_length: int | None = None
) -> torch.Tensor:
    """Normalised reward of each (prompt, response): the head's value at the last token plus the
    stored `reward_bias`. Returns float32 on CPU, in input order."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.zeros(0)
    was_training = model.training
    model.eval()
    limit = max_length or getattr(model.config, "max_position_embeddings", None)
    seqs = [encode(tokenizer, p, r, limit) for p, r in zip(prompts, responses, strict=False)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    device = next(model.parameters()).device
    out = torch.empty(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = right_pad([seqs[i] for i in idx], model.config.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        out[idx] = logits[:, 0].float().cpu()
    model.train(was_training)
    return out + reward_offset(model.config)


def _head_input_sources(model, head: torch.nn.Linear, probe: dict) -> list[torch.nn.Module]:
    """Modules with an additive bias the size of the head's input whose output, in a forward of
    `probe`, is exactly what the head reads: the head's input is that module's output plus its bias."""
    outputs, seen = {}, {}
    candidates = [
        m
        for m in model.modules()
        if m is not head
        and isinstance(getattr(m, "bias", None), torch.nn.Parameter)
        and m.bias.shape == (head.in_features,)
    ]
    hooks = [m.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out)) for m in candidates]
    hooks.append(head.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0])))
    try:
        model(**probe)
    finally:
        for h in hooks:
            h.remove()
    x = seen["input"]
    return [
        m
        for m, out in outputs.items()
        if isinstance(out, torch.Tensor) and out.numel() == x.numel() and torch.equal(out.reshape(x.shape), x)
    ]


@torch.no_grad()
def fold_offset(model) -> bool:
    """Move the normalising offset in the config (`reward_bias`) into the weights of a one-output
    sequence-classification model, so that plain `AutoModelForSequenceClassification` logits include
    it: into the score head's bias, or else into the bias of the module that feeds the head (a final
    LayerNorm), along the head's weight w: score(x + b + d) = score(x + b) + offset for
    d = offset * w / |w|^2. Then `reward_bias` is 0 and `reward_bias_folded` holds the amount; save
    the whole model (weights and config). Returns False, changing nothing, where there is nothing to
    move or the model cannot hold it (Llama: bias-free head behind an RMSNorm): the offset stays in
    the config. Checked on a probe forward: the logits must move by exactly the offset."""
    config = model.config
    offset = reward_offset(config)
    head = getattr(model, "score", None)
    if config.num_labels != 1 or not isinstance(head, torch.nn.Linear) or not offset:
        return False
    was_training = model.training
    model.eval()
    device = head.weight.device
    probe = {"input_ids": (torch.arange(1, 9, device=device) % config.vocab_size).view(1, -1)}
    probe["attention_mask"] = torch.ones_like(probe["input_ids"])
    before = model(**probe).logits.float()
    if head.bias is not None:
        target = head.bias
        delta = torch.full_like(head.bias, offset)
    else:
        sources = _head_input_sources(model, head, probe)
        w = head.weight[0].float()
        if not sources or not w.dot(w) > 0:
            model.train(was_training)
            return False
        target = sources[-1].bias
        delta = (offset * w / w.dot(w)).to(target.dtype)
    target += delta
    moved = model(**probe).logits.float() - before
    # A module whose bias is not simply added to its output, or whose output also feeds something
    # else, would move the logits otherwise: undo and leave the offset in the config.
    tolerance = max(1e-4, 16 * torch.finfo(target.dtype).eps) * max(1.0, abs(offset), before.abs().max().item())
    if not torch.allclose(moved, torch.full_like(moved, offset), atol=tolerance, rtol=0):
        target -= delta
        model.train(was_training)
        return False
    setattr(config, FOLDED_KEY, float(getattr(config, FOLDED_KEY, 0.0) or 0.0) + offset)
    setattr(config, BIAS_KEY, 0.0)
    model.train(was_training)
    return True
