"""What every stage's command line does with an error: bad input is one line, a bug keeps its traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from slidedata.errors import DataError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# What a stage that writes whole samples (the demo, the importers) keeps when interrupted.
SAMPLES_KEPT = ("every sample written so far is complete (each appears only when whole); the one being written was "
                "removed")


class StageParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors start their line with `error:` like every other error of a command (a
    log read with `grep ^error` finds them too); exit status 2 as before."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(USER_ERROR_STATUS, f"error: {self.prog}: {message}\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, written as on the command line (`32 64`, not a Python list);
    flags and options without a default (None) show none, and a help text that names its default keeps its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or (isinstance(default, (list, tuple)) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--debug and --quiet, which every command takes; `run_reporting_input_errors` applies them."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of input errors too")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines (errors and "
                                                             "results are still printed)")


# Elements field -> (option, help): the sample layout options every stage that opens samples shares.
_ELEMENT_OPTIONS = {
    "image": ("--image-element", "the RGB uint8 image element (spatialdata-io's Xenium H&E: he_image)"),
    "nuclei": ("--nuclei-element", "the nuclei: an integer mask (images/labels) or polygons (a shapes element, "
                                   "e.g. nucleus_boundaries), rasterised once into $HE2EXPR_MASK_CACHE"),
    "table": ("--table-element", "the expression table: X = log1p(counts / total * 100), layers['counts']"),
    "groups": ("--groups-element", "the table naming each cell's group (train, validation, test); may be the "
                                   "expression table"),
    "group_column": ("--group-column", "obs column of that table holding the group"),
    "cell_id": ("--cell-id-column", "obs column naming each cell, in both tables (integers or strings)"),
    "label_column": ("--label-column", "where cell ids are strings and the nuclei a mask: obs column holding each "
                                       "cell's value in the mask"),
}


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where a sample zarr's parts are (`slidedata.sample.Elements`), defaults the challenge's
    names: one definition for every stage that opens samples. Read them back with `elements_from_args`."""
    from slidedata.sample import DEFAULT_ELEMENTS

    group = parser.add_argument_group("sample layout", "element names of sample zarrs laid out otherwise than the "
                                                       "challenge's (e.g. written by spatialdata-io)")
    for name, (option, text) in _ELEMENT_OPTIONS.items():
        group.add_argument(option, dest=f"element_{name}", default=getattr(DEFAULT_ELEMENTS, name), metavar="NAME",
                           help=text)


def elements_from_args(args: argparse.Namespace):
    """The `slidedata.sample.Elements` the options of `add_sample_arguments` name."""
    from slidedata.sample import Elements

    return Elements(**{name: getattr(args, f"element_{name}") for name in _ELEMENT_OPTIONS})


def run_reporting_input_errors(stage: Callable[[], int], args: argparse.Namespace,
                               input_errors: tuple[type[BaseException], ...] = (),
                               interrupted: str = "nothing was written under a final name") -> int:
    """Run `stage` under the flags of `add_output_flags`. A DataError (or one of `input_errors`) becomes one
    `error: ...` line on stderr and exit status 2, unless --debug asks for the traceback; Ctrl-C becomes one
    `interrupted: ...` line saying what is kept (`interrupted`) and exit status 130, the shell's for SIGINT. Any other
    exception is a bug and propagates with its traceback."""
    from slidedata.progress import close_bars, set_quiet

    debug = bool(getattr(args, "debug", False))
    set_quiet(getattr(args, "quiet", False))
    try:
        return stage()
    except (DataError, *input_errors) as exc:
        if debug:
            raise
        close_bars()
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        if debug:
            raise
        close_bars()
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return INTERRUPTED_STATUS


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1."""
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse `type=` for counts where 0 means none."""
    return _checked(text, int, lambda v: v >= 0, "0 or a positive integer")


def positive_float(text: str) -> float:
    """argparse `type=` for sizes that must be above 0."""
    return _checked(text, float, lambda v: v > 0, "a positive number")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse `type=` for counts with a floor below which the command cannot work (e.g. a slide's edge)."""
    def parse(text: str) -> int:
        return _checked(text, int, lambda v: v >= minimum, f"an integer of at least {minimum}")

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


def _checked(text: str, kind: type, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value
