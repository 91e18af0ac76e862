"""One error type for everything a user can fix: bad input, bad config, a missing parent stage."""

from __future__ import annotations

import functools
import sys


class PipelineError(Exception):
    """Printed as one line `error: ...` and exit status 2; never a traceback."""


def cli_main(fn):
    """Wrap a stage entry so user errors become one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.stage import held_stage_locks, release_stage_locks  # here: pipeline.stage imports this module

        held = held_stage_locks()
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            # A stage holds its directory's lock for as long as it runs: main() called twice in one
            # process (tests, notebooks) must find the directory free again, whether it ended or failed.
            release_stage_locks(keep=held)

    return wrapper
