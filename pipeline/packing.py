"""Padding-free batches: several sequences in one row, position ids restarting at each.

Short answers of uneven length leave much of a padded batch empty (a fifth to two fifths in the
PPO and SFT batches of the default run), and every linear layer pays for the padding. Packed
rows carry no padding; the only layer that must keep the sequences apart is attention.

transformers gives packed rows a block-diagonal mask (rows x rows elements) under sdpa or eager
attention, so attention grows with the square of the packed length. `varlen_sdpa`, registered
here as a transformers attention implementation, instead gathers the sequences of a packed batch
into a padded stack for that one call and runs causal sdpa on it (what flash attention's variable
length kernels do on GPUs): the linear layers see only real tokens and attention costs what it
would padded. Inputs with a padding mask or a KV cache (generation) take plain sdpa unchanged.

Sequences that start alike - a prompt and its K ranked answers - can share that start: `pack_rows`
writes the common prefix once and each answer after it with its position ids continuing where the
prefix ends (a drop in the position ids, not to 0, starts such a branch). Attention gives every
branch the prefix in front of it, so each answer gets exactly what it gets alone while the linear
layers see the prompt once instead of K times.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "varlen_sdpa"

# The segment layout of the position ids every layer of one forward shares (the same tensor).
_last: tuple = (None, -1, None)


def _segments(position_ids: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Sequences of a [B, L] block of position ids as a padded stack: (count S, longest Lmax,
    gather [S*Lmax] token index of each slot, scatter [B*L] slot of each token). A sequence starts
    at each 0 and at each row; where the ids drop to q > 0 a branch starts, whose stack row is the
    first q tokens of the sequence it branches from, then its own. Padded slots point at token 0;
    they sit after the end of their sequence, where causal attention never looks, and their outputs
    (and those of a branch's copied prefix) are dropped."""
    global _last
    # Tensors made in inference mode (sampling's) track no version, and a layout made there must not
    # reach a later forward that autograd records (its index tensors cannot be saved for backward):
    # there the layout is computed afresh and not kept.
    cacheable = not (torch.is_inference_mode_enabled() or position_ids.is_inference())
    ref, version, layout = _last
    if cacheable and ref is not None and ref() is position_ids and version == position_ids._version:
        return layout
    flat = position_ids.reshape(-1)
    n, width = flat.numel(), position_ids.shape[-1]
    index = torch.arange(n, device=flat.device)
    is_root = (flat == 0) | (index % width == 0)
    jump = torch.cat([flat.new_zeros(1, dtype=torch.bool), flat[1:] != flat[:-1] + 1]) & ~is_root
    starts = index[is_root | jump]
    lengths = torch.diff(starts, append=starts.new_tensor([n]))
    root, prefix = starts, torch.zeros_like(starts)  # where each one's root starts, tokens it takes from it
    if bool(jump.any()):  # only rows with branches pay for finding and checking their roots
        root = torch.cummax(torch.where(is_root, index, 0), 0).values[starts]
        prefix = torch.where(jump[starts], flat[starts], 0)
        root_length = lengths[torch.searchsorted(starts, root)]
        if bool(((prefix > 0) & ((flat[root] != 0) | (prefix > root_length))).any()):
            raise ValueError("position ids: a sequence continues a prefix that its row does not hold")
    total = prefix + lengths
    longest = int(total.max())
    slot = torch.arange(longest, device=flat.device)[None]
    own = (slot >= prefix[:, None]) & (slot < total[:, None])
    gather = torch.where(
        slot < prefix[:, None], root[:, None] + slot, torch.where(own, starts[:, None] + slot - prefix[:, None], 0)
    ).reshape(-1)
    scatter = own.reshape(-1).nonzero().squeeze(1)
    layout = (len(starts), longest, gather, scatter)
    if cacheable:
        _last = (weakref.ref(position_ids), position_ids._version, layout)
    return layout


# Under torch.compile this runs eagerly: where sequences start is read from the data, which a traced
# graph cannot branch on; the blocks' other work still compiles around it.
@torch.compiler.disable
def varlen_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """transformers attention interface: query/key/value [B, heads, L, d] -> output [B, L, heads, d]."""
    B, heads, L, _ = query.shape
    plain = (
        attention_mask is not None
        or position_ids is None
        or key.shape[2] != L
        or L < 2
        or not getattr(module, "is_causal", True)
    )
    if plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    if position_ids.shape != (B, L):  # expand() makes a new tensor per layer: the layout cache would never hit
        position_ids = position_ids.expand(B, L)
    S, longest, gather, scatter = _segments(position_ids)
    if S == B:  # one sequence per row, no padding: causal sdpa as is
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    def stack(x: torch.Tensor) -> torch.Tensor:  # [B, h, L, d] -> [S, h, Lmax, d]
        tokens = x.transpose(1, 2).reshape(B * L, heads, x.shape[-1])
        return tokens.index_select(0, gather).view(S, longest, heads, x.shape[-1]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        stack(query), stack(key), stack(value), dropout_p=dropout, scale=scaling, is_causal=True
    )
    out = out.transpose(1, 2).reshape(S * longest, heads, -1).index_select(0, scatter)
    return out.view(B, L, heads, -1), None


