"""How the command line reads its arguments: numbers in exactly their documented forms, and a bad argument in one line.

Python's int() and float() take more than a number as a user writes it: any Unicode decimal digit (int("٣") is 3),
underscores ("1_0"), surrounding blanks; str.isdigit() takes '²', which int() then refuses. `integer` and `number`
take ASCII decimal forms only (an optional sign, digits, for `number` a decimal point and an exponent; nan and inf
are left to each setting's rule, which refuses them), at most 40 characters (int() of a 5,000-digit text raises).
"""

from __future__ import annotations

import argparse
import re
import sys

_INTEGER = re.compile(r"[+-]?[0-9]{1,38}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,38}(?:\.[0-9]{0,38})?|\.[0-9]{1,38})(?:[eE][+-]?[0-9]{1,4})?|[+-]?(?:nan|inf)",
                     re.IGNORECASE)


def integer(text: str) -> int:
    """An argparse type: a decimal integer in ASCII digits, optionally signed."""
    if not _INTEGER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer (ASCII digits, optionally signed)")
    return int(text)


def number(text: str) -> float:
    """An argparse type: a decimal number in ASCII (1, 0.2, 1e-3, .5), optionally signed."""
    if not _NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number (ASCII: 1, 0.2, 1e-3)")
    return float(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (the usage is `--help`'s), exit status 2 as argparse's."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
        raise SystemExit(2)
