"""What a new user and ordinary faults still broke: each is one `error: ...` line and exit status 2 (a traceback
only with --debug), found before any work where it can be, and never a side effect such as an empty cache created.

The CLIs run in this process (`main(argv)`), except where a process is the point (killing the embed stage).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import FIXTURE_PATCH_SIZES, ForkedCommand
from embed.__main__ import main as embed_main
from regress.__main__ import main as regress_main
from slidedata.errors import DataError
from submission.__main__ import main as submission_main

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(captured: str, *names: str) -> str:
    """The single `error:` line of `captured` (stderr), which must name each of `names`; no traceback."""
    assert "Traceback" not in captured, captured
    lines = [line for line in captured.splitlines() if "error:" in line]
    assert len(lines) == 1, captured
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def usage_error(capsys, main, argv: list[str], *names: str) -> str:
    """argparse's usage error: exit status 2, one `error:` line naming `names`."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err, *names)


@pytest.fixture(scope="module")
def mean_model(demo_dir, embedded_cache, tmp_path_factory) -> Path:
    """The quickest fitted model of the fixture cache (the mean profile)."""
    from regress.features import FeatureSpec
    from regress.fit import fit_and_evaluate
    from regress.settings import FitSettings

    model_dir = tmp_path_factory.mktemp("model")
    fit_and_evaluate(demo_dir, embedded_cache, model_dir,
                     FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES), models=("mean-profile",),
                                 figures=False), progress=False)
    return model_dir


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file.txt"
    path.write_text("not a folder\n")
    return path


# ------------------------------------------------------------------------------- 6: unreadable weights and model

@pytest.mark.parametrize("kind", ["readme", "random-bin", "random-safetensors", "empty-pth"])
def test_unreadable_weights_are_one_error_line_naming_the_file(kind, demo_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    weights = {"readme": ROOT / "README.md", "random-bin": tmp_path / "w.bin",
               "random-safetensors": tmp_path / "w.safetensors", "empty-pth": tmp_path / "w.pth"}[kind]
    if kind.startswith("random"):
        weights.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty-pth":
        weights.write_bytes(b"")
    argv = ["--data", str(demo_dir / "demo1.zarr"), "--cache", str(tmp_path / "cache.zarr"), "--device", "cpu",
            "--encoder", "efficientnet-lite0", "--weights", str(weights)]
    assert embed_main(argv) == 2
    line = one_error_line(capsys.readouterr().err, weights, "not readable")
    assert line.startswith("error: ")
    assert not (tmp_path / "cache.zarr").exists()  # refused before the cache was touched


def test_unreadable_weights_keep_their_traceback_under_debug(demo_dir, tmp_path):
    from embed.encoders import EncoderLoadError

    (tmp_path / "w.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(EncoderLoadError, match="w.bin"):
        embed_main(["--data", str(demo_dir / "demo1.zarr"), "--cache", str(tmp_path / "c.zarr"), "--device", "cpu",
                    "--encoder", "efficientnet-lite0", "--weights", str(tmp_path / "w.bin"), "--debug"])


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_predictor_is_one_error_line_naming_it(damage, mean_model, demo_dir, embedded_cache, tmp_path,
                                                       capsys):
    import shutil

    model_dir = Path(shutil.copytree(mean_model, tmp_path / "model"))
    predictor = model_dir / "predictor.joblib"
    data = predictor.read_bytes()
    predictor.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                           "random": np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes()}[damage])
    out = tmp_path / "submission.csv"
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(model_dir), "--out", str(out)]
    assert submission_main(argv) == 2
    one_error_line(capsys.readouterr().err, predictor, "cannot be read", "fit stage")
    assert not out.exists()


# ------------------------------------------------------------------------ 7: outputs that cannot be written


def test_check_writable_finds_what_root_cannot_write(tmp_path):
    """Permission bits do not stop root (these tests run as root); a path through a file, /proc and /sys do."""
    from slidedata.publish import NotWritable, check_writable

    a_file = _a_file(tmp_path)
    with pytest.raises(NotWritable, match="is an existing file, not a folder"):
        check_writable(a_file)
    with pytest.raises(NotWritable, match=f"{a_file} is a file"):
        check_writable(a_file / "model" / "deeper")
    with pytest.raises(NotWritable, match="is an existing folder"):
        check_writable(tmp_path, folder=False)
    if sys.platform.startswith("linux"):
        for place in (Path("/proc"), Path("/sys")):
            if place.is_dir():
                with pytest.raises(NotWritable, match=f"{place}"):
                    check_writable(place / "he2expr-model")
    assert check_writable(tmp_path / "new" / "model") == tmp_path / "new" / "model"
    assert list(tmp_path.iterdir()) == [a_file]  # the probe is gone and nothing was created


