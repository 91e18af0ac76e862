from pipeline.runtime import run_as_process
from stages.sft.run import main

run_as_process(main)
