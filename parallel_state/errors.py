"""The one error type for a bad setting, and the helpers every package's `check` uses.

A ConfigError names the field, its value, the problem and the fix, and prints as one line:

    data.global_batch_size=20: not divisible by micro_batch_size * dp = 8 * 1. Fix: use a multiple of 8

It lives in parallel_state because every package that owns config rules may import it (the
topology's own rules are the first users); docs/architecture.md lists who imports what.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work: the field, the value, the problem and how to fix it."""

    def __init__(self, field: str, value: Any, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")

    def __reduce__(self):  # pickles with its fields (e.g. back from a worker process)
        return (type(self), (self.field, self.value, self.problem, self.fix))


def require(ok: bool, field: str, value: Any, problem: str, fix: str) -> None:
    """Raise ConfigError(field, value, problem, fix) unless `ok`."""
    if not ok:
        raise ConfigError(field, value, problem, fix)


def require_choice(field: str, value: Any, choices: Iterable) -> None:
    """`value` must be one of `choices`."""
    choices = tuple(choices)
    require(value in choices, field, value, f"must be one of {list(choices)}",
            f"set {field} to one of {', '.join(map(str, choices))}")


def require_positive(field: str, value: float) -> None:
    """`value` must be > 0."""
    require(value > 0, field, value, "must be positive", f"set {field} to a value > 0")


def require_divisible(value: int, by: int, field: str, what: str, by_name: str, fix: str) -> None:
    """`value` (of `field`, described as `what`) must be a multiple of `by` (named `by_name`)."""
    require(value % by == 0, field, value, f"{what} is not divisible by {by_name}={by}", fix)
