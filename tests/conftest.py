"""Small real-format fixtures (demo samples written as SpatialData zarr, embedded once per test session, shared by
the pytest-xdist workers) and the suite's tiers.

Every test carries exactly one tier marker (registered in pyproject.toml):

* `unit`: in memory, no file written; the default of a test that asks for no file fixture. `make check` runs these.
* `integration`: real-format files on disk (the demo fixtures, `tmp_path`); the default of a test that asks for one.
* `slow`: whole stages end to end, other processes, clusters, the bench: marked by hand (`@pytest.mark.slow`, or
  `pytestmark` for a module). `make test` (CI) runs all three tiers.

A test marked by hand keeps its mark; one marked with two tiers is an error.
"""

from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

# One BLAS / OpenMP (and so torch) thread per test process, set before pytest-xdist starts its workers: it already
# runs one process per core, and a second thread in each only spins against the other process (on a busy 2-core
# machine a 32 px EfficientNet forward took 1 s on two threads, 35 ms on one; an eigh of 256 x 256, 1 s against
# 6 ms). Workers and the stages they start as processes inherit it; a single process (`make check`) may have loaded
# numpy through a pytest plugin already, and keeps its threads.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

TIERS = ("unit", "integration", "slow")
# Fixtures that write files: a test that asks for one of them (directly or through another fixture) is integration.
FILE_FIXTURES = {"tmp_path", "tmp_path_factory", "demo_dir", "small_demo_dir", "embedded_cache"}

FIXTURE_NUCLEI = 500
# For tests of a stage's plumbing (what it writes, reads and refuses), whose point needs no score: a third of the
# nuclei, a third of the embedding and fitting.
SMALL_FIXTURE_NUCLEI = 150
FIXTURE_PATCH_SIZES = (24, 48)


def _made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once per test session, however many pytest-xdist workers ask: the first builds the folder
    under the session's shared temporary root while holding a lock, the others wait and reuse it (the demo and its
    embedding cost seconds; the tests change neither: their writes go to their own folders, and the cache's lock
    files are made for processes that share it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: its own temporary folder
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this session
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def _demo_samples(tmp_path_factory, name: str, n_nuclei: int) -> Path:
    """Three demo samples (two with expression, one like DC1 without), `n_nuclei` each, 256 px chunks, seed 7."""
    from synthetic.demo import make_demo_dataset

    def make(folder):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_demo_dataset(folder, n_nuclei=n_nuclei, seed=7, chunk_size=256)

    return _made_once(tmp_path_factory, name, make)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo samples, ~500 nuclei each."""
    return _demo_samples(tmp_path_factory, "demo", FIXTURE_NUCLEI)


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory):
    """The same demo samples with ~150 nuclei each (`SMALL_FIXTURE_NUCLEI`)."""
    return _demo_samples(tmp_path_factory, "small-demo", SMALL_FIXTURE_NUCLEI)


@pytest.fixture(scope="session")
def embedded_cache(demo_dir, tmp_path_factory):
    """The fixture samples embedded with the handcrafted encoder at two small patch sizes."""
    from embed.pipeline import EmbedSettings, embed_dataset

    def make(folder):
        embed_dataset(demo_dir, folder / "features.zarr", "handcrafted",
                      settings=EmbedSettings(patch_sizes=FIXTURE_PATCH_SIZES, chunk_nuclei=128), device="cpu",
                      progress=False)

    return _made_once(tmp_path_factory, "cache", make) / "features.zarr"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(tiers)}: one tier per test")
        if not tiers:
            item.add_marker("integration" if FILE_FIXTURES & set(item.fixturenames) else "unit")


def pytest_collection_finish(session):
    """Every test module is imported now, with torch, spatialdata and the rest, and all of it lives to the end of the
    session: frozen out of the garbage collector's sight, so that its full collections (about 20 per worker, 0.3 s
    each over those objects) scan only what the tests make."""
    gc.collect()
    gc.freeze()


def local_cluster(n_workers: int):
    """A dask LocalCluster of `n_workers` worker processes, tried a second time where its event loop did not start
    within distributed's 10 s (`distributed.utils.LoopRunner` then asserts `loop is not None`: seen about once in
    a few runs of the suite on 2 busy cores, before any of our code runs)."""
    from distributed import LocalCluster

    for attempt in (1, 2):
        try:
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        except AssertionError:
            if attempt == 2:
                raise


FORK = multiprocessing.get_context("fork")


class ForkedCommand:
    """A stage's command line (`main(argv)`) run in a forked child of this test process, with its own environment
    and its stdout and stderr in one file: a process of its own (its pid, its lock files, its DataLoader workers),
    without the interpreter start and the imports (4 to 6 s of CPU for the embed stage) that this process has paid
    already. Not an interpreter of its own: variables read at import (thread counts) are this process's, it ends
    with `os._exit` (no interpreter shutdown), and CUDA cannot be used in it (pass `--device cpu`). `python -m
    embed`, `regress`, `submission` as real interpreters: tests/test_bench_scale.py's tiny bench."""

    def __init__(self, main: Callable[[list[str]], int], argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        log.write_text("")  # there even if the child dies before it writes
        self.process = FORK.Process(target=self._child, args=(main, argv, log, env or {}))
        self.process.start()

    @staticmethod
    def _child(main, argv, log, env):  # pragma: no cover - runs in the child
        import logging

        import dask

        os.environ.update(env)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            if name not in env:
                os.environ.pop(name, None)
        dask.config.set(scheduler="synchronous")  # the parent's dask thread pool does not survive the fork
        out = os.open(log, os.O_WRONLY | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout = sys.stderr = open(out, "w", buffering=1, closefd=False)  # pytest's capture stays the parent's
        logging.root.handlers.clear()  # pytest's capturing handlers: log records go to stderr, as in a command
        warnings.showwarning = _warning_to_stderr  # and warnings too, not to pytest's record of them
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)  # as the interpreter prints a message given to sys.exit
                code = 1
        sys.stdout.flush()
        os._exit(code or 0)

    def wait(self, timeout: float = 300) -> tuple[int | None, str]:
        """The exit code (None if still running after `timeout` s, then killed) and the output."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            return None, self.log.read_text()
        return self.process.exitcode, self.log.read_text()


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
