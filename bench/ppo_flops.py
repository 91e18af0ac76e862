"""Our PPO stage's loop under torch's FLOP counter; run by bench/ppo.py, untimed, beside the timed runs.

    python -m bench.ppo_flops <the stage's command-line options>

Prints one JSON line: {"rollout", "update", "updates"}: the FLOPs the rollouts (generation, scores,
reference, values, advantages) and the PPO updates executed, summed over the run, and the number of
updates it ran. Only the loop is
counted, as TRL's side counts its `train()`: not loading, the final evaluation or saving.
"""

from __future__ import annotations

import json
import sys

from torch.utils.flop_counter import FlopCounterMode

import stages.ppo.run as ppo


def counted(name: str, fn, totals: dict):
    def wrapper(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
        totals[name] += counter.get_total_flops()
        if name == "update":
            totals["updates"] += 1
        return out

    return wrapper


def main() -> None:
    totals = {"rollout": 0, "update": 0, "updates": 0}
    # main() calls both through the module's globals, so wrapping them here counts every call.
    ppo.rollout = counted("rollout", ppo.rollout, totals)
    ppo.ppo_update = counted("update", ppo.ppo_update, totals)
    ppo.main(sys.argv[1:])
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
