"""The result tables of docs/ are what benchmarks/results/*.csv hold, each with its run (benchmarks/make_docs.py)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import make_docs  # noqa: E402


def test_the_pages_are_what_the_csv_files_give_and_every_result_is_shown():
    marked = set()
    for path in make_docs.DOCS.glob("*.md"):
        page = path.read_text()
        assert make_docs.render(page) == page, f"{path} is out of date: run `make docs`"
        marked |= {name for files in make_docs.BLOCK.findall(page) for name in files[1].split()}
    on_disk = {p.name for p in make_docs.RESULTS.glob("*.csv")} - {"runs.csv"}
    assert on_disk <= marked, f"results no table shows: {sorted(on_disk - marked)}"


def test_a_table_is_its_rows_as_written_then_its_run(tmp_path):
    (tmp_path / "a.csv").write_text("model,score\nridge,0.250\n")
    (tmp_path / "b.csv").write_text("model,score\n\"mean, profile\",0.100\n")
    (tmp_path / "runs.csv").write_text("file,benchmark,command,machine,wall,recorded_in,notes\n"
                                       "a.csv,x,make x,2 cores,5 s,abc1234,\n"
                                       "b.csv,x,make x,2 cores,,abc1234,one run\n")
    page = "intro\n<!-- table: a.csv b.csv -->\nold table\n<!-- end table -->\nprose\n"
    assert make_docs.render(page, tmp_path) == (
        "intro\n<!-- table: a.csv b.csv -->\n\n| model | score |\n| --- | --- |\n| ridge | 0.250 |\n"
        "| mean, profile | 0.100 |\n\n"
        "Run (a.csv): `make x`; 2 cores; 5 s; recorded in abc1234.\n\n"
        "Run (b.csv): `make x`; 2 cores; recorded in abc1234. One run.\n\n<!-- end table -->\nprose\n")


def test_a_table_without_its_run_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("model,score\nridge,0.250\n")
    (tmp_path / "runs.csv").write_text("file,benchmark,command,machine,wall,recorded_in,notes\n")
    with pytest.raises(SystemExit, match="a.csv has no row in"):
        make_docs.render("<!-- table: a.csv -->\n<!-- end table -->\n", tmp_path)


def test_every_run_the_readme_cites_is_a_results_file():
    """The README quotes numbers with the CSV file of their run: each such name is a file of benchmarks/results/
    (a renamed or mistyped run would leave a number without its source)."""
    readme = (make_docs.ROOT / "README.md").read_text()
    cited = {Path(name).name for name in re.findall(r"[\w./-]+\.csv", readme) if not name.startswith("outputs/")}
    assert len(cited) >= 5
    assert sorted(name for name in cited if not (make_docs.RESULTS / name).is_file()) == []
