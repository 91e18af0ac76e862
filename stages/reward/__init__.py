"""Reward-model stage: `python -m stages.reward` (see run.py)."""
