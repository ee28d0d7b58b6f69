"""What every stage's command line does with an error: bad input is one line, a bug keeps its traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from slidedata.errors import DataError

USER_ERROR_STATUS = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of input errors too")


def run_reporting_input_errors(stage: Callable[[], int], debug: bool = False,
                               input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `stage`; a DataError (or one of `input_errors`) becomes `error: ...` on stderr and exit status 2,
    unless `debug` asks for the traceback. Any other exception is a bug and propagates with its traceback."""
    try:
        return stage()
    except (DataError, *input_errors) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_STATUS
