"""Our PPO stage's loop under torch's FLOP counter; run by bench/ppo.py, untimed, beside the timed runs.

    python -m bench.ppo_flops <the stage's command-line options>

Prints one JSON line: {"rollout", "update", "updates"}: the FLOPs the rollouts (generation, scores,
reference, values, advantages) and the PPO updates executed, summed over the run, and the number of
updates it ran. Only the loop is counted, as TRL's side counts its `train()`: not loading, the final
evaluation or saving.
"""

from __future__ import annotations

import json
import sys

from torch.utils.flop_counter import FlopCounterMode

import stages.ppo.run as ppo


def counted(name: str, fn, totals: dict, calls: dict):
    def wrapper(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
        totals[name] += counter.get_total_flops()
        calls[name] += 1
        return out

    return wrapper


def main() -> None:
    totals, calls = {"rollout": 0, "update": 0}, {"rollout": 0, "update": 0}
    # main() calls both through the module's globals, so wrapping them here counts every call.
    ppo.rollout = counted("rollout", ppo.rollout, totals, calls)
    ppo.ppo_update = counted("update", ppo.ppo_update, totals, calls)
    ppo.main(sys.argv[1:])
    print(json.dumps({**totals, "updates": calls["update"]}))


if __name__ == "__main__":
    main()