@pytest.mark.parametrize("where", ["existing-file", "under-a-file", "proc"])
def test_fit_refuses_an_unwritable_model_dir_before_any_work(where, demo_dir, embedded_cache, tmp_path, capsys,
                                                            monkeypatch):
    import regress.fit

    def no_work(*args, **kwargs):
        raise AssertionError("the fit started before its output was checked")

    monkeypatch.setattr(regress.fit.CacheSource, "open", no_work)
    model_dir = {"existing-file": _a_file(tmp_path), "under-a-file": _a_file(tmp_path) / "model",
                 "proc": Path("/proc/he2expr-model")}[where]
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(model_dir),
            "--models", "mean-profile"]
    assert regress_main(argv) == 2
    one_error_line(capsys.readouterr().err, model_dir)


def test_fit_api_refuses_an_unwritable_model_dir(demo_dir, embedded_cache, tmp_path):
    from regress.fit import fit_and_evaluate
    from slidedata.publish import NotWritable

    with pytest.raises(NotWritable):
        fit_and_evaluate(demo_dir, embedded_cache, _a_file(tmp_path) / "model", progress=False)


@pytest.mark.parametrize("which", ["out-under-a-file", "out-is-a-folder", "anndata-under-a-file"])
def test_submission_refuses_unwritable_outputs_before_any_work(which, mean_model, demo_dir, embedded_cache,
                                                              tmp_path, capsys, monkeypatch):
    import submission.pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("predictions started before the outputs were checked")

    monkeypatch.setattr(submission.pipeline, "predict_held_out", no_work)
    out, anndata = tmp_path / "submission.csv", None
    if which == "out-under-a-file":
        out = _a_file(tmp_path) / "submission.csv"
    elif which == "out-is-a-folder":
        out = tmp_path / "folder.csv"
        out.mkdir()
    else:
        anndata = _a_file(tmp_path) / "h5ad"
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(mean_model), "--out", str(out)]
    argv += ["--anndata", str(anndata)] if anndata else []
    assert submission_main(argv) == 2
    one_error_line(capsys.readouterr().err, anndata or out)


@pytest.mark.parametrize("command", ["demo", "import"])
def test_demo_and_import_refuse_an_unwritable_out(command, tmp_path, capsys):
    from importers.spots import main as import_main
    from synthetic.demo import main as demo_main

    out = _a_file(tmp_path) / "data"
    if command == "demo":
        assert demo_main(["--out", str(out)]) == 2
    else:  # refused before it looks for the sections
        assert import_main(["her2st", "--src", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, out, "is a file")


def test_embed_refuses_an_unwritable_cache_before_loading_anything(demo_dir, tmp_path, capsys, monkeypatch):
    import embed.pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the cache was checked")

    monkeypatch.setattr(embed.pipeline, "load_encoder", no_work)
    cache = _a_file(tmp_path) / "features.zarr"
    assert embed_main(["--data", str(demo_dir / "demo1.zarr"), "--cache", str(cache), "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, cache)


# ------------------------------------------------------------------------------------- 8: disk full in embed

def test_disk_full_during_embed_is_one_line_and_the_cache_resumes(demo_dir, tmp_path, capsys, monkeypatch):
    from slidedata.feature_store import FeatureEntry, FeatureStore

    real_write, calls = FeatureEntry.write_unit, []

    def write_until_full(self, unit, values):
        calls.append(unit)
        if len(calls) > 1:  # the first chunk fits, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real_write(self, unit, values)

    monkeypatch.setattr(FeatureEntry, "write_unit", write_until_full)
    cache = tmp_path / "features.zarr"
    argv = ["--data", str(demo_dir / "demo1.zarr"), "--cache", str(cache), "--device", "cpu", "--workers", "0",
            "--patch-sizes", "24", "--chunk-nuclei", "128"]
    assert embed_main(argv) == 2
    one_error_line(capsys.readouterr().err, cache, "No space left on device", "resumable", "run the embed stage again")

    monkeypatch.setattr(FeatureEntry, "write_unit", real_write)  # space freed
    assert embed_main(argv) == 0
    (entry,) = FeatureStore(cache, create=False).entries().itertuples()
    assert entry.units_done == entry.units > 1
    assert f"computed {entry.units - 1} of {entry.units} chunks" in capsys.readouterr().out  # the first was kept


# ------------------------------------------------------------------------------ 9: a scheduler that is not there

@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "notanaddress"])
def test_unreachable_scheduler_is_one_line_within_seconds(address, demo_dir, embedded_cache, tmp_path, capsys,
                                                          monkeypatch):
    import regress.tasks

    monkeypatch.setattr(regress.tasks, "CONNECT_TIMEOUT_S", 1)  # the default (5 s) only makes the test slower
    start = time.perf_counter()
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(tmp_path / "model"),
            "--models", "mean-profile", "--scheduler", address]
    assert regress_main(argv) == 2
    assert time.perf_counter() - start < 20  # dask's own connect timeout is 30 s
    one_error_line(capsys.readouterr().err, address, "scheduler")
    assert not (tmp_path / "model").exists()


