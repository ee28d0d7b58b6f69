"""The submission writer's CSV text against pandas' `to_csv` of the same table (the writer before), on one block;
then that text gzip-compressed (a `.csv.gz` submission) at level 1, the writer's (GZIP_LEVEL) and 9 (GzipFile's
default).

    python benchmarks/bench_writer.py [--nuclei 20000] [--genes 460] [--repeats 3]

Both writers write the same bytes (checked here, and in tests/test_submission.py); the table gives each step's best
wall time of `--repeats`, its rows per second, what a whole challenge (about 1.67 million nuclei x 460 genes) would
take at that rate, and the bytes written.
"""

from __future__ import annotations

import argparse
import gzip
import time

import numpy as np
import pandas as pd

from submission.predict import SamplePredictions, finalise
from submission.writer import GZIP_LEVEL, csv_rows

CHALLENGE_ROWS = 1_670_000 * 460


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=20000, help="nuclei in the block (the writer's default block)")
    parser.add_argument("--genes", type=int, default=460)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    values = finalise(rng.gamma(0.5, 1.0, (args.nuclei, args.genes))).astype(np.float32)
    ids = np.arange(1, args.nuclei + 1) * 7
    predictions = SamplePredictions("UC1_I", ids, [f"GENE{i}" for i in range(args.genes)], values)

    def with_pandas() -> bytes:  # the writer before: this frame (genes categorical) through to_csv
        return pd.DataFrame({
            "cell_id": np.repeat(ids, args.genes),
            "gene": pd.Categorical.from_codes(np.tile(np.arange(args.genes), args.nuclei),
                                              categories=predictions.genes),
            "prediction": values.reshape(-1).astype(np.float64).round(2), "sample": "UC1_I",
        }).to_csv(header=False, index=False, float_format="%.2f").encode()

    n_rows = args.nuclei * args.genes
    rows = []

    def timed(name: str, step) -> bytes:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            written = step()
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append({"step": name, "rows": n_rows, "best_s": round(best, 2), "rows_per_s": int(n_rows / best),
                     "whole_challenge_min": round(CHALLENGE_ROWS / (n_rows / best) / 60, 1),
                     "mb_written": round(len(written) / 1e6, 1)})
        return written

    before = timed("text: pandas to_csv, %.2f (the writer before)", with_pandas)
    text = timed("text: submission.writer.csv_rows", lambda: csv_rows(predictions, ids, values))
    if before != text:
        raise SystemExit("error: the two writers wrote different bytes")
    for level in sorted({1, GZIP_LEVEL, 9}):
        mark = " (the writer's)" if level == GZIP_LEVEL else " (GzipFile's default)" if level == 9 else ""
        timed(f"gzip level {level} of that text{mark}", lambda: gzip.compress(text, compresslevel=level, mtime=0))
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
