"""Faults a new user still hit (issue 23): each was a traceback or a wrong output on the code before, and the tests
of each numbered case fail there for the reason they name; a few guard the fix's other side (what must still pass,
or still be refused)."""

from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import FIXTURE_PATCH_SIZES, ForkedCommand
from tests.test_cli_faults import mean_model, one_error_line  # noqa: F401 (a fixture)
from slidedata.errors import DataError
from slidedata.writer import anucleus_table, write_sample

ROOT = Path(__file__).resolve().parents[1]


def _tiny_sample(path: Path, mask: np.ndarray, genes: list[str] | None = None, chunk_size: int = 16) -> Path:
    """A sample of `mask`'s nuclei on a plain image, every nucleus in group train, with expression over `genes`."""
    ids = np.unique(mask[mask > 0]).astype(np.int64)
    groups = pd.DataFrame({"cell_id": ids, "group": "train"})
    expression = None
    if genes is not None:
        counts = np.random.default_rng(0).poisson(3.0, (len(ids), len(genes))).astype(np.float32) + 1
        expression = anucleus_table(ids, counts, genes, np.zeros((len(ids), 2)))
    image = np.full((3, *mask.shape), 200, np.uint8)
    return write_sample(path, image, mask, groups, expression, chunk_size=chunk_size)


def _disk(mask: np.ndarray, cell_id: int, y: float, x: float, radius: float) -> None:
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = cell_id


# -- 1: duplicate gene names --------------------------------------------------------------------------------------

def test_a_gene_named_twice_is_refused_when_the_sample_is_read(tmp_path):
    from slidedata import open_sample

    mask = np.zeros((32, 32), np.uint32)
    _disk(mask, 1, 8, 8, 4)
    _disk(mask, 2, 20, 20, 4)
    path = _tiny_sample(tmp_path / "s.zarr", mask, ["GENE_A", "GENE_B", "GENE_A"])
    with pytest.raises(DataError, match="more than once") as info:
        open_sample(path)
    assert str(path) in str(info.value) and "GENE_A" in str(info.value)


# -- 3: a cache that cannot be written ----------------------------------------------------------------------------

def _listing(folder: Path) -> list[tuple]:
    """Every path beside and under `folder` with its size and modification time: a write in place shows too."""
    return sorted((str(p.relative_to(folder.parent)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.parent.rglob("*"))


def test_fit_and_submit_read_a_finished_cache_without_writing_to_it(demo_dir, embedded_cache, tmp_path,
                                                                     monkeypatch):
    """A finished cache on a read-only mount: the stages that read it take no lock and write nothing near it."""
    from regress.features import FeatureSpec
    from regress.fit import fit_and_evaluate
    from regress.settings import FitSettings
    from slidedata import locks
    from submission.pipeline import make_submission

    cache = shutil.copytree(embedded_cache, tmp_path / "ro" / "features.zarr")
    before = _listing(cache)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(locks, "try_lock", read_only)
    model = tmp_path / "model"
    fit_and_evaluate(demo_dir, cache, model, FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES),
                                                         models=("mean-profile",), figures=False), progress=False)
    report = make_submission(demo_dir, cache, model, tmp_path / "submission.csv")
    assert not report.problems and report.rows is not None
    assert _listing(cache) == before


# -- 4: a long output name ----------------------------------------------------------------------------------------

