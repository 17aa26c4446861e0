"""The CLI's shared parser and number types."""

import argparse

import pytest

from search.cli.common import Parser, int_at_least, non_negative_int, positive_float, positive_int


def test_number_types_accept_their_range_and_refuse_the_rest():
    assert positive_int("1") == 1 and non_negative_int("0") == 0 and int_at_least(4)("4") == 4
    assert positive_float("0.5") == 0.5
    for parse, text, message in [(positive_int, "0", "must be >= 1, got '0'"),
                                 (non_negative_int, "-1", "must be >= 0"),
                                 (int_at_least(4), "3", "must be >= 4"),
                                 (positive_int, "2.5", "not an integer: '2.5'"),
                                 (positive_float, "0", "must be > 0"),
                                 (positive_float, "-inf", "must be finite"),
                                 (positive_float, "nan", "must be finite"),
                                 (positive_float, "x", "not a number: 'x'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_a_parser_error_is_one_line_without_usage(capsys):
    parser = Parser(prog="diffnas")
    sub = parser.add_subparsers(required=True).add_parser("sample")
    sub.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["sample", "--n", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("diffnas: error: argument --n: must be >= 1, got '0' "
                                       "(see diffnas sample --help)\n")
