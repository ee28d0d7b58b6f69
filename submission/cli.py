"""The `he2expr` command (pyproject's console script): one entry point for every stage's command line.

    he2expr embed|fit|submit|validate|score|export|demo|import [ARGS...]    = python -m embed|regress|submission|...

It lives in `submission`, the package on top of the others, so importing every stage from here makes no cycle
(tests/test_architecture.py); each stage is imported only when its subcommand runs, so `he2expr demo` loads no torch.
"""

from __future__ import annotations

import sys
from typing import Callable

from slidedata.cli import USER_ERROR_STATUS


def _embed() -> Callable:
    from embed.__main__ import main
    return main


def _fit() -> Callable:
    from regress.__main__ import main
    return main


def _submit() -> Callable:
    from submission.__main__ import main
    return main


def _validate() -> Callable:
    from submission.validate import main
    return main


def _score() -> Callable:
    from submission.score import main
    return main


def _export() -> Callable:
    from submission.export import main
    return main


def _demo() -> Callable:
    from synthetic.demo import main
    return main


def _import() -> Callable:
    from importers.cli import main
    return main


# subcommand -> (its CLI's main(argv, prog), imported when it runs (plain imports, so the architecture test sees
# them), what it does)
COMMANDS: dict[str, tuple[Callable[[], Callable], str]] = {
    "embed": (_embed, "embed every nucleus into the feature cache (python -m embed)"),
    "fit": (_fit, "evaluate models on held-out tissue, save the best (python -m regress)"),
    "submit": (_submit, "write and validate the submission file (python -m submission)"),
    "validate": (_validate, "check a submission file against the data (python -m submission.validate)"),
    "score": (_score, "score a submission against held-out truth (python -m submission.score)"),
    "export": (_export, "cached features as AnnData for scanpy (python -m submission.export)"),
    "demo": (_demo, "write the synthetic demo dataset (python -m synthetic.demo)"),
    "import": (_import, "import spot data or a Xenium output folder as samples (python -m importers.cli)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: he2expr COMMAND [ARGS...]   (he2expr COMMAND --help: its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run `he2expr COMMAND ARGS...`: the command's own CLI gets ARGS; its exit status is returned."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return USER_ERROR_STATUS
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\nerror: he2expr: unknown command '{name}' (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return USER_ERROR_STATUS
    stage_main = COMMANDS[name][0]()
    return int(stage_main(rest, prog=f"he2expr {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