def test_a_scheduler_that_is_no_address_leaves_this_process_computing_here():
    """distributed makes a client dask's default scheduler as it starts; one whose address is no address failed after
    that, and every later dask computation in the process asked for a client that did not exist ('no Client
    active'). The failed client then lived on as garbage until the collector ran its __del__ at some later moment,
    which hung the process when that moment was the start of another client or cluster. The collector is held off
    to see both: the default stays as it was, and no failed client is left to collect."""
    import gc

    import dask
    import dask.array as da
    from distributed import Client

    from regress.tasks import SchedulerUnreachable, check_scheduler

    before = dask.config.get("scheduler", None)
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(SchedulerUnreachable, match="not an address"):
            check_scheduler("notanaddress")
        assert dask.config.get("scheduler", None) == before
        assert da.ones(4, chunks=2).sum().compute() == 4
        assert not [o for o in gc.get_objects() if isinstance(o, Client)]
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------- 10: zero and negatives

@pytest.mark.parametrize("field, value", [("chunk_nuclei", 0), ("batch_size", 0), ("num_workers", -1),
                                          ("torch_threads", 0), ("input_size", 0), ("world_size", 0),
                                          ("max_tile", 0), ("rank", -1)])
def test_embed_settings_refuse_numbers_out_of_range(field, value):
    from embed.pipeline import EmbedSettings

    with pytest.raises(ValueError, match=field):
        EmbedSettings(**{field: value})
    with pytest.raises(ValueError, match="rank must be below world_size"):
        EmbedSettings(rank=2, world_size=2)


@pytest.mark.parametrize("option, value", [("--chunk-nuclei", "0"), ("--batch-size", "0"), ("--workers", "-1"),
                                           ("--torch-threads", "0"), ("--input-size", "0"),
                                           ("--microns-per-pixel", "0")])
def test_embed_cli_refuses_numbers_out_of_range(option, value, capsys):
    usage_error(capsys, embed_main, ["--data", "x", option, value], option, value)


def test_embed_cli_refuses_a_rank_outside_the_world(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    usage_error(capsys, embed_main, ["--data", "x"], "rank", "world_size")


@pytest.mark.parametrize("value", ["-5", "0"])
def test_a_context_radius_that_is_not_positive_is_refused(capsys, value):
    """It used to be accepted and to turn +context into the plain model without a word."""
    from regress.features import FeatureSpec

    usage_error(capsys, regress_main, ["--data", "x", "--context-radius", value], "--context-radius")
    with pytest.raises(ValueError, match="context_radius"):
        FeatureSpec(context_radius=float(value))


def test_the_fit_says_which_model_it_saved_and_why(demo_dir, embedded_cache, tmp_path, capsys):
    argv = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(tmp_path / "model"),
            "--patch-sizes", *map(str, FIXTURE_PATCH_SIZES), "--models", "mean-profile", "ridge", "--protocol", "loso",
            "--no-figures"]
    assert regress_main(argv) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved: ")]
    assert len(saved) == 1 and ", because " in saved[0], saved  # e.g. the one-standard-error rule's verdict
    assert "standard error" in saved[0] or "best held-out score" in saved[0]


