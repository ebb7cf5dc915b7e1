"""Tests for ehrmotor.arguments: the argparse value types every command shares."""

from __future__ import annotations

import argparse

import pytest

from ehrmotor import arguments


@pytest.mark.parametrize(("parse", "value", "expected"), [
    (arguments.positive, "3", 3),
    (arguments.non_negative, "0", 0),
    (arguments.at_least_two, "2", 2),
    (arguments.fraction, "0.25", 0.25),
    (arguments.days, "0", 0.0),
    (arguments.positive_days, "1.5", 1.5),
    (arguments.names, " a, ,b ", ["a", "b"]),
    (arguments.k_values, "16,all", [16, None]),
])
def test_values_in_range_parse(parse, value: str, expected: object) -> None:
    assert parse(value) == expected


@pytest.mark.parametrize(("parse", "value", "says"), [
    (arguments.positive, "0", "must be a positive integer, got 0"),
    (arguments.positive, "1.5", "must be a positive integer, got '1.5'"),
    (arguments.non_negative, "-1", "must be an integer >= 0, got -1"),
    (arguments.at_least_two, "1", "must be an integer >= 2, got 1"),
    (arguments.fraction, "0", "must be a fraction in (0, 1), got 0"),
    (arguments.fraction, "1", "must be a fraction in (0, 1), got 1"),
    (arguments.fraction, "nan", "must be a fraction in (0, 1), got nan"),
    (arguments.days, "-1", "must be a number of days >= 0, got -1"),
    (arguments.positive_days, "0", "must be a positive number of days, got 0"),
    (arguments.names, " , ", "expected comma-separated names, got ' , '"),
    (arguments.k_values, "16,0", "must be a positive integer, got 0"),
])
def test_values_out_of_range_are_argparse_errors_naming_the_expectation(
        parse, value: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        parse(value)
    assert str(raised.value) == says
