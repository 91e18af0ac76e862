"""GRPO (Shao et al. 2024, DeepSeekMath): the RL stage with group-normalised advantages and no critic.

It is stages/ppo's code (`python -m stages.grpo` = `python -m stages.ppo` writing RUN/grpo) with this
package's profiles, which set the advantage estimator and its group size.
"""