def test_context_k_zero_with_a_context_model_is_one_line(capsys):
    line = usage_error(capsys, regress_main, ["--data", "x", "--context-k", "0", "--models", "ridge+context"],
                       "+context")
    assert "context_k" in line and "context_radius" in line


@pytest.mark.parametrize("argv, option", [
    (["--n-nuclei", "0"], "--n-nuclei"), (["--n-nuclei", "5"], "--n-nuclei"), (["--seed", "-1"], "--seed"),
    (["--chunk-size", "0"], "--chunk-size"), (["--size", "real", "--height", "0"], "--height"),
    (["--size", "real", "--width", "64"], "--width"), (["--n-genes", "2"], "--n-genes")])
def test_demo_cli_refuses_numbers_out_of_range(argv, option, tmp_path, capsys):
    from synthetic.demo import main

    usage_error(capsys, main, ["--out", str(tmp_path / "demo"), *argv], option)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv, option", [
    (["her2st", "--n-genes", "0"], "--n-genes"), (["her2st", "--min-counts", "-1"], "--min-counts"),
    (["her2st", "--chunk-size", "0"], "--chunk-size"), (["her2st", "--microns-per-pixel", "0"], "--microns-per-pixel"),
    (["h5ad", "--h5ad", "a.h5ad", "--image", "a.tif", "--spot-diameter-um", "0"], "--spot-diameter-um")])
def test_import_cli_refuses_numbers_out_of_range(argv, option, tmp_path, capsys):
    from importers.spots import main

    usage_error(capsys, main, [*argv, "--out", str(tmp_path / "out")], option)


# ------------------------------------------------------------------------- 11: readers never create a cache

def test_list_of_a_missing_cache_says_so_and_creates_nothing(tmp_path, capsys):
    cache = tmp_path / "nowhere" / "features.zarr"
    assert embed_main(["--list", "--cache", str(cache)]) == 2
    one_error_line(capsys.readouterr().err, cache, "no feature cache")
    assert not (tmp_path / "nowhere").exists()


def test_fit_and_submission_never_create_a_cache(mean_model, demo_dir, tmp_path):
    from regress.fit import fit_and_evaluate
    from submission.pipeline import make_submission

    cache = tmp_path / "features.zarr"
    with pytest.raises(DataError, match="no feature cache"):
        fit_and_evaluate(demo_dir, cache, tmp_path / "model", progress=False)
    with pytest.raises(DataError, match="no feature cache"):
        make_submission(demo_dir, cache, mean_model, tmp_path / "submission.csv")
    assert not cache.exists()
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a feature cache"):
        make_submission(demo_dir, tmp_path / "folder", mean_model, tmp_path / "submission.csv")
    assert list((tmp_path / "folder").iterdir()) == []


# ------------------------------------------------------------------------ 12: workers die with a killed embed

def _children(pid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_embed_workers_die_with_a_killed_parent(demo_dir, tmp_path):
    # Four patch sizes: a unit's features (256 nuclei x 27 x 4 sizes, float32) are larger than a pipe's buffer, so
    # an orphan's last put blocked it for good before workers died with their parent.
    argv = ["--data", str(demo_dir), "--cache", str(tmp_path / "c.zarr"), "--device", "cpu", "--workers", "2",
            "--patch-sizes", "16", "32", "64", "128", "--chunk-nuclei", "256"]
    parent = ForkedCommand(embed_main, argv, tmp_path / "embed.log").process
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2 and parent.is_alive() and time.monotonic() < deadline:
            workers = _children(parent.pid)
            time.sleep(0.02)
        assert len(workers) >= 2, "the embed stage never started its two workers"
        os.kill(parent.pid, signal.SIGKILL)
        parent.join()
        deadline = time.monotonic() + 3
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "DataLoader workers outlived their killed parent"
    finally:
        if parent.is_alive():
            parent.kill()
        for worker in workers:  # only where the test fails: no orphan of ours is left running
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------------------- 14: the he2expr command

def test_he2expr_dispatches_to_every_stage(capsys):
    from submission.cli import COMMANDS, main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["he2expr"].partition(":")
    assert (module, function) == ("submission.cli", "main")
    assert set(COMMANDS) == {"embed", "fit", "submit", "validate", "score", "export", "demo", "import"}
    for name, expected in [("fit", "--model-dir"), ("embed", "--chunk-nuclei"), ("submit", "--into-spatialdata"),
                           ("validate", "file"), ("score", "--truth"), ("demo", "--n-nuclei"), ("import", "her2st"),
                           ("export", "--cache")]:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"usage: he2expr {name}") and expected in shown, (name, shown[:300])


