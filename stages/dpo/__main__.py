from pipeline.runtime import run_as_process
from stages.dpo.run import main

run_as_process(main)
