"""Regenerate the result tables of docs/ (docs/benchmarks.md, and any page that quotes a run) from the CSV files of
benchmarks/results/.

    python benchmarks/make_docs.py [--check]        (make docs)

Each table sits between two marks that name its CSV files (one table may join several runs):

    <!-- table: bench_scale-full-58b4803.csv bench_scale-full-042b83f.csv -->
    ...                          rewritten: the rows of the files, then one line per file naming its run
    <!-- end table -->

What a run was (command, machine, wall time, the commit that recorded it) is one row of `benchmarks/results/runs.csv`,
so no number reaches a page without its run. Everything outside the marks is prose and left alone. `--check`
changes nothing and exits 1 where a page is not what the CSV files give (the test suite checks the same).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, also where another one is installed

from slidedata.publish import publishing  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- table: (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file, every value as written (0.250 stays 0.250)."""
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_line(run: dict[str, str]) -> str:
    """One sentence on where a table's numbers come from."""
    parts = [f"`{run['command']}`", run["machine"]]
    if run["wall"]:
        parts.append(run["wall"])
    parts.append(f"recorded in {run['recorded_in']}")
    line = f"Run ({run['file']}): " + "; ".join(parts) + "."
    return line + (f" {run['notes'][0].upper()}{run['notes'][1:]}." if run["notes"] else "")


def runs(results: Path = RESULTS) -> dict[str, dict[str, str]]:
    with open(results / "runs.csv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def table_block(files: list[str], results: Path = RESULTS) -> str:
    """The text between the marks: the files' rows as one table (they must share a header), then their runs."""
    known = runs(results)
    header, rows = None, []
    for name in files:
        if name not in known:
            raise SystemExit(f"error: {name} has no row in {results / 'runs.csv'}: say which run it came from")
        this_header, these_rows = read_rows(results / name)
        if header is not None and this_header != header:
            raise SystemExit(f"error: {name}'s columns differ from {files[0]}'s: one table needs one header")
        header, rows = this_header, rows + these_rows
    text = "\n" + markdown_table(header, rows) + "\n"
    return text + "".join(run_line(known[name]) + "\n\n" for name in files)


def render(page: str, results: Path = RESULTS) -> str:
    """The page with every marked table rewritten from its CSV files."""
    return BLOCK.sub(lambda m: m.group(1) + table_block(m.group("files").split(), results) + m.group(4), page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where the page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(DOCS.glob("*.md")):
        page = path.read_text()
        new = render(page)
        if new == page:
            continue
        stale.append(path)
        if not args.check:
            with publishing(path) as tmp:  # a reader never sees half a page
                tmp.write_text(new)
    if args.check and stale:
        print(f"out of date (run `make docs`): {', '.join(str(p) for p in stale)}", file=sys.stderr)
        return 1
    print(f"{len(stale)} page(s) {'to rewrite' if args.check else 'rewritten'} from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
