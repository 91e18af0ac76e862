"""Dr. GRPO (Liu et al. 2025): GRPO without the std division and the per-answer length normalisation.

It is stages/ppo's code (`python -m stages.dr_grpo` = `python -m stages.ppo` writing RUN/dr_grpo) with this
package's profiles, which set the advantage estimator and its group size.
"""
