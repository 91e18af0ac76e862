"""RLOO (Ahmadian et al. 2024): the RL stage with a leave-one-out baseline over each prompt's answers, no critic.

It is stages/ppo's code (`python -m stages.rloo` = `python -m stages.ppo` writing RUN/rloo) with this
package's profiles, which set the advantage estimator and its group size.
"""
