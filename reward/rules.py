"""Rewards verified by rule: a function of (prompt, answer) in place of, or beside, a reward model.

    fn = RewardFunction.load("reward.rules:gsm8k_final_answer", world_dir="runs/default/world")
    fn(prompt, answer, record)    # -> float; anything else stops the run in one line

A reward function is any importable `package.module:function` taking the prompt (a string, or a list of
chat turns) and the answer (text) as its first two parameters, and returning a number. It may also take
`record` (the prompt's whole record as read: GSM8K's `answer`, say) and `world_dir` (the run's embedded
world) by keyword; it is given what it names. The world's checker for its instruction family is
world.rewards:instruction_correct; below is a checker of GSM8K's final answers.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import PipelineError

EXTRAS = ("record", "world_dir")


@dataclass
class RewardFunction:
    spec: str  # package.module:function, as given
    fn: Callable
    extras: dict  # the keyword arguments it asked for that do not vary by prompt (world_dir)
    wants_record: bool

    @classmethod
    def load(cls, spec: str, world_dir: str = "") -> RewardFunction:
        """Import and check the function once, before anything is written."""
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise PipelineError(f"reward_fn {spec!r}: expected package.module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise PipelineError(f"reward_fn {spec}: cannot import {module_name} ({e})") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise PipelineError(f"reward_fn {spec}: {module_name} has no function {name}")
        params = inspect.signature(fn).parameters
        positional = [
            p
            for p in params.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in EXTRAS
        ]
        required = [p for p in positional if p.default is p.empty]
        takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
        if len(required) > 2 or (len(positional) < 2 and not takes_varargs):
            raise PipelineError(
                f"reward_fn {spec}: must take (prompt, answer) and return a number; its signature is "
                f"{name}{inspect.signature(fn)}"
            )
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        extras = {"world_dir": world_dir} if "world_dir" in params or takes_kwargs else {}
        return cls(spec, fn, extras, "record" in params or takes_kwargs)

    @property
    def source(self) -> str | None:
        """The file the function is defined in (the run key fingerprints it), None for a builtin."""
        try:
            return inspect.getsourcefile(self.fn)
        except TypeError:
            return None

    def __call__(self, prompt, answer: str, record: dict | None = None) -> float:
        kwargs = dict(self.extras)
        if self.wants_record:
            kwargs["record"] = {k: v for k, v in (record or {}).items() if not k.startswith("_")}
        where = (record or {}).get("_where") or repr(str(prompt)[:80])
        try:
            value = self.fn(prompt, answer, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of user code stops the run in one line naming it
            raise PipelineError(f"reward_fn {self.spec} failed on prompt {where}: {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PipelineError(
                f"reward_fn {self.spec} returned {value!r} for prompt {where}: expected a finite number"
            )
        return float(value)


# ---- GSM8K ------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in a text ("... so she pays $1,250." -> 1250.0), None if there is none.
    GSM8K's reference solutions end in `#### <answer>`; the part after it is taken when present."""
    text = text.rsplit("####", 1)[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_final_answer(prompt, answer: str, record: dict) -> float:
    """1.0 when the answer's last number equals the reference's final answer (GSM8K's `answer` field,
    after `####`), else 0.0: the final-answer check of Cobbe et al. 2021, as RL with verifiable
    rewards uses it. A record without a reference is an error, not a zero."""
    reference = record.get("answer")
    if not isinstance(reference, str) or final_number(reference) is None:
        raise ValueError("the prompt's record has no `answer` with a final number (GSM8K's '#### 42')")
    got = final_number(answer)
    return float(got is not None and abs(got - final_number(reference)) < 1e-6)
