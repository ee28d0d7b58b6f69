"""The scale benchmark's runner: every stage gets a row with its time and peak RSS, failing and runaway stages are
reported (killed by timeout or memory) and the bench goes on; the table is written as CSV and Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture()
def stub_stages(monkeypatch, tmp_path):
    """The seven stages replaced by small programs with known behaviour."""
    out = tmp_path / "made"

    def stages(work, scale, python=sys.executable):
        return [
            bench_scale.Stage("a", "present", _python("raise SystemExit(9)"), out, skip_if_present=True),
            bench_scale.Stage("b", "ok, ~300 MB", _python(
                "import numpy, pathlib, time; a = numpy.ones(300 * 2**20 // 8); del a; time.sleep(0.6); "
                f"pathlib.Path({str(out / 'b.bin')!r}).write_bytes(b'x' * 2**20)"), out / "b.bin"),
            bench_scale.Stage("c", "fails", _python("raise SystemExit(3)"), out / "none"),
            bench_scale.Stage("d", "runaway memory", _python(  # past 0.6 GB in 3 steps: killed well within 3 s
                "import numpy, time\nblocks = []\nfor _ in range(40):\n"
                "    blocks.append(numpy.ones(2**25)); time.sleep(0.05)\ntime.sleep(30)"), out / "none"),
            bench_scale.Stage("e", "too slow", _python("import time; time.sleep(30)"), out / "none"),
            bench_scale.Stage("f", "ok", _python("pass"), out / "none"),
            bench_scale.Stage("g", "ok too", _python("pass"), out / "none"),
        ]

    out.mkdir()
    monkeypatch.setattr(bench_scale, "stages", stages)
    return tmp_path


@pytest.mark.slow
def test_every_stage_is_reported_and_runaway_stages_are_killed(stub_stages):
    work = stub_stages / "work"
    # 3 s: stage b needs about 1; stage e sleeps (an idle pytest worker) until the timeout kills it
    table = bench_scale.main(["--work", str(work), "--timeout", "3", "--max-rss-gb", "0.6"]).set_index("stage")
    assert list(table.index) == list(bench_scale.STAGES)
    assert table["wall_s"].notna().all() and table["peak_rss_gb"].notna().all()
    assert table.loc["a", "status"] == "skipped (present)"
    assert table.loc["b", "status"] == "ok" and 0.25 < table.loc["b", "peak_rss_gb"] < 0.6
    assert table.loc["b", "output_gb"] == pytest.approx(2**20 / 2**30, abs=1e-3)
    assert table.loc["c", "status"] == "failed (exit 3)" and table.loc["c", "exit_code"] == 3
    assert table.loc["c", "peak_rss_gb"] < 0.2  # its own memory, not the bench's (or pytest's)
    assert table.loc["d", "status"].startswith("killed: RSS") and table.loc["d", "wall_s"] < 10
    assert table.loc["e", "status"].startswith("killed: timeout") and 3 <= table.loc["e", "wall_s"] < 10
    assert table.loc["f", "status"] == "ok" and table.loc["g", "status"] == "ok"
    written = pd.read_csv(work / "bench_scale.csv")
    assert list(written["stage"]) == list(bench_scale.STAGES)
    markdown = (work / "bench_scale.md").read_text().splitlines()
    assert markdown[0].startswith("| scale | stage |") and len(markdown) == 2 + 7


def test_a_subset_of_stages_updates_its_rows_of_the_table(stub_stages):
    work = stub_stages / "w"
    assert list(bench_scale.main(["--work", str(work), "--stages", "f", "c"])["stage"]) == ["c", "f"]
    assert list(bench_scale.main(["--work", str(work), "--stages", "a"])["stage"]) == ["a"]
    written = pd.read_csv(work / "bench_scale.csv")
    assert list(written["stage"]) == ["a", "c", "f"] and written.loc[1, "status"] == "failed (exit 3)"


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["a b c d", "e f"], ids=["one-slide", "whole-challenge"])
def test_the_whole_bench_at_a_tiny_scale(tmp_path, stages):
    """The stages' real commands, at 0.03% of the challenge (about 60 nuclei per slide, 500 in the whole-challenge
    cache): the plumbing of `make bench-scale`, in CI. Each stage is a fresh Python process; the two independent
    groups (the slide a-d, the whole-challenge cache e-f) run as two tests, so two workers share them. Stage g is
    stage f's command with another model (the MLP ensemble, fitted, saved and served in test_cell_models): at this
    scale it would add a minute of torch start-up and training to CI and no plumbing f does not run."""
    table = bench_scale.main(["--work", str(tmp_path), "--scale", "0.0003", "--stages", *stages.split()])
    assert list(table["stage"]) == stages.split()
    assert (table["status"] == "ok").all(), table
    assert (table["peak_rss_gb"] > 0).all() and (table["wall_s"] > 0).all()
