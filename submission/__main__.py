"""python -m submission --data DIR --cache DIR --model-dir DIR --out FILE[.csv|.csv.gz|.parquet] [--anndata DIR]"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None, prog: str = "python -m submission") -> int:
    from slidedata.cli import (DefaultsHelpFormatter, StageParser, add_output_flags, add_sample_arguments,
                               elements_from_args, run_reporting_input_errors)

    parser = StageParser(prog=prog, description="Write and validate the submission.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="a sample zarr or a folder of <sample>.zarr")
    parser.add_argument("--cache", default="outputs/features.zarr", help="the feature cache the embed stage wrote")
    parser.add_argument("--model-dir", default="outputs/model", help="the fitted model (make fit)")
    parser.add_argument("--out", default="outputs/submission.csv", help="the submission file, .csv or .parquet")
    parser.add_argument("--anndata", help="also write one <sample>.h5ad of predictions per sample here")
    parser.add_argument("--maps", metavar="DIR",
                        help="also draw each sample's predicted expression on its tissue here (<sample>.png)")
    parser.add_argument("--into-spatialdata", action="store_true",
                        help="also add the predictions as table 'predicted_expression' to each sample zarr")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)

    from submission.pipeline import make_submission

    start = time.perf_counter()

    def stage() -> int:
        report = make_submission(args.data, args.cache, args.model_dir, args.out, args.anndata,
                                 args.into_spatialdata, args.maps, elements=elements_from_args(args))
        for sample, n in report.per_sample.items():
            print(f"{sample}: {n} held-out nuclei")
        if report.problems:
            print(f"validation FAILED, nothing written to {args.out}:")
            for problem in report.problems:
                print(f"  - {problem}")
            return 1
        if not any(report.per_sample.values()):  # a normal case (imported data), but rarely what one wants
            print("notice: no sample has held-out nuclei (group validation or test), so the file is only its "
                  "header; to hold out tissue, import with --hold-out-blocks or --hold-out-sections",
                  file=sys.stderr)
        print(f"wrote {report.rows} rows to {report.path} in {time.perf_counter() - start:.1f} s")
        print("validation: ok")
        return 0

    return run_reporting_input_errors(stage, args, interrupted="the submission file is whole where it exists (written "
                                                                  "and validated first); the extra outputs after it "
                                                                  "may be missing; the cache and the model are as "
                                                                  "they were")


if __name__ == "__main__":
    sys.exit(main())
