"""The help formatter of every `fastbyol` subcommand that shows its options' defaults."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, except that an option whose help already says its default
    ("(default: the preset's)", "(default: 1024, ...)") gets no second "(default: None)".

    Descriptions are not %-formatted by argparse unless they hold %(prog)s (a "%%" there prints as "%%"), option
    helps always are (write "%%" there): tests/test_cli_help.py scans every subcommand's help for both."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)
