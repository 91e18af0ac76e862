"""SFT stage: supervised fine-tuning on demonstrations (`python -m stages.sft`)."""
