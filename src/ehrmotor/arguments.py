"""Value types for argparse, shared by every command: each turns one command-line string into a
value or raises argparse's error naming what was expected (argparse adds the option's name)."""

from __future__ import annotations

import argparse


def number(value: str, kind: type, low: float, high: float, what: str) -> float:
    """`value` as `kind` (int or float) in [low, high); else argparse's error naming `what`."""
    try:
        parsed = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
    if not low <= parsed < high:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return float(parsed)


def positive(value: str) -> int:
    return int(number(value, int, 1, float("inf"), "a positive integer"))


def non_negative(value: str) -> int:
    return int(number(value, int, 0, float("inf"), "an integer >= 0"))


def at_least_two(value: str) -> int:
    return int(number(value, int, 2, float("inf"), "an integer >= 2"))


def fraction(value: str) -> float:
    """A fraction strictly between 0 and 1."""
    parsed = number(value, float, 0, 1, "a fraction in (0, 1)")
    if parsed == 0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {value}")
    return parsed


def days(value: str) -> float:
    return number(value, float, 0, float("inf"), "a number of days >= 0")


def positive_days(value: str) -> float:
    parsed = days(value)
    if parsed == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {value}")
    return parsed


def names(value: str) -> list[str]:
    """Comma-separated names, blanks dropped; at least one."""
    found = [name.strip() for name in value.split(",") if name.strip()]
    if not found:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return found


def k_values(value: str) -> list[int | None]:
    """Comma-separated positive integers or `all` (None)."""
    return [None if k == "all" else positive(k) for k in names(value)]