def test_he2expr_refuses_an_unknown_command(capsys):
    from submission.cli import main

    assert main(["fitt", "--data", "x"]) == 2
    one_error_line(capsys.readouterr().err, "fitt", "embed, fit, submit")
    assert main([]) == 2
    assert "usage: he2expr" in capsys.readouterr().err


def test_he2expr_passes_the_exit_status_through(demo_dir, tmp_path, capsys):
    from submission.cli import main

    assert main(["embed", "--list", "--cache", str(tmp_path / "none.zarr")]) == 2
    one_error_line(capsys.readouterr().err, "none.zarr")


# --------------------------------------------------------------------------------- 18: help and listings

def test_help_shows_defaults_as_written_on_the_command_line(capsys):
    from embed.pipeline import MAX_CPU_WORKERS

    for main, options in [(regress_main, ["--cache", "--model-dir", "--encoder", "--models", "--protocol"]),
                          (submission_main, ["--cache", "--model-dir", "--out"]), (embed_main, ["--cache"])]:
        with pytest.raises(SystemExit):
            main(["--help"])
        shown = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
        assert "PatchSize(" not in shown and "(default: None)" not in shown
        for option in options:  # its help, up to the next option, names its default once
            assert shown.split(f" {option} ", 1)[1].split(" --", 1)[0].count("(default: ") == 1, option
        if main is regress_main:
            assert "32 64 128 224 where --encoder is given)" in shown and "(default: outputs/model)" in shown
        if main is embed_main:
            assert f"at most {MAX_CPU_WORKERS}" in shown and "handcrafted" in shown


def test_list_encoders_says_which_run_offline(capsys):
    from embed.encoders import load_encoder, resolve_weights_file
    from embed.registry import ENCODERS, encoder_table

    assert embed_main(["--list-encoders"]) == 0
    assert "offline" in capsys.readouterr().out
    offline = {row["name"] for row in encoder_table() if row["offline"] == "yes"}
    assert {"handcrafted", "efficientnet-lite0"} <= offline
    assert all("HF_TOKEN" in row["weights"] for row in encoder_table()
               if ENCODERS[row["name"]].gated and ENCODERS[row["name"]].library != "unsupported")
    # What the table calls offline is: no download is tried to find its weights.
    assert resolve_weights_file(ENCODERS["efficientnet-lite0"], None).is_file()
    assert load_encoder("handcrafted").weights_sha256 == "none"


def test_list_sorts_patch_sizes_as_numbers_pixels_before_microns(demo_dir, tmp_path, capsys):
    from slidedata.feature_store import FeatureStore, identity_attrs
    from slidedata.sample import open_sample

    store = FeatureStore(tmp_path / "features.zarr")
    nuclei = store.nuclei(open_sample(demo_dir / "demo1.zarr"))
    for key in ("128", "32um", "24", "8um", "1024", "64"):
        store.create_entry("demo1", identity_attrs({"encoder": "toy", "patch_size": key, "dim": 2,
                                                    "chunk_nuclei": 4096}, {"n_nuclei": len(nuclei)}))
    assert embed_main(["--list", "--cache", str(tmp_path / "features.zarr")]) == 0
    listed = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["24", "64", "128", "1024", "8um", "32um"]


def test_counts_read_without_a_dtype_warning(tmp_path):
    """A wide count table is parsed in blocks of rows; a column numeric in one block and not in another made pandas
    warn (DtypeWarning) beside the importer's own error."""
    from importers.spot_readers import read_her2st_section
    from tests.test_spots import write_her2st_folder

    folder = write_her2st_folder(tmp_path / "S1")
    genes = [f"G{j}" for j in range(20000)]
    counts = pd.DataFrame(np.ones((40, len(genes)), np.int64), index=[f"{i}x1" for i in range(40)],
                          columns=genes).astype(object)
    counts.iloc[-1, 0] = "x"
    counts.to_csv(folder / "counts.tsv.gz", sep="\t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="counts.tsv.gz"):
            read_her2st_section(folder)
    assert [w.category.__name__ for w in caught if "Dtype" in w.category.__name__] == []