def test_a_249_character_file_name_is_published_and_swept(tmp_path):
    from slidedata.publish import partial_path, publishing, sweep

    target = tmp_path / ("s" * 245 + ".csv")
    assert len(target.name) == 249
    with publishing(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.suffix == ".csv"
        tmp.write_text("a,b\n")
    assert target.read_text() == "a,b\n" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    # a killed writer's leftover under the shortened name is found again by the next publish
    dead = 2 ** 22 + 12345  # above Linux's pid_max default of 4194304: never alive
    leftover = partial_path(target, pid=dead)
    leftover.write_text("half")
    assert sweep(target) == [leftover] and not leftover.exists()


@pytest.mark.parametrize("name", ["s" * 248 + ".csv", "s" * 251 + ".csv", "a." + "b" * 247, "é" * 120 + ".csv",
                                  "x" * 255])
def test_every_legal_name_is_published(name, tmp_path):
    """Up to 255 bytes, a dot early in the name, a name cut inside a two-byte character."""
    from slidedata.publish import check_writable, publishing

    target = check_writable(tmp_path / name, folder=False)
    with publishing(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        tmp.name.encode("utf-8")  # whole characters only
        tmp.write_text("x")
    assert target.read_text() == "x"


def test_two_long_names_that_share_their_start_get_different_temporary_names(tmp_path):
    from slidedata.publish import partial_path

    first, second = tmp_path / ("x" * 250 + "1"), tmp_path / ("x" * 250 + "2")
    assert partial_path(first) != partial_path(second)


def test_a_name_longer_than_the_file_system_allows_is_refused_before_any_work(tmp_path):
    from slidedata.publish import NotWritable, check_writable

    with pytest.raises(NotWritable, match="longer than"):
        check_writable(tmp_path / ("n" * 256 + ".csv"), folder=False)


# -- 5: Ctrl-C ------------------------------------------------------------------------------------------------------

def test_ctrl_c_during_embed_is_one_line_exit_130_and_the_run_resumes(demo_dir, tmp_path, capsys, monkeypatch):
    import embed.pipeline
    from embed.__main__ import main as embed_main
    from slidedata.feature_store import FeatureStore

    cache = tmp_path / "features.zarr"
    argv = ["--data", str(demo_dir / "demo1.zarr"), "--cache", str(cache), "--patch-sizes", "24",
            "--chunk-nuclei", "128", "--workers", "0"]
    real_write = embed.pipeline.FeatureEntry.write_unit
    written = []

    def interrupted_after_two_units(self, unit, features):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(unit)
        return real_write(self, unit, features)

    monkeypatch.setattr(embed.pipeline.FeatureEntry, "write_unit", interrupted_after_two_units)
    assert embed_main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert "resume" in err
    entry = FeatureStore(cache).open_entry("demo1", "handcrafted", 24)
    assert int(np.asarray(entry.done[:]).sum()) == 2  # the finished units are kept
    monkeypatch.undo()
    assert embed_main(argv) == 0
    assert "computed 2 of 4 chunks" in capsys.readouterr().out  # only what the interruption left
    assert np.asarray(entry.done[:]).all()


# -- 6, 7, 8: ids and values the validator let through -------------------------------------------------------------

def test_mask_ids_beyond_int64_are_refused_not_wrapped(tmp_path):
    from slidedata import open_sample

    mask = np.zeros((32, 32), np.uint64)
    _disk(mask, 2 ** 63 + 5, 8, 8, 4)
    _disk(mask, 7, 20, 20, 4)
    groups = pd.DataFrame({"cell_id": np.array([7], np.int64), "group": "train"})
    path = write_sample(tmp_path / "s.zarr", np.full((3, 32, 32), 200, np.uint8), mask, groups, chunk_size=16)
    with pytest.raises(DataError, match="largest supported id") as info:
        open_sample(path).nuclei()
    assert str(path) in str(info.value) and str(2 ** 63 + 5) in str(info.value)


@pytest.fixture(scope="module")
def valid_submission(mean_model, demo_dir, embedded_cache, tmp_path_factory) -> pd.DataFrame:
    from submission.pipeline import make_submission

    out = tmp_path_factory.mktemp("valid") / "submission.csv"
    assert not make_submission(demo_dir, embedded_cache, mean_model, out).problems
    return pd.read_csv(out)


@pytest.mark.parametrize("change, problem", [
    (lambda f: f.assign(prediction=f["prediction"].where(f.index != 3, 9.99)), "above log1p(100)"),
    (lambda f: f.assign(prediction=f["prediction"].where(f.index != 3, 1e6)), "above log1p(100)"),
    (lambda f: f.assign(cell_id=f["cell_id"].where(f.index != 3, f["cell_id"] + 0.5)), "not positive whole numbers"),
    (lambda f: f.assign(cell_id=f["cell_id"].astype(object).where(f.index != 3, "18446744073709551611")),
     "not positive whole numbers"),
])
def test_the_validator_refuses_values_and_ids_out_of_range(change, problem, valid_submission, demo_dir, tmp_path):
    from slidedata import open_samples
    from submission.validate import validate_submission

    path = tmp_path / "broken.csv"
    change(valid_submission).to_csv(path, index=False)
    problems = validate_submission(path, open_samples(demo_dir))
    assert any(problem in p.kind for p in problems), problems


def test_the_highest_valid_prediction_passes(valid_submission, demo_dir, tmp_path):
    """log1p(100) = 4.6151 rounds to 4.62: the writer can write it, so the validator must accept it."""
    from slidedata import open_samples
    from submission.validate import validate_submission

    path = tmp_path / "top.csv"
    valid_submission.assign(prediction=4.62).to_csv(path, index=False)
    assert validate_submission(path, open_samples(demo_dir)) == []


def test_score_refuses_fractional_cell_ids_instead_of_truncating_them(tmp_path):
    from submission.score import _fill

    block = pd.DataFrame({"cell_id": [1.0, 2.5], "gene": ["A", "A"], "prediction": [1.0, 2.0], "sample": "s"})
    wanted = {"s": (pd.Index([1, 2]), pd.Index(["A"]))}
    predicted = {"s": np.full((2, 1), np.nan)}
    with pytest.raises(DataError, match="not a positive whole number"):
        _fill(tmp_path / "sub.csv", block, wanted, predicted)


# -- 9: a sample zarr given as an output --------------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["", "features.zarr"])
def test_embed_refuses_a_cache_in_a_sample(inside, demo_dir, tmp_path, capsys):
    from embed.__main__ import main as embed_main

    sample = shutil.copytree(demo_dir / "demo1.zarr", tmp_path / "demo1.zarr")
    before = _listing(sample)
    cache = sample / inside if inside else sample
    assert embed_main(["--data", str(sample), "--cache", str(cache), "--patch-sizes", "24"]) == 2
    one_error_line(capsys.readouterr().err, sample)
    assert _listing(sample) == before


def test_fit_refuses_a_model_dir_in_a_sample(demo_dir, embedded_cache, tmp_path, capsys):
    from regress.__main__ import main as regress_main

    sample = shutil.copytree(demo_dir / "demo2.zarr", tmp_path / "demo2.zarr")
    before = _listing(sample)
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(sample / "model"),
            "--patch-sizes", *map(str, FIXTURE_PATCH_SIZES), "--models", "mean-profile"]
    assert regress_main(argv) == 2
    one_error_line(capsys.readouterr().err, "inside the sample zarr")
    assert _listing(sample) == before


# -- 10: a nucleus that ends at an empty chunk's edge -----------------------------------------------------------

def test_a_nucleus_ending_at_an_empty_chunks_edge_is_not_a_partial_copy(tmp_path):
    """Rows 16-31 hold no nucleus, so zarr writes no chunk there; a disk ends on row 15, touching it."""
    from slidedata import open_sample

    mask = np.zeros((48, 48), np.uint32)
    _disk(mask, 1, 9.5, 8, 6)  # rows 4..15: its last row (3 pixels of a 12-pixel disk) borders the empty chunk
    _disk(mask, 2, 40, 40, 4)
    assert mask[15].any() and not mask[16:32, :32].any()
    path = _tiny_sample(tmp_path / "s.zarr", mask)
    assert not (path / "images/HE_nuc_original/s0/c/0/1/0").exists()  # the empty chunk has no file
    assert sorted(open_sample(path).nuclei()["cell_id"]) == [1, 2]


def test_a_nucleus_cut_by_a_missing_chunk_is_still_a_partial_copy(tmp_path):
    from slidedata import open_sample

    mask = np.zeros((48, 48), np.uint32)
    _disk(mask, 1, 16, 8, 6)  # rows 10..22: cut through its middle by the chunk of rows 16..31
    _disk(mask, 2, 40, 40, 4)
    path = _tiny_sample(tmp_path / "s.zarr", mask)
    (path / "images/HE_nuc_original/s0/c/0/1/0").unlink()  # the copy lost it
    with pytest.raises(DataError, match="as if cut off") as info:
        open_sample(path).nuclei()
    assert "cell_id 1" in str(info.value)


# -- 11: a compressed submission ----------------------------------------------------------------------------------

def test_a_csv_gz_submission_is_gzip_and_valid(mean_model, demo_dir, embedded_cache, tmp_path, valid_submission):
    from submission.pipeline import make_submission

    out = tmp_path / "sub.csv.gz"
    assert not make_submission(demo_dir, embedded_cache, mean_model, out).problems
    with gzip.open(out, "rt") as handle:
        assert handle.readline().strip() == "cell_id,gene,prediction,sample"
    pd.testing.assert_frame_equal(pd.read_csv(out), valid_submission)
    header = out.read_bytes()[:10]
    assert header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"  # no file name (the temporary one), no time
    assert header[8] == 0  # neither the slowest level (XFL 2: GzipFile's default, 9) nor the fastest (XFL 4)
    again = tmp_path / "again.csv.gz"
    make_submission(demo_dir, embedded_cache, mean_model, again)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("name", ["sub.csv.zip", "sub.tar.gz", "sub.tgz", "sub.csv.bz2"])
def test_another_compression_suffix_is_refused_before_any_work(name, mean_model, demo_dir, embedded_cache, tmp_path,
                                                               capsys, request):
    from submission.__main__ import main as submission_main

    out = tmp_path / request.node.callspec.params["name"]
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(mean_model), "--out", str(out)]
    assert submission_main(argv) == 2
    one_error_line(capsys.readouterr().err, out, "not supported")
    assert not out.exists()


