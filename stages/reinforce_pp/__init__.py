"""REINFORCE++ (Hu 2025): the RL stage with batch-normalised KL-shaped returns, no critic.

It is stages/ppo's code (`python -m stages.reinforce_pp` = `python -m stages.ppo` writing RUN/reinforce_pp) with this
package's profiles, which set the advantage estimator and its group size.
"""
