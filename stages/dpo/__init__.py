"""DPO stage: direct preference optimisation on the reward stage's comparisons (`python -m stages.dpo`)."""
