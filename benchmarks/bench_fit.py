"""Fit-stage speed on synthetic features: ridge with 5-fold CV over its alpha grid, and LightGBM.

    python benchmarks/bench_fit.py [--ridge-sizes 100000 1000000] [--features 1536] [--lightgbm-size 100000]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd

from regress.boosting import LightGBMRegressor
from regress.ridge import DEFAULT_ALPHAS, RidgeCVRegressor


def synthetic(n: int, d: int, g: int, seed: int = 0, block: int = 100_000):
    """Features with a low-rank signal in the targets, generated in blocks to bound peak memory."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(32, g)).astype(np.float32) * 0.1
    X = np.empty((n, d), dtype=np.float32)
    Y = np.empty((n, g), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        X[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
        Y[start:stop] = X[start:stop, :32] @ W + rng.standard_normal((stop - start, g), dtype=np.float32) + 3
    return X, Y


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ridge-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--features", type=int, default=1536)
    parser.add_argument("--genes", type=int, default=460)
    parser.add_argument("--lightgbm-size", type=int, default=100_000)
    args = parser.parse_args()

    rows = []
    for n in args.ridge_sizes:
        X, Y = synthetic(n, args.features, args.genes)
        data_gib = (X.nbytes + Y.nbytes) / 2**30
        groups = np.arange(n) // 1000
        start = time.perf_counter()
        model = RidgeCVRegressor().fit(X, Y, groups=groups)
        seconds = time.perf_counter() - start
        rows.append({"model": f"ridge, 5-fold CV x {len(DEFAULT_ALPHAS)} alphas", "nuclei": n, "features": args.features,
                     "genes": args.genes, "seconds": seconds, "input GiB": data_gib,
                     "peak RSS GiB": peak_rss_gib(), "alpha": model.alpha_})
        print(rows[-1], flush=True)
        del X, Y

    if args.lightgbm_size:
        X, Y = synthetic(args.lightgbm_size, args.features, args.genes, seed=1)
        start = time.perf_counter()
        model = LightGBMRegressor().fit(X, Y, groups=np.arange(len(X)) // 1000)
        rows.append({"model": "lightgbm, 16 target PCs, 64 feature PCs", "nuclei": len(X),
                     "features": args.features, "genes": args.genes, "seconds": time.perf_counter() - start,
                     "input GiB": (X.nbytes + Y.nbytes) / 2**30, "peak RSS GiB": peak_rss_gib(),
                     "alpha": float("nan")})
        print(rows[-1], flush=True)

    with pd.option_context("display.float_format", "{:.2f}".format, "display.width", 140):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
