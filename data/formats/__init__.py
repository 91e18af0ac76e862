"""The record formats each stage accepts, one module per kind. data.loading reads files (local `.jsonl`,
`.jsonl.gz`, `.json`, `.parquet`, `.csv`, `.txt`, directories of these, or a Hub dataset id) into
records; these modules map the records onto what each stage trains on.

stage     canonical fields              also accepted (mapped on load)
--------  ----------------------------  ---------------------------------------------------------------------------
pretrain  text                          .txt (blank-line or <|endoftext|>-separated documents); --text_field
sft       prompt, completion            messages ending in an assistant turn; Dolly (instruction/context/response);
                                        Alpaca, LIMA, oasst in LLaMA-Factory form (instruction/input/output,
                                        history); --columns role=field; any reward format (its top-ranked answer)
reward    prompt, responses (K >= 2),   chosen/rejected (+ prompt), strings or messages; Anthropic HH transcripts;
          ranking (best first)          OpenAssistant ranked replies and *.trees.jsonl exports; LLaMA-Factory
                                        ranked lists
ppo       prompt (--prompt_field        messages ending in a user turn; a bare JSON string
          another; a list such as
          MT-Bench's turns gives its
          first turn)

    text.py            pretraining text: load_texts
    demonstrations.py  SFT demonstrations: load_demonstrations, to_conversation, column_map, best_answers
    comparisons.py     reward comparisons: Group, to_group, group_builders, is_comparison, load_groups;
                       as DPO's preference pairs: pair_indices, preference_pairs (PAIR_MODES)
    prompts.py         prompts (PPO, `make eval`): prompt_of, as_messages
    fields.py          what they share: require_text, EmptyField, ROLES

A bad record (K < 2, a ranking that is not a permutation, duplicate or empty responses) stops the stage
naming file, record and field (`--skip_invalid true` skips and counts); so does a refused chat template.
"""
