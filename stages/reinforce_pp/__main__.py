import functools

from pipeline.runtime import run_as_process
from stages.ppo.run import main

run_as_process(functools.partial(main, stage="reinforce_pp"))
