"""Byte-level BPE tokenizer with the special tokens and chat template every stage shares, and what an
existing model's tokenizer is given when it lacks them (a pad apart from EOS, a chat template).

Byte-level BPE (GPT-2 style) never meets an unknown character, so English and Chinese text round-trip
exactly. The pad token is separate from EOS: PPO must tell "the answer ended" from "padding"
(Huang et al. 2024, detail on padding).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.errors import PipelineError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Special tokens a vocabulary keeps for padding without naming it the pad (Llama 3.1's first): taken as
# the pad before adding ours, which would grow the embeddings past the base model's (often round) size.
# Failing those, the first of the unused special tokens Llama 3 reserves (<|reserved_special_token_0|>...).
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")
RESERVED_PREFIX = "<|reserved_special_token_"

# One turn = role token + content; an assistant turn ends with EOS, which is where generation stops.
# The {% generation %} markers let TRL compute a loss on assistant tokens only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# SentencePiece vocabularies (Llama 2, Mistral, TinyLlama) mark a word's start with "▁", which text right
# after a special token does not get: "<|assistant|>Sorry" becomes "S" "orry", pieces the base model has
# rarely seen, where running text has "▁Sorry". For them each turn's content starts with a space, inside
# the turn, so the generation prompt still ends at the role token and the answer's first token is "▁Sorry".
SPACED_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{{ message['content'] }}", "{{ ' ' + message['content'] }}")

# Llama 3's own chat format, for a Llama 3 base vocabulary that ships without a template: its header and
# end-of-turn tokens are already in the vocabulary (untrained in the base model), so nothing is added, and
# the fine-tuned model speaks the format Llama 3 Instruct and its tools expect.
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE vocabulary of at most `vocab_size` tokens, special tokens included: merging stops
    when no pair occurs `min_frequency` times, so a small corpus gives fewer (the pretrain stage says so
    and records both sizes in its manifest)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def ensure_chat_ready(tokenizer: PreTrainedTokenizerBase, model=None) -> int:
    """Give an existing tokenizer (continued pretraining of a Hub model) what the pipeline needs:
    a pad token distinct from EOS, and if it has no chat template one: Llama 3's where the vocabulary
    has its tokens, else ours (spaced for SentencePiece vocabularies), with its role tokens and a BOS.
    Tokens the vocabulary reserves are used before new ones are added. Returns how many tokens were
    added (the model's embeddings are resized)."""
    added = 0
    special = {str(t): i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if tokenizer.eos_token is None:
        added += tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unused = sorted((i, t) for t, i in special.items() if t.startswith(RESERVED_PREFIX))
        reserved = [t for t in RESERVED_PADS if t in special and t != tokenizer.eos_token] + [t for _, t in unused]
        if reserved:
            tokenizer.pad_token = reserved[0]
        else:
            added += tokenizer.add_special_tokens({"pad_token": PAD})
    if not tokenizer.chat_template:
        # Our template starts with BOS; a model with its own template keeps its own (Qwen has no BOS).
        if tokenizer.bos_token is None:
            added += tokenizer.add_special_tokens({"bos_token": BOS})
        if all(t in special for t in LLAMA3_TOKENS):
            tokenizer.chat_template = LLAMA3_TEMPLATE
        else:
            added += tokenizer.add_special_tokens({"additional_special_tokens": ROLE_TOKENS})
            tokenizer.chat_template = SPACED_CHAT_TEMPLATE if loses_word_start(tokenizer) else CHAT_TEMPLATE
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # room for tokens added now or when the tokenizer was loaded
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
    return added


def loses_word_start(tokenizer: PreTrainedTokenizerBase, word: str = "Sorry") -> bool:
    """Whether a word right after a special token is split unlike the same word opening a text, and a
    space before it mends that (SentencePiece's Metaspace pre-tokenizer, which marks only a text's first
    word). Byte-level BPE and legacy SentencePiece tokenizers split both alike: False."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    after = ids("<|assistant|>" + word)[1:]
    return after != ids(word) and ids("<|assistant|> " + word)[1:] == ids(word)


def turn_end(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, str]:
    """The special token that closes an assistant turn in the chat template, and the text the template
    writes after it: ("<|eos|>", "") for ours, ("<|im_end|>", "\\n") for a Qwen-style template;
    (None, "") when the turn ends in plain text."""
    return _turn_end(tokenizer, repr(tokenizer.chat_template))  # a dict of named templates, too


@functools.lru_cache(maxsize=8)
def _turn_end(tokenizer: PreTrainedTokenizerBase, template_key: str) -> tuple[str | None, str]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}], tokenize=False
    )
    after = text[text.rindex("pong") + len("pong") :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    # A special token need not be a named one: Phi-3's <|end|>, Llama-3's <|eot_id|> and tokenizers converted
    # from GGUF files are added tokens marked special and nothing more.
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        return None, ""
    token = tokenizer.convert_ids_to_tokens(ids[0])
    at = after.find(token)  # -1: the template writes the token in another spelling; assume nothing follows
    return token, after[at + len(token) :] if at >= 0 else ""


def use_turn_end_as_eos(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Make the token that closes an assistant turn the EOS, as chat checkpoints do (Qwen2.5-Instruct
    sets <|im_end|>): generation, PPO's truncation and its no-EOS penalty all stop at EOS, and a base
    model's own EOS (<|endoftext|>) never follows an answer in chat-formatted training data.
    Returns the EOS it replaced, or None when the turn already ends with EOS (our template)."""
    end, _ = turn_end(tokenizer)
    if end is None or end == tokenizer.eos_token:
        return None
    old, tokenizer.eos_token = tokenizer.eos_token, end
    return old


@contextlib.contextmanager
def template_accepts(where: str):
    """A chat template may refuse a conversation by raising (Gemma's has no system role, Mistral's wants
    user and assistant turns to alternate): one line naming the record and the template's reason."""
    try:
        yield
    except jinja2.TemplateError as e:
        raise PipelineError(f"{where}: the tokenizer's chat template rejects this conversation: {e}") from None
