"""Value ranges of config fields, declared next to the field and checked on the whole config before anything runs.

    max_steps: int = field(default=1000, metadata=at_least(1))

The metadata is a plain dict ({"min": 1}, {"choices": (...)}, ...), so a module that must not import sf (the
models) can declare the same without this module. `range_errors(config)` walks nested dataclasses and returns one
message per bad value, naming its full key (``trainer.max_steps must be >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def at_least(low: float) -> dict:
    return {"min": low}


def above(low: float) -> dict:
    return {"min_exclusive": low}


def between(low: float, high: float) -> dict:
    return {"min": low, "max": high}


def fraction() -> dict:
    """In [0, 1)."""
    return {"min": 0.0, "max_exclusive": 1.0}


def one_of(*choices: Any) -> dict:
    return {"choices": choices}


def range_errors(config: Any, prefix: str = "") -> list[str]:
    """Every field of `config` (and its nested dataclasses) outside its declared range, as messages."""
    errors = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            errors += range_errors(value, key + ".")
            continue
        problem = _problem(value, f.metadata)
        if problem:
            errors.append(f"{key} {problem}, got {value!r}")
    return errors


def _problem(value: Any, rule: Any) -> str | None:
    if not rule or value is None:  # None: "not set" is always allowed where the type allows it
        return None
    if "choices" in rule:
        return None if value in rule["choices"] else f"must be one of {', '.join(map(str, rule['choices']))}"
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if not math.isfinite(number):
            return "must be a finite number"
        if "min" in rule and number < rule["min"]:
            return f"must be >= {rule['min']}"
        if "min_exclusive" in rule and number <= rule["min_exclusive"]:
            return f"must be > {rule['min_exclusive']}"
        if "max" in rule and number > rule["max"]:
            return f"must be <= {rule['max']}"
        if "max_exclusive" in rule and number >= rule["max_exclusive"]:
            return f"must be < {rule['max_exclusive']}"
    return None