def _varlen_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs):
    """No mask for unpadded, cache-free input (the attention above separates packed sequences);
    sdpa's mask otherwise (padded batches, generation)."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN, _varlen_mask)


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens all of `seqs` start with, leaving each at least its last token of its own."""
    shortest = min(len(s) for s in seqs) - 1
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def document_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Pretraining text as one token stream, [BOS] doc EOS [BOS] doc EOS ..., from which training blocks
    are cut (pretraining, and PPO-ptx drawing from the same distribution)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    stream = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += bos + doc + [tokenizer.eos_token_id]
    return torch.tensor(stream, dtype=torch.long)


def pack_rows(
    groups: list[list[list[int]]], share_prefix: bool = False
) -> tuple[list[int], list[int], list[list[int]]]:
    """Groups of token sequences as one padding-free row: (token ids, position ids, where each
    sequence's tokens are in the row). Plain packing restarts the position ids at every sequence;
    with share_prefix a group's common prefix is written once and each sequence continues from it."""
    ids, positions, where = [], [], []
    for seqs in groups:
        shared = common_prefix_length(seqs) if share_prefix and len(seqs) > 1 else 0
        prefix_at = list(range(len(ids), len(ids) + shared))
        ids += seqs[0][:shared]
        positions += range(shared)
        for seq in seqs:
            at = len(ids)
            ids += seq[shared:]
            positions += range(shared, len(seq))
            where.append(prefix_at + list(range(at, len(ids))))
    return ids, positions, where


def keeps_packed_sequences_apart(model, token_ids: list[list[int]], share_prefix: bool = False) -> bool:
    """Compare a model's outputs (logits, or a bare body's hidden states) on packed sequences (one
    row by `pack_rows`) with its outputs on each alone. A model that ignored position ids would let
    the sequences attend to each other and train on a wrong loss. Without a KV cache, as trainers call
    it: transformers looks for packed sequences only then."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def outputs(**inputs) -> torch.Tensor:  # logits of a language model, hidden states of a bare body
        out = model(**inputs, use_cache=False)
        return (out.logits if "logits" in out else out.last_hidden_state)[0]

    ids, positions, where = pack_rows([token_ids], share_prefix)
    with torch.no_grad():
        alone = [outputs(input_ids=torch.tensor([seq], device=device)) for seq in token_ids]
        packed = outputs(
            input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device)
        )
    model.train(was_training)
    tol = 1e-3 if packed.dtype == torch.float32 else 5e-2  # bf16/fp16 checkpoints round; leaks differ by ~1
    packed = torch.cat([packed[torch.tensor(at, device=device)] for at in where])
    return torch.allclose(torch.cat(alone).float(), packed.float(), atol=tol, rtol=tol)


def use_varlen_attention(model) -> bool:
    """Switch a model on sdpa or eager attention to `varlen_sdpa`; models with other attention
    (flash attention packs natively) or with sliding-window or soft-capped attention, which the
    packed path does not model, keep theirs. Returns whether the model now uses it."""
    config = model.config
    special = [getattr(config, k, None) for k in ("sliding_window", "attn_logit_softcapping", "attention_chunk_size")]
    if config._attn_implementation not in ("sdpa", "eager") or any(special):
        return False
    model.set_attn_implementation(VARLEN)
    return True


def packs_sequences(model, share_prefix: bool = False) -> bool:
    """What a stage asks before it trains on packed rows: switch the model to varlen attention where
    it can, then check that its transformer body keeps packed sequences apart (and, with
    share_prefix, gives sequences branching off a shared prefix what they get alone)."""
    use_varlen_attention(model)
    body = getattr(model, getattr(model, "base_model_prefix", ""), model)  # a bare body is its own
    probe = [[5, 6, 7, 8], [5, 6, 9, 10, 11], [5, 6, 7, 12]] if share_prefix else [[5, 6, 7, 8], [9, 10, 11]]
    with whole_weights(model):
        return keeps_packed_sequences_apart(body, probe, share_prefix)


def whole_weights(model):
    """A model that transformers loaded partitioned for DeepSpeed ZeRO-3 (zero.Init) has its weights
    gathered on every process for the check's forwards; any other model is used as it is."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()
