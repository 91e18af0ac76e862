"""The world's rule reward for its instruction family (sums, next number, first or last word, repeat):
checkable answers, as GSM8K's final answers are, so RL with verifiable rewards needs no reward model.

    --reward_fn world.rewards:instruction_correct

The check is the gold judge's, from the world's truth (truth.json, which the generator wrote with the
prompts): 1.0 for a correct, concise answer to an instruction, 0.0 for anything else, including every
prompt of another family (a group of them all scores 0 and teaches nothing). A held-out evaluation
prompt is refused: its truth is for judging the policy, never for training it.
"""

from __future__ import annotations

import functools

from world.judge import GoldJudge


@functools.lru_cache(maxsize=4)
def _judge(world_dir: str) -> GoldJudge:
    return GoldJudge.load(world_dir)


def instruction_correct(prompt: str, answer: str, world_dir: str) -> float:
    judge = _judge(str(world_dir))
    spec = judge.spec(prompt)
    if spec.get("split") == "eval":
        raise ValueError("a held-out evaluation prompt: the world's truth about it is for judging only")
    if spec["family"] != "instruction":
        return 0.0
    return float(judge.judge(prompt, answer).label == "correct")
