"""The challenge's real size on one machine: wall time and peak RSS of every stage, each in its own process.

    python benchmarks/bench_scale.py [--work DIR] [--stages a b ...] [--scale 0.05] [--timeout S] [--max-rss-gb G]

Stages (a-d on one real-size synthetic slide, e-g on a synthetic feature cache of the whole challenge):

    a  generate one 20,000 x 22,000 px sample, ~200,000 nuclei (skipped when present)
    b  embed it: handcrafted encoder, patch sizes 32 64 128 224
    c  fit on it: mean-profile, ridge, ridge+context
    d  submit it
    e  write the synthetic full-challenge cache: 8 samples, 1.67 M nuclei, 1536-d features at 2 patch sizes (~10 GB)
    f  fit on that cache: mean-profile, ridge+context
    g  fit the MLP ensemble on that cache: mlp-ensemble on the features plus their neighbours' mean and max
       within 15 and 30 um (its row subsample: --sample-rows, 100,000 rows by default)

A stage that fails, runs past `--timeout` or grows past `--max-rss-gb` (polled from /proc, the whole process group
killed: the machine never swaps) is reported with its exit code, time and peak RSS, and the bench goes on. The table
is printed and written as CSV and Markdown under the work folder. `--scale` shrinks every sample's nuclei (and slide
area: same density, same shapes) to prove the plumbing quickly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's packages, also where another one is installed

STAGES = ("a", "b", "c", "d", "e", "f", "g")
POLL_S = 0.2
# What the issue asks of each stage on one 24 GB machine (reported beside the numbers, never enforced).
TARGETS = {"b": "< 6 GB", "d": "< 6 GB, < 5 min", "f": "< 12 GB, < 20 min", "g": "< 12 GB"}


@dataclass
class Stage:
    key: str
    name: str
    command: list[str]
    output: Path  # what the stage writes: its size on disk is reported
    skip_if_present: bool = False
    env: dict = field(default_factory=dict)


def stages(work: Path, scale: float, python: str = sys.executable) -> list[Stage]:
    from synthetic.demo import REAL_SHAPE

    real = work / "real" / "UC1_I.zarr"
    cache, model = work / "real-features.zarr", work / "real-model"
    full = work / "full"
    height, width = (str(int(round(side * scale ** 0.5))) for side in REAL_SHAPE)
    return [
        Stage("a", "generate real-size sample", [python, "-m", "synthetic.demo", "--size", "real", "--out",
                                                 str(real.parent), "--name", "UC1_I", "--height", height,
                                                 "--width", width], real, skip_if_present=True),
        Stage("b", "embed (handcrafted, 4 patch sizes)",
              [python, "-m", "embed", "--data", str(real), "--cache", str(cache), "--encoder", "handcrafted",
               "--patch-sizes", "32", "64", "128", "224"], cache),
        Stage("c", "fit on it", [python, "-m", "regress", "--data", str(real), "--cache", str(cache), "--model-dir",
                                 str(model), "--encoder", "handcrafted", "--patch-sizes", "32", "64", "128", "224",
                                 "--models", "mean-profile", "ridge", "ridge+context"], model),
        Stage("d", "submit it", [python, "-m", "submission", "--data", str(real), "--cache", str(cache),
                                 "--model-dir", str(model), "--out", str(work / "submission.csv")],
              work / "submission.csv"),
        Stage("e", "write full-challenge cache", [python, str(BENCHMARKS / "full_cache.py"), "--out", str(full),
                                                  "--scale", str(scale)], full),
        Stage("f", "fit on full-challenge cache",
              [python, "-m", "regress", "--data", str(full / "data"), "--cache", str(full / "features.zarr"),
               "--model-dir", str(work / "full-model"), "--encoder", "uni2-h", "--patch-sizes", "64", "224",
               "--models", "mean-profile", "ridge+context"], work / "full-model"),
        Stage("g", "fit mlp-ensemble on full-challenge cache",
              [python, "-m", "regress", "--data", str(full / "data"), "--cache", str(full / "features.zarr"),
               "--model-dir", str(work / "full-model-mlp-ensemble"), "--encoder", "uni2-h", "--patch-sizes", "64", "224",
               "--models", "mlp-ensemble", "--context-radius", "70", "141", "--context-pool", "mean", "max"],
              work / "full-model-mlp-ensemble"),
    ]


def run_stage(stage: Stage, timeout_s: float, max_rss_gb: float, log_dir: Path) -> dict:
    """Run one stage in its own process group. Its peak RSS is polled from /proc every POLL_S: the high-water mark
    of the stage's process (VmHWM, which starts afresh at exec), or the summed RSS of its group if larger (workers).
    Not wait4's ru_maxrss: Linux carries it across fork and exec, so it would include the bench's own memory."""
    row = {"stage": stage.key, "name": stage.name, "status": "", "exit_code": None, "wall_s": 0.0,
           "peak_rss_gb": 0.0, "output_gb": 0.0, "target": TARGETS.get(stage.key, "")}
    if stage.skip_if_present and stage.output.exists():
        row.update(status="skipped (present)", output_gb=_size_gb(stage.output))
        return row
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage.key}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    # The stages import the project from the checkout this file belongs to, wherever the bench is started.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCHMARKS.parent), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(stage.command) + "\n")
        log.flush()
        process = subprocess.Popen(stage.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)
        killed, polled_peak, signalled = None, 0, False
        while True:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
            if pid:
                break
            rss, leader_peak = _group_memory(process.pid)
            polled_peak = max(polled_peak, rss, leader_peak)
            elapsed = time.perf_counter() - start
            if killed is None and rss > max_rss_gb * 2**30:
                killed = f"killed: RSS > {max_rss_gb:g} GB"
            elif killed is None and elapsed > timeout_s:
                killed = f"killed: timeout {timeout_s:g} s"
            if killed and not signalled:
                _kill_group(process.pid)
                signalled = True
            time.sleep(POLL_S)
    process.returncode = os.waitstatus_to_exitcode(status)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_gb"] = round(polled_peak / 2**30, 2)
    row["exit_code"] = process.returncode
    row["status"] = killed or ("ok" if process.returncode == 0 else f"failed (exit {process.returncode})")
    row["output_gb"] = _size_gb(stage.output)
    row["log"] = str(log_path)
    return row


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the stage's own process group (start_new_session), nothing else
    except ProcessLookupError:
        pass


def _group_memory(pgid: int) -> tuple[int, int]:
    """(summed RSS of the processes of one process group, the high-water RSS of its leader), in bytes."""
    total, leader_peak = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the command: state, ppid, pgrp, ...
                continue
            with open(f"/proc/{entry.name}/status") as handle:
                status = dict(line.split(":", 1) for line in handle if ":" in line)
            total += _kib(status.get("VmRSS"))
            if int(entry.name) == pgid:
                leader_peak = _kib(status.get("VmHWM"))
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return total, leader_peak


def _kib(value: str | None) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def _size_gb(path: Path) -> float:
    if not path.exists():
        return 0.0
    if path.is_file():
        return round(path.stat().st_size / 2**30, 3)
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 3)


def markdown(table: pd.DataFrame) -> str:
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None,
                        help="folder for samples, caches, models, logs and the table (default outputs/bench-scale, "
                             "outputs/bench-scale-<scale> below scale 1)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the challenge's nuclei per sample (slide area shrinks with it)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per stage before it is killed")
    parser.add_argument("--max-rss-gb", type=float, default=20.0,
                        help="a stage whose processes hold more resident memory is killed")
    args = parser.parse_args(argv)
    work = Path(args.work or ("outputs/bench-scale" if args.scale == 1 else f"outputs/bench-scale-{args.scale:g}"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in stages(work, args.scale):
        if stage.key not in args.stages:
            continue
        print(f"[bench-scale] {stage.key}: {stage.name} ...", flush=True)
        row = run_stage(stage, args.timeout, args.max_rss_gb, work / "logs")
        print(f"[bench-scale] {stage.key}: {row['status']}, {row['wall_s']} s, {row['peak_rss_gb']} GB", flush=True)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.insert(0, "scale", args.scale)
    # A run of some stages updates their rows of the work folder's table and keeps the others'.
    path = work / "bench_scale.csv"
    merged = table
    if path.exists():
        earlier = pd.read_csv(path)
        earlier["target"] = earlier["target"].fillna("")  # an empty cell reads back as NaN
        merged = pd.concat([earlier[~earlier["stage"].isin(table["stage"])], table], ignore_index=True)
        merged = merged.sort_values("stage", kind="stable").reset_index(drop=True)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        print(merged.drop(columns=["log"], errors="ignore").to_string(index=False))
    merged.to_csv(path, index=False)
    (work / "bench_scale.md").write_text(markdown(merged.drop(columns=["log"], errors="ignore")))
    print(f"table: {work / 'bench_scale.csv'}, {work / 'bench_scale.md'}")
    return table


if __name__ == "__main__":
    main()