# -- logs -----------------------------------------------------------------------------------------------------------

def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


@pytest.mark.slow  # another process
def test_a_log_file_gets_one_line_per_step_and_errors_on_their_own_line(demo_dir, tmp_path, capsys, monkeypatch):
    """stderr to a file (not a terminal): no carriage returns, a line per step, `error:` at a line's start, and
    nothing at all with --quiet. The embed runs as a process of its own (forked: tests.conftest.ForkedCommand) with
    its output to a file, as a batch job's would; the demo writer's three runs are its CLI in this process, where
    stderr is pytest's capture (not a terminal either)."""
    from embed.__main__ import main as embed_main
    from slidedata import progress
    from synthetic.demo import main as demo_main

    monkeypatch.setattr(progress, "_quiet", False)  # --quiet below is process-wide: other tests must not inherit it
    code, log = ForkedCommand(embed_main, ["--data", str(demo_dir / "demo1.zarr"), "--cache",
                                           str(tmp_path / "features.zarr"), "--patch-sizes", "24", "--chunk-nuclei",
                                           "128", "--device", "cpu"], tmp_path / "embed.log").wait()
    assert code == 0, log
    assert "\r" not in log
    steps = [line for line in log.splitlines() if line.startswith("demo1: ")]
    assert [s.split(":")[1].strip() for s in steps] == ["nuclei", "handcrafted"], log
    capsys.readouterr()
    assert demo_main(["--out", str(tmp_path / "demo"), "--n-nuclei", "60", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert demo_main(["--out", str(a_file / "demo"), "--n-nuclei", "60"]) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    with pytest.raises(SystemExit) as usage:
        demo_main(["--n-nuclei", "0"])
    assert usage.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


def test_step_lines_count_and_close_once(capsys):
    from slidedata.progress import StepLine

    for _ in StepLine(range(3), desc="step", unit="item"):
        pass
    bar = StepLine(total=10, desc="bar", unit="nucleus")
    bar.update(4)
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["step: 3/3 item", "bar: 4/10 nucleus"]


@pytest.mark.slow  # other processes
def test_he2expr_help_starts_in_under_a_second():
    """`he2expr --help` imports no stage (it printed after 8-11 s when submission/__init__ loaded the models)."""
    code = "import time; t = time.perf_counter(); import submission.cli, sys; print(time.perf_counter() - t)"
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 1.0
    loaded = _run("-c", "import sys, submission.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                        "('torch', 'regress', 'anndata', 'embed', 'dask')))")
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_fit_names_every_report_it_wrote(demo_dir, embedded_cache, tmp_path, capsys):
    from regress.__main__ import main as regress_main

    model = tmp_path / "model"
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(model),
            "--patch-sizes", *map(str, FIXTURE_PATCH_SIZES), "--models", "mean-profile", "--quiet"]
    assert regress_main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    for name in ("scores.csv", "gene_pearson.csv", "scores.png", "maps.png"):
        assert name in last and (model / name).is_file(), (name, last)
    # Without figures: the earlier fit's are removed (they would show another model), and not named.
    assert regress_main([*argv, "--no-figures"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "scores.csv" in last and "png" not in last, last
    assert sorted(p.name for p in model.iterdir() if p.suffix in (".png", ".csv")) == ["gene_pearson.csv",
                                                                                        "scores.csv"]


@pytest.mark.slow  # other processes
def test_make_help_names_every_target_and_variable():
    """`make help` (also plain `make`) is the Makefile's opening comment: one line per target (`make NAME ...`) and
    per variable (`NAME, ...`), each followed by two spaces and what it does. A target or variable added without its
    line, or a line left for one that is gone, is caught."""
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    variables = set(re.findall(r"^([A-Z0-9_]+)\s*\?=", makefile, re.M))
    shown = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, check=True,
                           env={**os.environ, "MAKEFLAGS": ""}).stdout
    named = [re.split(r"\s{2,}", line.strip())[0] for line in shown.splitlines() if line.strip()]
    documented_targets = {word for line in named if line.startswith("make ") for word in line.split()[1:]}
    documented_variables = {word for line in named if re.fullmatch(r"[A-Z0-9_]+(, [A-Z0-9_]+)*", line)
                            for word in line.split(", ")}
    assert len(targets) > 10 and len(variables) > 15
    assert documented_targets == targets
    assert documented_variables == variables


@pytest.mark.slow  # other processes
def test_the_makefile_quotes_paths_with_spaces(tmp_path):
    """`make -n` prints the commands: every path variable stays one word however many spaces it holds."""
    folder = tmp_path / "my data"
    done = subprocess.run(["make", "-n", "embed", "fit", "submit", f"DATA={folder}", f"OUT={folder}/out"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MAKEFLAGS": ""})
    commands = {stage: line for line in done.stdout.splitlines()
                for stage in ("embed", "regress", "submission") if f" -m {stage} " in line}
    assert len(commands) == 3, done.stdout + done.stderr
    quoted = {"--data": f'"{folder}"', "--cache": f'"{folder}/out/features.zarr"',
              "--model-dir": f'"{folder}/out/model"', "--out": f'"{folder}/out/submission.csv"'}
    for stage, options in (("embed", ("--data", "--cache")), ("regress", ("--data", "--cache", "--model-dir")),
                           ("submission", ("--data", "--cache", "--model-dir", "--out"))):
        for option in options:
            assert f"{option} {quoted[option]}" in commands[stage], (option, commands[stage])
